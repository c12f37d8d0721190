"""benchmarks.summarise_seeds: mean and std over runs of test_client.py summaries."""
import csv

import pytest

from benchmarks.summarise_seeds import main, table


def write_summary(run, dice_by_row):
    path = run / "test" / "mean_std_result.csv"
    path.parent.mkdir(parents=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["client", "target", "dice_mean", "hd95_mean"])
        w.writeheader()
        for client, dice in dice_by_row.items():
            w.writerow({"client": client, "target": "faz", "dice_mean": dice, "hd95_mean": 10.0})


def test_table_gives_mean_and_sample_std_over_runs(tmp_path):
    runs = []
    for i, (a, m) in enumerate([(0.6, 0.7), (0.8, 0.9)]):
        run = tmp_path / f"seed{i}"
        write_summary(run, {"client0": a, "mean of sites": m})
        runs.append(run)
    text = table(runs)
    assert "| client0 | faz | 0.700 ± 0.141 | 10.0 ± 0.0 | 0.600 | 0.800 |" in text
    assert "| mean of sites | faz | 0.800 ± 0.141 |" in text


def test_a_run_without_test_results_is_named(tmp_path, capsys):
    assert main([str(tmp_path / "missing")]) == 2
    assert "run test_client.py" in capsys.readouterr().err


def test_runs_of_one_method_are_told_apart_by_their_seed(tmp_path):
    runs = []
    for seed, dice in [(2022, 0.5), (2023, 0.7)]:
        run = tmp_path / f"compare_seed{seed}" / "runs" / "FedICRA"
        write_summary(run, {"mean of sites": dice})
        (run / "config.toml").write_text(f'strategy = "FedICRA"\nseed = {seed}\n')
        runs.append(run)
    head = table(runs).splitlines()[0]
    assert head.endswith("| Dice FedICRA seed 2022 | Dice FedICRA seed 2023 |")
    with pytest.raises(ValueError, match="--labels"):
        table(runs, ["only one"])
