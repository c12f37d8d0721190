"""benchmarks/compare_strategies: the rows, the reports and a resumable end-to-end comparison.

The end-to-end test trains two methods (a centralised reference and the FedAvg + full
objective ablation, a Flower federation) on the tiny federation through the real runner and test script. The
literal check of the issue, every method at once, takes several minutes of Flower start-ups
and runs only with ``FEDICRA_HEAVY=1``. Several seeds (``--seeds``): the mean ± std over seeds
and the paired Wilcoxon test are checked on fabricated run folders (no training), and one
end-to-end run trains two methods x two seeds at the smallest schedule.
"""
from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import pytest

from benchmarks import compare_strategies as cmp
from benchmarks import compared_methods as layout
from benchmarks import comparison_report as report
from conftest import heavy

PAPER_METHODS = ["FedICRA", "FedICRA-ref", "FedLPPA", "FedAvg", "FT", "FedProx", "FedBN", "FedAP", "FedRep", "MetaFed",
                 "FedALA", "FedLC", "Local", "CT-weak", "CT-full"]


def test_all_lists_every_compared_method_and_the_ablation_row():
    rows = layout.all_methods()
    labels = [m.label for m in rows]
    assert labels == PAPER_METHODS + ["FedAvg + full objective"]
    ablation = rows[-1]
    from methods.registry import get_method

    fedicra = get_method("FedICRA")
    assert ablation.strategy == "FedAvg"
    assert dict(ablation.settings) == {"model": fedicra.model, "procedure": fedicra.procedure}
    assert [m.label for m in layout.select_methods("fedavg, FedAvg+full")] == \
        ["FedAvg", "FedAvg + full objective"]
    with pytest.raises(SystemExit, match="--methods: unknown method 'FedFoo'"):
        layout.select_methods("FedICRA,FedFoo")


def test_ablation_row_runs_fedavg_with_fedicras_network_and_objective(tmp_path):
    args = cmp.parse_args(["--out", str(tmp_path), "--task", "faz", "--rounds", "3"])
    cmd = cmp.train_command(args, layout.select_methods("FedAvg+full")[0], port=20000)
    assert cmd[cmd.index("--strategy") + 1] == "FedAvg"
    assert cmd[cmd.index("--model") + 1] == "unet_lc_multihead"
    assert cmd[cmd.index("--procedure") + 1] == "pce_gatedcrf_mstree"
    assert cmd[cmd.index("--rounds") + 1] == "3" and cmd[cmd.index("--exp") + 1] == "FedAvg+full"


def test_validation_curve_scores_what_each_method_deploys(tmp_path):
    """A global method's row of round r scores the aggregate of round r - 1; a personal
    method's row scores its own model; the centralised pooled row is skipped."""
    def write(method, rows):
        folder = layout.run_dir(tmp_path, method)
        folder.mkdir(parents=True)
        with open(folder / "metrics.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["round", "client", "val_dice", "val_dice_global",
                                                   "val_dice_blend"], restval="")
            writer.writeheader()
            writer.writerows(rows)

    fedavg, local, ct = (layout.Method("FedAvg", "FedAvg"), layout.Method("Local", "Local"),
                         layout.Method("CT-weak", "CT-weak"))
    write(fedavg, [{"round": 2, "client": 0, "val_dice": 0.9, "val_dice_global": 0.2},
                   {"round": 2, "client": 1, "val_dice": 0.9, "val_dice_global": 0.4},
                   {"round": 3, "client": 0, "val_dice": 0.9, "val_dice_global": 0.5}])
    write(local, [{"round": 1, "client": 0, "val_dice": 0.3}, {"round": 1, "client": 1, "val_dice": 0.5}])
    write(ct, [{"round": 1, "client": -1, "val_dice": ""}, {"round": 1, "client": 0, "val_dice": 0.6},
               {"round": 1, "client": 1, "val_dice": 0.8}])
    assert report.validation_curve(tmp_path, fedavg) == pytest.approx({1: 0.3, 2: 0.5})
    assert report.validation_curve(tmp_path, local) == pytest.approx({1: 0.4})
    assert report.validation_curve(tmp_path, ct) == pytest.approx({1: 0.7})
    ref = layout.Method("FedICRA-ref", "FedICRA-ref")  # scores its blend with the next aggregate
    write(ref, [{"round": 2, "client": 0, "val_dice_blend": 0.6},
                {"round": 2, "client": 1, "val_dice_blend": 0.2}])
    assert report.validation_curve(tmp_path, ref) == pytest.approx({1: 0.4})


