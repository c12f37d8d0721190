"""Load: synthetic federations of any number of sites, and a 10-client deployment.

``python -m dataloaders.synthetic --sites K`` writes ``Domain1..DomainK``; the synthetic tasks
then have ``K`` sites (``get_task(name, root)`` counts them), so preflight, trainers and the
test script follow the data. The slow test runs 10 clients x 2 rounds in deployment mode
(RSS per process over 40 rounds: ``benchmarks/bench_rss.py``, docs/benchmarks.md).
"""
from __future__ import annotations

import csv
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

import flower_runner
from conftest import free_base
from dataloaders import synthetic
from dataloaders.tasks import domains_in, get_task

REPO = Path(__file__).resolve().parents[1]


def test_sites_flag_writes_k_sites_and_the_task_follows_the_data(tmp_path, capsys):
    small = ["--task", "faz", "--size", "32", "--train-per-site", "1", "--test-per-site", "1"]
    five, seven = tmp_path / "five", tmp_path / "seven"
    assert synthetic.main([*small, "--out", str(five)]) == 0
    assert synthetic.main([*small, "--out", str(seven), "--sites", "7"]) == 0
    assert "wrote 14 cases" in capsys.readouterr().out
    assert (domains_in(five), domains_in(seven)) == (5, 7)
    task = get_task("synthetic_faz", seven)
    assert task.num_sites == 7 and get_task("synthetic_faz").num_sites == 5
    assert task.site(5).weak_form == task.site(0).weak_form and task.site(5).name == "FAZID #2"
    assert get_task("faz", seven).num_sites == 5  # real tasks keep their declared sites
    meta = json.loads((seven / synthetic.METADATA_NAME).read_text())
    assert [s["domain"] for s in meta["sites"]] == [f"Domain{k}" for k in range(1, 8)]
    # the first five sites do not depend on how many there are
    for rel in ("Domain1/train/d1_train_0000.h5", "Domain5/test/d5_test_0000.h5"):
        assert (five / rel).read_bytes() == (seven / rel).read_bytes()
    # a smaller regeneration removes the extra site folders
    assert synthetic.main([*small, "--out", str(seven), "--sites", "5"]) == 0
    assert domains_in(seven) == 5 and not (seven / "Domain6").exists()
    assert synthetic.main([*small, "--out", str(seven), "--sites", "0"]) == 2


def test_more_clients_than_sites_names_the_generator_flag(tmp_path, capsys):
    data = tmp_path / "six"
    assert synthetic.main(["--task", "faz", "--size", "32", "--train-per-site", "5",
                           "--test-per-site", "1", "--out", str(data), "--sites", "6"]) == 0
    flags = ["--img_class", "synthetic_faz", "--root_path", str(data), "--mode", "simulation",
             "--out_root", str(tmp_path / "model"), "--rounds", "1", "--iters", "2",
             "--rep_iters", "1"]
    assert flower_runner.main([*flags, "--num_clients", "7"]) == 2
    line = [x for x in capsys.readouterr().out.splitlines() if "error" in x][0]
    assert "--num_clients: 7 clients but task 'synthetic_faz' has 6 sites" in line
    assert "python -m dataloaders.synthetic --sites 7" in line
    import preflight
    from configs import RunConfig

    cfg = RunConfig(img_class="synthetic_faz", root_path=str(data), num_clients=6).validate()
    preflight.check_names(cfg)
    assert sorted(preflight.count_cases(cfg)) == list(range(6))


@pytest.mark.slow
def test_ten_clients_in_deployment_mode(tmp_path):
    clients = 10
    data = tmp_path / "data"
    assert synthetic.main(["--task", "faz", "--size", "32", "--train-per-site", "4",
                           "--test-per-site", "1", "--seed", "1", "--out", str(data),
                           "--sites", str(clients)]) == 0
    cmd = [sys.executable, "flower_runner.py", "--mode", "deployment", "--img_class",
           "synthetic_faz", "--root_path", str(data), "--num_clients", str(clients), "--rounds",
           "2", "--iters", "2", "--rep_iters", "1", "--batch_size", "2", "--procedure", "pce",
           "--img_size", "32", "--set", "base_channels=4", "--set", "aux_channels=8", "--set",
           "ala_max_epochs=2", "--port", str(free_base(2 * clients + 2)), "--out_root",
           str(tmp_path / "model"), "--exp", "ten", "--stop-timeout", "5"]
    started = time.monotonic()
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=400)
    took = time.monotonic() - started
    out = tmp_path / "model" / "ten"
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    with open(out / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert sorted((int(r["round"]), int(r["client"])) for r in rows) == \
        [(r, k) for r in (1, 2) for k in range(clients)]
    from deployment.processes import recorded_pids

    pids = recorded_pids(out / "pids.json")
    assert {f"worker{k}" for k in range(clients)} <= set(pids)
    print(f"10 clients x 2 rounds: {took:.0f} s")  # about 90 s on the shared 2-core machine
