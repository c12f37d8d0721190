"""End to end: the seed README's train and test commands in simulation mode on a tiny federation."""
import csv
import subprocess
import sys
from pathlib import Path

import pytest

import flower_runner
from configs import load_config
from conftest import SEED_TRAIN, free_base

REPO = Path(__file__).resolve().parents[1]

def test_seed_train_flags_resolve_to_the_reference_setup():
    cfg = flower_runner.resolve_config(flower_runner.parse_args(SEED_TRAIN))
    assert (cfg.strategy, cfg.model, cfg.img_class, cfg.exp) == ("FedICRA", "unet_lc_multihead", "faz", "faz/WeaklySeg_pCE")
    assert (cfg.rounds, cfg.iters, cfg.params.rep_iters, cfg.batch_size) == (3000, 10, 3, 12)
    assert cfg.base_lr == 0.01 and cfg.alpha == 1.0 and cfg.gpus == [0, 1, 2, 3, 4, 5]
    assert cfg.procedure == "flower_pCE_2D_GateCRFMsacleTreeEnergyLoss_Ours"


def test_cli_errors_name_the_key(tmp_path, capsys):
    assert flower_runner.main(["--set", "no_such_key=1", "--out_root", str(tmp_path)]) == 2
    assert "no_such_key" in capsys.readouterr().out
    bad = tmp_path / "bad.toml"
    bad.write_text("rounds = 'many'\n")
    assert flower_runner.main(["--config", str(bad)]) == 2
    assert "rounds" in capsys.readouterr().out
    assert flower_runner.main(["--rep_iters", "20", "--iters", "10"]) == 2


@pytest.mark.slow
def test_simulation_run_writes_every_output_and_test_client_reads_them(tiny_federation, tmp_path):
    out_root = tmp_path / "model"
    overrides = ["--img_class", "synthetic_faz", "--root_path", str(tiny_federation), "--out_root",
                 str(out_root), "--num_clients", "3", "--rounds", "2", "--iters", "2", "--rep_iters", "1",
                 "--batch_size", "2", "--mode", "simulation", "--eval_every", "1", "--set", "base_channels=4",
                 "--set", "aux_channels=8", "--set", "ala_max_epochs=2", "--set", "tb_images_every=1",
                 "--port", str(free_base(1))]
    run = subprocess.run([sys.executable, "flower_runner.py", *SEED_TRAIN, "--gpus", *overrides],
                         cwd=REPO, capture_output=True, text=True, timeout=600)  # GPU ids: none
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "round 2/2 | clients 3/3" in run.stdout
    logs = " ".join(p.read_text() for p in (out_root / "faz" / "WeaklySeg_pCE" / "logs").glob("*.log"))
    assert "deprecat" not in (run.stdout + run.stderr + logs).lower(), "a deprecated Flower API ran"
    exp = out_root / "faz" / "WeaklySeg_pCE"
    cfg = load_config(exp / "config.toml")
    assert cfg.img_class == "synthetic_faz" and cfg.rounds == 2
    for name in ("global/latest.pt", "metrics.csv"):
        assert (exp / name).is_file(), name
    assert not (exp / "global" / "best.pt").exists(), "FedICRA deploys personalised models"
    for k in range(3):
        assert (exp / f"client{k}" / "best.pt").is_file() and (exp / f"client{k}" / "latest.pt").is_file()
        assert list((exp / "tb" / f"client{k}").glob("events.out.tfevents.*"))
    assert list((exp / "tb" / "server").glob("events.out.tfevents.*"))
    with open(exp / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted((int(r["round"]), int(r["client"])) for r in rows) == [(r, c) for r in (1, 2) for c in range(3)]
    for r in rows:
        assert float(r["pce"]) >= 0 and float(r["tree"]) >= 0 and float(r["crf"]) >= 0
        assert r["sc"] != "" and 0 <= float(r["val_dice"]) <= 1

    test = subprocess.run(
        [sys.executable, "test_client.py", "--client", "all", "--num_classes", "2", "--in_chns", "1",
         "--root_path", str(tiny_federation), "--img_class", "synthetic_faz", "--exp", "faz/WeaklySeg_pCE",
         "--out_root", str(out_root), "--min_num_clients", "3", "--model", "unet_lc_multihead"],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert test.returncode == 0, test.stdout[-3000:] + test.stderr[-3000:]
    with open(exp / "test" / "result.csv") as f:
        results = list(csv.DictReader(f))
    assert len(results) == 3 * 2  # 3 clients x 2 test cases, one target (FAZ)
    assert all(0 <= float(r["dice"]) <= 1 for r in results)
    assert (exp / "test" / "mean_std_result.csv").is_file()
    assert len(list((exp / "test" / "client1").glob("*_pred.nii.gz"))) == 2
    assert len(list((exp / "test" / "client1").glob("*_overlay.png"))) == 2
    seed_test = subprocess.run(  # the reference script name and flags, paths adapted
        [sys.executable, "-u", "test_client4onemod_FL_Personalize.py", "--client", "client0",
         "--num_classes", "2", "--in_chns", "1", "--root_path", str(tiny_federation), "--img_class",
         "synthetic_faz", "--exp", "faz/WeaklySeg_pCE/", "--out_root", str(out_root),
         "--min_num_clients", "3", "--cid", "0", "--model", "unet_lc_multihead",
         "--output", str(tmp_path / "seed_test")], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert seed_test.returncode == 0, seed_test.stdout[-3000:] + seed_test.stderr[-3000:]
    with open(tmp_path / "seed_test" / "result.csv") as f:
        assert {r["client"] for r in csv.DictReader(f)} == {"0"}
    single = subprocess.run(
        [sys.executable, "test_client.py", "--client", "client0", "--cid", "0", "--exp", "faz/WeaklySeg_pCE",
         "--out_root", str(out_root), "--img_class", "faz"], cwd=REPO, capture_output=True, text=True)
    assert single.returncode == 2 and "img_class" in single.stdout


@pytest.mark.slow
def test_one_ctrl_c_stops_a_simulation_with_130_and_leaves_nothing(tiny_federation, tmp_path):
    import signal
    import time

    from deployment.processes import group_members

    out_root = tmp_path / "model"
    out = out_root / "synthetic_faz" / "FedAvg"
    cmd = [sys.executable, "flower_runner.py", "--mode", "simulation", "--strategy", "FedAvg",
           "--img_class", "synthetic_faz", "--root_path", str(tiny_federation), "--out_root",
           str(out_root), "--num_clients", "3", "--rounds", "200", "--iters", "2", "--batch_size",
           "2", "--set", "base_channels=4", "--port", str(free_base(1))]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            rows = (out / "metrics.csv").read_text().splitlines()[1:] if (out / "metrics.csv").is_file() else []
            if len(rows) >= 3:
                break
            time.sleep(0.2)
        assert proc.poll() is None, "the run ended before round 1 was recorded"
        proc.send_signal(signal.SIGINT)
        sent = time.monotonic()
        stdout, _ = proc.communicate(timeout=60)
        took = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, stdout[-3000:]
    assert "Traceback" not in stdout and "interrupted by SIGINT" in stdout
    assert took < 30, f"stopping took {took:.0f} s"
    assert not list(out.rglob("*.tmp")), "partial files left behind"
    from deployment.processes import recorded_pids

    pids = recorded_pids(out / "pids.json")
    assert not [n for n, pid in pids.items() if group_members(pid)], "processes left running"