def _check_outputs(out: Path, labels):
    for name in ("comparison.csv", "comparison.md", "val_dice.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    with open(out / "comparison.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r for r in rows if r["method"] not in labels] == []
    for label in labels:
        mine = {r["site"]: r for r in rows if r["method"] == label}
        assert {"client0", "client1", "client2", "mean of sites", "pooled"} <= set(mine), label
        mean = mine["mean of sites"]
        sites = [float(mine[f"client{k}"]["dice_mean"]) for k in range(3)]
        assert float(mean["dice_mean"]) == pytest.approx(sum(sites) / 3)
        assert 0.0 <= float(mean["dice_mean"]) <= 1.0 and float(mean["train_seconds"]) > 0
    table = (out / "comparison.md").read_text()
    for label in labels:
        assert f"| {label} |" in table
    assert "| method | tested | site 0 | site 1 | site 2 | mean of sites |" in table


def _argv(root: Path, out: Path, methods: str):
    return ["--task", "synthetic_faz", "--root_path", str(root), "--methods", methods,
            "--rounds", "2", "--iters", "2", "--img_size", "32", "--num_clients", "3",
            "--set", "base_channels=4", "--set", "aux_channels=8", "--set", "batch_size=2",
            "--set", "ala_max_epochs=2", "--out", str(out)]


@pytest.mark.slow
def test_comparison_writes_every_file_and_resumes_without_retraining(tiny_federation, tmp_path):
    out = tmp_path / "cmp"
    assert cmp.main(_argv(tiny_federation, out, "CT-weak")) == 0
    _check_outputs(out, ["CT-weak"])
    first = json.loads((layout.run_dir(out, layout.Method("CT-weak", "CT-weak")) / "compare.json").read_text())
    assert "--strategy CT-weak" in first["train_command"]
    # a later call with more methods trains only the new one (a Flower federation)
    assert cmp.main(_argv(tiny_federation, out, "CT-weak,FedAvg+full")) == 0
    again = json.loads((layout.run_dir(out, layout.Method("CT-weak", "CT-weak")) / "compare.json").read_text())
    assert again == first, "a finished method was trained again"
    _check_outputs(out, ["CT-weak", "FedAvg + full objective"])
    with open(out / "comparison.csv", newline="") as f:
        models = {r["method"]: r["model"] for r in csv.DictReader(f)}
    assert models == {"CT-weak": "global", "FedAvg + full objective": "global"}
    # a call for one method still reports every method tested in the folder
    assert cmp.main(_argv(tiny_federation, out, "CT-weak")) == 0
    _check_outputs(out, ["CT-weak", "FedAvg + full objective"])


@pytest.mark.slow
@heavy("a Flower federation per method (test_fedlppa.py runs the same server and sites in "
       "one process)")
def test_fedlppa_trains_and_is_scored_on_the_synthetic_federation(tiny_federation, tmp_path):
    """The added method as a real Flower federation through the comparison, each site's own
    model scored by test_client.py."""
    out = tmp_path / "lppa"
    assert cmp.main(_argv(tiny_federation, out, "FedLPPA")) == 0
    _check_outputs(out, ["FedLPPA"])
    with open(out / "comparison.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {r["model"] for r in rows} == {"personal"}
    assert all(0.0 <= float(r["dice_mean"]) <= 1.0 for r in rows)
    config = (layout.run_dir(out, layout.Method("FedLPPA", "FedLPPA")) / "config.toml").read_text()
    assert 'model = "unet_lppa"' in config and 'strategy = "FedLPPA"' in config


@heavy("every method end to end takes minutes")
def test_every_method_end_to_end(tiny_federation, tmp_path):
    out = tmp_path / "all"
    assert cmp.main(_argv(tiny_federation, out, "all")) == 0
    _check_outputs(out, [m.label for m in layout.all_methods()])


def test_best_baseline_leaves_out_fedicra_the_ablation_and_the_references(tmp_path, capsys):
    rows = []
    for method, dice in (("FedICRA", 0.95), ("FedAvg + full objective", 0.93), ("CT-full", 0.99),
                         ("CT-weak", 0.92), ("FedBN", 0.80), ("FedAvg", 0.70)):
        rows.append({"method": method, "site": "mean of sites", "target": "faz", "dice_mean": dice})
        rows.append({"method": method, "site": "client0", "target": "faz", "dice_mean": 1.0 - dice})
    report.write_csv(tmp_path / "comparison.csv", rows)
    assert report.best_baseline(tmp_path) == "FedBN"
    assert cmp.main(["--best-baseline", str(tmp_path)]) == 0
    assert capsys.readouterr().out.strip() == "FedBN"


# ---------------------------------------------------------------------- several seeds
def test_seeds_select_the_per_seed_layout_and_commands(tmp_path):
    args = cmp.parse_args(["--out", str(tmp_path), "--task", "faz", "--seeds", "2022, 2023,2024"])
    assert args.seeds == [2022, 2023, 2024] and args.seed is None
    fedrep = layout.select_methods("FedRep")[0]
    train = cmp.train_command(args, fedrep, port=20000, seed=2023)
    assert train[train.index("--seed") + 1] == "2023"
    assert train[train.index("--exp") + 1] == "FedRep_seed2023"
    assert train[train.index("--out_root") + 1] == str((tmp_path / "runs").resolve())
    test = cmp.test_command(args, fedrep, seed=2023)
    assert test[test.index("--exp") + 1] == "FedRep_seed2023"
    assert layout.run_dir(tmp_path, fedrep, 2023) == tmp_path / "runs" / "FedRep_seed2023"
    # one seed keeps the single-seed layout: runs/<method>/, as --seed does
    one = cmp.parse_args(["--out", str(tmp_path), "--task", "faz", "--seeds", "7"])
    assert one.seeds is None and one.seed == 7
    train = cmp.train_command(one, fedrep, port=20000)
    assert train[train.index("--exp") + 1] == "FedRep" and train[train.index("--seed") + 1] == "7"
    with pytest.raises(SystemExit):
        cmp.parse_args(["--out", str(tmp_path), "--task", "faz", "--seed", "1", "--seeds", "1,2"])
    with pytest.raises(SystemExit, match="--seeds"):
        cmp.parse_args(["--out", str(tmp_path), "--task", "faz", "--seeds", "1,1"])


def fake_run(folder: Path, dice, seed=None, train_seconds=60.0):
    """A finished run folder as compare_strategies and test_client.py leave it: ``dice`` maps
    (client, case) to the case's test Dice (target faz); HD95 is 10 x (1 - Dice)."""
    import test_client

    folder.mkdir(parents=True)
    rows = []
    for (client, case), d in sorted(dice.items()):
        metrics = {m: d for m in test_client.METRIC_NAMES}
        metrics["hd95"] = 10.0 * (1.0 - d)
        rows.append({"run": str(folder), "client": client, "model": "personal",
                     "checkpoint": "best.pt", "round": 2, "val_dice": 0.5, "case": case,
                     "target": "faz", **metrics})
    test_client.write_csv(folder / "test" / "result.csv", rows)
    test_client.write_csv(folder / "test" / "mean_std_result.csv", test_client.summarise(rows))
    (folder / "compare.json").write_text(json.dumps({"train_seconds": train_seconds,
                                                     "total_seconds": train_seconds + 5}))
    if seed is not None:
        (folder / "config.toml").write_text(f"seed = {seed}\n")
    with open(folder / "metrics.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["round", "client", "val_dice", "val_dice_global"])
        writer.writeheader()
        for r in (1, 2, 3):
            for c in (0, 1):
                level = sum(dice.values()) / len(dice) * r / 3  # differs by method and seed
                writer.writerow({"round": r, "client": c, "val_dice": level,
                                 "val_dice_global": level})


def write_snapshot(argv, label, seed=None, **sets):
    """The configuration snapshot ``compare_strategies argv`` would give the run of ``label``
    (and ``seed``, one of several), with ``sets`` changed, in that run's folder."""
    from configs import save_config
    from configs.layers import absolute_paths, resolve_layers
    from flower_runner import parse_args

    args = cmp.parse_args(argv)
    method = layout.select_methods(label)[0]
    train = cmp.train_command(args, method, 0, seed)
    cfg = absolute_paths(resolve_layers(parse_args(train[2:]))[0])
    for key, value in sets.items():
        setattr(cfg, key, value)
    save_config(cfg, layout.run_dir(Path(args.out), method, seed) / "config.toml")


CASES = [(c, f"case{i:03d}") for c in range(3) for i in range(4)]


def fabricate(out: Path, seeds=(1, 2, 3), methods=("FedICRA", "FedRep"), same=False):
    """Runs of ``methods`` x ``seeds`` in ``out`` with random per-case Dice (identical for
    every method with ``same``); returns {method: {seed: {(client, case): dice}}}."""
    import numpy as np

    rng = np.random.default_rng(0)
    values = {}
    for k, label in enumerate(methods):
        method = layout.select_methods(label)[0]
        values[label] = {}
        for seed in seeds:
            dice = dict(values[methods[0]][seed]) if same and k else \
                {key: float(rng.uniform(0.2 + 0.3 * (label == "FedICRA"), 1.0)) for key in CASES}
            values[label][seed] = dict(dice)
            fake_run(layout.run_dir(out, method, seed), dice, train_seconds=60.0 * seed)
    return values


def _rows(path: Path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_several_seeds_report_mean_and_std_over_the_seeds(tmp_path):
    import numpy as np

    values = fabricate(tmp_path)
    methods = layout.select_methods("FedICRA,FedRep")
    files = report.write_reports(tmp_path, methods, "fabricated", seeds=[1, 2, 3])
    assert all(f.is_file() and f.stat().st_size > 0 for f in files)
    rows = {(r["method"], r["site"]): r for r in _rows(tmp_path / "comparison.csv")}
    assert {r["target"] for r in rows.values()} == {"faz"}
    for label in ("FedICRA", "FedRep"):
        per_seed = values[label]
        site_means = {s: {c: np.mean([d for (cc, _), d in per_seed[s].items() if cc == c])
                          for c in range(3)} for s in per_seed}
        expected = {f"client{c}": [site_means[s][c] for s in per_seed] for c in range(3)}
        expected["mean of sites"] = [np.mean(list(site_means[s].values())) for s in per_seed]
        expected["pooled"] = [np.mean(list(per_seed[s].values())) for s in per_seed]
        for site, seed_values in expected.items():
            row = rows[(label, site)]
            assert float(row["dice_mean"]) == pytest.approx(np.mean(seed_values)), (label, site)
            assert float(row["dice_std"]) == pytest.approx(np.std(seed_values, ddof=1)), \
                (label, site)
            hd95 = [10 * (1 - v) for v in seed_values]
            assert float(row["hd95_mean"]) == pytest.approx(np.mean(hd95))
            assert float(row["hd95_std"]) == pytest.approx(np.std(hd95, ddof=1))
            assert row["seeds"] == "1 2 3"
            assert row["cases"] == ("4" if site.startswith("client") else "12")
            assert float(row["train_seconds"]) == pytest.approx(120.0)  # mean per seed
    # the per-seed values stay available
    per_seed_rows = _rows(tmp_path / "comparison_per_seed.csv")
    assert len(per_seed_rows) == 2 * 3 * 5  # methods x seeds x (3 sites, mean of sites, pooled)
    mine = {(r["method"], r["seed"], r["site"]): r for r in per_seed_rows}
    assert float(mine[("FedRep", "2", "client1")]["dice_mean"]) == pytest.approx(
        np.mean([d for (c, _), d in values["FedRep"][2].items() if c == 1]))
    table = (tmp_path / "comparison.md").read_text()
    fedrep = rows[("FedRep", "mean of sites")]
    cell = f"**{float(fedrep['dice_mean']):.3f} ± {float(fedrep['dice_std']):.3f}**"
    assert cell in table and "mean ± std over the seeds (1, 2, 3)" in table
    assert "| method | tested | site 0 | site 1 | site 2 | mean of sites |" in table


def test_a_run_that_lost_site_replies_is_counted_and_marked(tmp_path):
    """A round aggregated without a site (metrics.csv ``missing = 1``) makes the run depend on
    the machine's load: the row counts the lost replies and comparison.md marks it."""
    fabricate(tmp_path)
    folder = layout.run_dir(tmp_path, layout.select_methods("FedRep")[0], 2)
    rows = _rows(folder / "metrics.csv")
    for r in rows:
        r["missing"] = int(r["client"] == "1" and r["round"] in ("2", "3"))
    with open(folder / "metrics.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    assert report.lost_replies(folder) == 2
    report.write_reports(tmp_path, layout.select_methods("FedICRA,FedRep"), "fabricated", seeds=[1, 2, 3])
    lost = {(r["method"], r["site"]): r["lost_replies"] for r in _rows(tmp_path / "comparison.csv")}
    assert lost[("FedRep", "mean of sites")] == "2" and lost[("FedICRA", "mean of sites")] == "0"
    per_seed = {(r["method"], r["seed"]): r["lost_replies"]
                for r in _rows(tmp_path / "comparison_per_seed.csv") if r["site"] == "pooled"}
    assert per_seed[("FedRep", "2")] == "2" and per_seed[("FedRep", "1")] == "0"
    table = (tmp_path / "comparison.md").read_text()
    assert "| FedRep ⚠2 | personal |" in table and "| FedICRA | personal |" in table
    assert "⚠N: the run (over the seeds: the runs) trained without N site replies" in table


def test_several_seeds_resume_runs_only_the_missing_method_and_seed(tmp_path, monkeypatch):
    import shutil

    values = fabricate(tmp_path)
    fedrep = layout.select_methods("FedRep")[0]
    shutil.rmtree(layout.run_dir(tmp_path, fedrep, 3) / "test")  # a half-finished run
    trained = []

    def fake_run_method(args, method, seed=None):
        trained.append((method.label, seed))
        shutil.rmtree(layout.run_dir(tmp_path, method, seed))
        fake_run(layout.run_dir(tmp_path, method, seed), values[method.label][seed])
        return {"total_seconds": 1.0}

    monkeypatch.setattr(cmp, "run_method", fake_run_method)
    argv = ["--task", "faz", "--methods", "FedICRA,FedRep", "--seeds", "1,2,3",
            "--out", str(tmp_path)]
    assert cmp.main(argv) == 0
    assert trained == [("FedRep", 3)]
    assert cmp.main(argv) == 0 and trained == [("FedRep", 3)]
    rows = _rows(tmp_path / "comparison.csv")
    assert {r["seeds"] for r in rows} == {"1 2 3"}
    assert {r["method"] for r in rows} == {"FedICRA", "FedRep"}


def test_report_only_trains_nothing_and_names_what_it_leaves_out(tmp_path, monkeypatch, caplog):
    import shutil

    fabricate(tmp_path)
    shutil.rmtree(layout.run_dir(tmp_path, layout.select_methods("FedRep")[0], 3) / "test")

    def no_training(*args, **kwargs):
        raise AssertionError("--report-only trained a run")

    monkeypatch.setattr(cmp, "run_method", no_training)
    with caplog.at_level(logging.WARNING):
        assert cmp.main(["--task", "faz", "--methods", "FedICRA,FedRep", "--seeds", "1,2,3",
                         "--out", str(tmp_path), "--report-only"]) == 0
    assert "no finished run of FedRep seed 3, left out of the reports" in caplog.text
    seeds = {r["method"]: r["seeds"] for r in _rows(tmp_path / "comparison.csv")}
    assert seeds == {"FedICRA": "1 2 3", "FedRep": "1 2"}


def test_several_seeds_train_seed_by_seed(tmp_path, monkeypatch):
    """Every method's first seed before any method's second: an interrupted comparison leaves
    whole seeds."""
    trained = []

    def fake_run_method(args, method, seed=None):
        trained.append((method.label, seed))
        fake_run(layout.run_dir(tmp_path, method, seed), {key: 0.5 for key in CASES}, seed=seed)
        return {"total_seconds": 1.0}

    monkeypatch.setattr(cmp, "run_method", fake_run_method)
    assert cmp.main(["--task", "faz", "--methods", "FedICRA,FedRep", "--seeds", "1,2",
                     "--out", str(tmp_path)]) == 0
    assert trained == [("FedICRA", 1), ("FedRep", 1), ("FedICRA", 2), ("FedRep", 2)]


def test_one_seed_refuses_a_folder_holding_another_seeds_runs(tmp_path, monkeypatch, capsys):
    """``--seeds 2023`` (one seed: the single-seed layout) on a DIR whose runs/<method>/ holds a
    finished seed-2022 run must not report that run as seed 2023, nor overwrite it; the error
    says which command adds the seed."""
    fake_run(layout.run_dir(tmp_path, layout.select_methods("FedRep")[0]),
             {key: 0.5 for key in CASES}, seed=2022)
    write_snapshot(["--task", "faz", "--seed", "2022", "--out", str(tmp_path)], "FedRep")
    trained = []
    monkeypatch.setattr(cmp, "run_method", lambda args, method, seed=None: trained.append(method))
    for flag in (["--seeds", "2023"], ["--seed", "2023"]):
        with pytest.raises(SystemExit, match=r"FedRep \(seed: 2022 -> 2023\).*--seeds 2022,2023"):
            cmp.main(["--task", "faz", "--methods", "FedICRA", *flag, "--out", str(tmp_path)])
    assert trained == [] and not (tmp_path / "comparison.csv").exists()
    # the same seed is the finished run: skipped, reported
    assert cmp.main(["--task", "faz", "--methods", "FedRep", "--seed", "2022",
                     "--out", str(tmp_path)]) == 0
    assert trained == [] and {r["method"] for r in _rows(tmp_path / "comparison.csv")} == {"FedRep"}


def test_a_finished_run_of_another_configuration_stops_the_call(tmp_path, monkeypatch):
    """A finished run is skipped only when its snapshot is what the call would train: with
    another --rounds (or --set, configuration, code default) the call stops before training
    and names the run and key; keys that change no computed value (RUN_ONLY_KEYS: the deadline,
    the paths, ...) do not count."""
    argv = ["--task", "faz", "--methods", "FedRep", "--rounds", "3", "--out", str(tmp_path)]
    fake_run(layout.run_dir(tmp_path, layout.select_methods("FedRep")[0]), {key: 0.5 for key in CASES})
    write_snapshot(argv, "FedRep", round_timeout=99.0, out_root="/elsewhere", port=1234)
    trained = []
    monkeypatch.setattr(cmp, "run_method", lambda args, method, seed=None: trained.append(method))
    assert cmp.main(argv) == 0 and trained == []  # the same run: skipped, reported
    assert (tmp_path / "comparison.csv").is_file()
    longer = [a if a != "3" else "4" for a in argv]
    with pytest.raises(SystemExit, match=r"runs/FedRep \(rounds: 3 -> 4\).*another --out"):
        cmp.main(longer)
    with pytest.raises(SystemExit, match=r"base_lr: 0.01 -> 0.02"):
        cmp.main(argv + ["--set", "base_lr=0.02"])
    assert trained == []


def test_paired_wilcoxon_against_fedicra_on_case_dice_averaged_over_seeds(tmp_path):
    import numpy as np
    from scipy.stats import wilcoxon

    values = fabricate(tmp_path, seeds=(1, 2))
    report.write_reports(tmp_path, layout.select_methods("FedRep,FedICRA"), "fabricated", seeds=[1, 2])
    rows = {(r["method"], r["site"]): r for r in _rows(tmp_path / "comparison.csv")}
    avg = {m: {key: np.mean([values[m][s][key] for s in (1, 2)]) for key in CASES}
           for m in ("FedICRA", "FedRep")}
    for site, keys in (("pooled", CASES), ("mean of sites", CASES),
                       ("client2", [k for k in CASES if k[0] == 2])):
        by_hand = wilcoxon([avg["FedRep"][k] for k in keys], [avg["FedICRA"][k] for k in keys])
        row = rows[("FedRep", site)]
        assert float(row["wilcoxon_p"]) == pytest.approx(by_hand.pvalue), site
        assert int(row["wilcoxon_pairs"]) == len(keys) and row["wilcoxon_ref"] == "FedICRA"
    assert all(rows[("FedICRA", s)]["wilcoxon_p"] == "" for s in ("pooled", "client0"))
    table = (tmp_path / "comparison.md").read_text()
    assert "p vs FedICRA" in table and "averaging each test case's Dice over the seeds" in table
    pooled_p = float(rows[("FedRep", "pooled")]["wilcoxon_p"])
    assert f"| {pooled_p:.3g} (n=12) |" in table


def test_differences_to_fedicra_paired_by_seed(tmp_path):
    """Several seeds: each row's Dice minus FedICRA's, seed by seed; mean, sample std and the
    number of seeds where the row is above, checked by hand for the mean of sites and a site."""
    import numpy as np

    values = fabricate(tmp_path, seeds=(1, 2, 3))
    report.write_reports(tmp_path, layout.select_methods("FedICRA,FedRep"), "fabricated",
                      seeds=[1, 2, 3])
    rows = {(r["method"], r["site"]): r for r in _rows(tmp_path / "comparison.csv")}

    def site_mean(method, seed, site):
        return np.mean([d for (c, _), d in values[method][seed].items() if c == site])

    def mean_of_sites(method, seed):
        return np.mean([site_mean(method, seed, c) for c in range(3)])

    for site, value in (("mean of sites", mean_of_sites),
                        ("client1", lambda m, s: site_mean(m, s, 1))):
        diffs = [value("FedRep", s) - value("FedICRA", s) for s in (1, 2, 3)]
        row = rows[("FedRep", site)]
        assert float(row["seed_delta_mean"]) == pytest.approx(np.mean(diffs))
        assert float(row["seed_delta_std"]) == pytest.approx(np.std(diffs, ddof=1))
        assert row["seed_delta_above"] == f"{sum(d > 0 for d in diffs)}/3"
    assert rows[("FedICRA", "mean of sites")]["seed_delta_mean"] == ""
    diffs = [mean_of_sites("FedRep", s) - mean_of_sites("FedICRA", s) for s in (1, 2, 3)]
    cell = (f"{np.mean(diffs):+.3f} ± {np.std(diffs, ddof=1):.3f} "
            f"({sum(d > 0 for d in diffs)}/3 above)")
    table = (tmp_path / "comparison.md").read_text()
    assert "Δ vs FedICRA, by seed" in table and f"| {cell} |" in table


def test_wilcoxon_all_zero_differences_and_the_first_method_as_reference(tmp_path):
    fabricate(tmp_path, seeds=(1, 2), methods=("FedRep", "FedBN"), same=True)
    report.write_reports(tmp_path, layout.select_methods("FedRep,FedBN"), "fabricated", seeds=[1, 2])
    rows = {(r["method"], r["site"]): r for r in _rows(tmp_path / "comparison.csv")}
    assert rows[("FedBN", "pooled")]["wilcoxon_p"] == "1.0"
    assert rows[("FedBN", "pooled")]["wilcoxon_ref"] == "FedRep"
    assert rows[("FedRep", "pooled")]["wilcoxon_p"] == ""
    table = (tmp_path / "comparison.md").read_text()
    assert "p vs FedRep" in table and "the reference is FedRep, the first method" in table
    same = {(0, "a", "faz"): 0.5, (0, "b", "faz"): 0.7}
    assert report.paired_wilcoxon(same, dict(same)) == (1.0, 2)
    assert report.paired_wilcoxon(same, {}) == (pytest.approx(float("nan"), nan_ok=True), 0)


def test_single_seed_comparison_keeps_its_layout_and_gains_the_p_column(tmp_path):
    """One seed: runs/<method>/, std over cases; with several seeds a finished single-seed
    folder of the same seed is reused instead of trained again."""
    import numpy as np

    rng = np.random.default_rng(1)
    for label in ("FedICRA", "FedRep"):
        fake_run(layout.run_dir(tmp_path, layout.select_methods(label)[0]),
                 {key: float(rng.uniform(0, 1)) for key in CASES}, seed=2022)
    report.write_reports(tmp_path, layout.select_methods("FedICRA,FedRep"), "fabricated")
    assert not (tmp_path / "comparison_per_seed.csv").exists()
    rows = {(r["method"], r["site"]): r for r in _rows(tmp_path / "comparison.csv")}
    assert rows[("FedRep", "pooled")]["seeds"] == "2022"
    assert int(rows[("FedRep", "pooled")]["wilcoxon_pairs"]) == 12
    assert 0.0 <= float(rows[("FedRep", "pooled")]["wilcoxon_p"]) <= 1.0
    assert rows[("FedRep", "pooled")]["seed_delta_mean"] == ""  # one seed: no seed pairing
    assert "by seed" not in (tmp_path / "comparison.md").read_text()
    fedicra = layout.select_methods("FedICRA")[0]
    assert layout.result_dir(tmp_path, fedicra, 2022) == layout.run_dir(tmp_path, fedicra)
    assert not layout.is_done(tmp_path, fedicra, 2023)


SEEDS_METHODS = "FedICRA,FedICRA-ref,FedRep"


@pytest.mark.slow
def test_seeds_from_one_command_end_to_end(tiny_federation, tmp_path):
    """``--seeds 1,2``: every method once per seed, mean ± std over the two seeds, a p-value."""
    out = tmp_path / "seeds"
    argv = ["--task", "synthetic_faz", "--root_path", str(tiny_federation), "--methods",
            SEEDS_METHODS, "--seeds", "1,2", "--rounds", "1", "--iters", "1", "--img_size", "32",
            "--num_clients", "3", "--set", "base_channels=4", "--set", "aux_channels=8",
            "--set", "batch_size=2", "--out", str(out)]
    assert cmp.main(argv) == 0
    labels = [m.label for m in layout.select_methods(SEEDS_METHODS)]
    records = {(m.label, seed): (layout.run_dir(out, m, seed) / "compare.json").read_text()
               for m in layout.select_methods(SEEDS_METHODS) for seed in (1, 2)}
    for (_, seed), record in records.items():
        assert f"--seed {seed}" in json.loads(record)["train_command"]
    _check_outputs(out, labels)
    per_seed = {(r["method"], r["site"], r["seed"]): float(r["dice_mean"])
                for r in _rows(out / "comparison_per_seed.csv")}
    for r in _rows(out / "comparison.csv"):
        pair = [per_seed[(r["method"], r["site"], s)] for s in ("1", "2")]
        assert r["seeds"] == "1 2"
        assert float(r["dice_mean"]) == pytest.approx(sum(pair) / 2)
        assert float(r["dice_std"]) == pytest.approx(abs(pair[0] - pair[1]) / 2 ** 0.5)
        if r["method"] == "FedICRA":
            assert r["wilcoxon_p"] == ""
        elif r["site"] == "pooled":
            assert 0.0 <= float(r["wilcoxon_p"]) <= 1.0 and r["wilcoxon_pairs"] == "6"
    assert "p vs FedICRA" in (out / "comparison.md").read_text()
    assert cmp.main(argv) == 0  # every method and seed is done: nothing is trained again
    assert records == {(m.label, seed): (layout.run_dir(out, m, seed) / "compare.json").read_text()
                       for m in layout.select_methods(SEEDS_METHODS) for seed in (1, 2)}


def test_a_resumed_run_counts_the_train_time_of_its_earlier_sittings(tmp_path, monkeypatch):
    """The train time of a resumed run adds the completed rounds of its earlier sittings
    (``timing.csv``, up to the round it resumes after) to this call's; a run whose training
    had finished takes all of them; a run without the file counts this call only."""
    fedrep = layout.select_methods("FedRep")[0]
    args = cmp.parse_args(["--task", "faz", "--methods", "FedRep", "--out", str(tmp_path)])
    folder = layout.run_dir(tmp_path, fedrep)
    folder.mkdir(parents=True)
    (folder / "timing.csv").write_text("round,seconds\n1,30.0\n2,40.0\n3,50.0\n")
    assert cmp.earlier_train_seconds(folder, None) == 0.0   # a fresh run
    assert cmp.earlier_train_seconds(folder, 2) == 70.0     # resumed after round 2
    assert cmp.earlier_train_seconds(folder, -1) == 120.0   # trained: only the test is left
    assert cmp.earlier_train_seconds(tmp_path, 2) is None   # no timing.csv

    calls = []
    monkeypatch.setattr(cmp, "resumable_round", lambda train, run: 2)
    monkeypatch.setattr(cmp.subprocess, "call", lambda cmd, **kw: calls.append(cmd) or 0)
    record = cmp.run_method(args, fedrep)
    assert "--resume" in calls[0] and calls[1][1] == "test_client.py"
    assert record["resumed_after_round"] == 2 and record["earlier_train_seconds"] == 70.0
    assert 70.0 <= record["train_seconds"] < 70.0 + record["total_seconds"] + 1e-6
    assert json.loads((folder / "compare.json").read_text())["train_seconds"] == \
        record["train_seconds"]


def test_an_interrupted_run_of_the_same_configuration_is_resumed_not_retrained(
        tiny_federation, tmp_path):
    """``resumable_round`` reads the run folder: its last completed round when the snapshot is
    the configuration the fresh command would train, -1 once its training has finished, None
    otherwise (nothing there, another configuration, a centralised method)."""
    from configs import save_config
    from configs.layers import absolute_paths, resolve_layers
    from flower_runner import parse_args
    from networks.checkpoint import run_meta, save_atomic

    args = cmp.parse_args(_argv(tiny_federation, tmp_path / "cmp", "FedRep"))
    fedrep = layout.select_methods("FedRep")[0]
    train = cmp.train_command(args, fedrep, port=20000)
    folder = layout.run_dir(Path(args.out), fedrep)
    assert cmp.resumable_round(train, folder) is None  # nothing there

    cfg = absolute_paths(resolve_layers(parse_args(train[2:]))[0])
    save_config(cfg, folder / "config.toml")
    assert cmp.resumable_round(train, folder) is None  # no completed round
    latest = {"round": 1, "arrays": {}, "strategy": {}, "meta": run_meta(cfg, None)}
    save_atomic(latest, folder / "global" / "latest.pt")
    assert cmp.resumable_round(train, folder) == 1
    other = cmp.train_command(cmp.parse_args(_argv(tiny_federation, tmp_path / "cmp", "FedRep")
                                             + ["--seed", "5"]), fedrep, port=20000)
    assert cmp.resumable_round(other, folder) is None  # another seed: trained again
    save_atomic({**latest, "round": 2, "finished": True}, folder / "global" / "latest.pt")
    assert cmp.resumable_round(train, folder) == -1  # trained: only the test is left

    ct = layout.select_methods("CT-weak")[0]
    ct_train = cmp.train_command(args, ct, port=20000)
    ct_folder = layout.run_dir(Path(args.out), ct)
    ct_cfg = absolute_paths(resolve_layers(parse_args(ct_train[2:]))[0])
    save_config(ct_cfg, ct_folder / "config.toml")
    save_atomic({**latest, "meta": run_meta(ct_cfg, None)}, ct_folder / "global" / "latest.pt")
    assert cmp.resumable_round(ct_train, ct_folder) is None  # centralised: no rounds to resume
