"""Run-level resume: a run interrupted in the middle of a round and resumed ends exactly where
the same run without interruption ends (CPU: bit for bit), in the server's strategy state,
every site's trainer state and metrics.csv; what ``--resume`` refuses."""
from __future__ import annotations

import csv
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict

import numpy as np
import pytest
import torch

import flower_runner
from conftest import InProcessGrid, free_base, heavy, task_identity, tiny_run_config  # noqa: F401

REPO = Path(__file__).resolve().parents[1]
CLIENTS = 3
HEAVY = heavy("a minute or more of training")


class Interrupted(Exception):
    """Stands for Ctrl-C in the middle of a round."""


class InterruptingGrid(InProcessGrid):
    """Raises :class:`Interrupted` once ``after`` train messages of round ``at`` have been
    answered: those sites have finished the round, which the server never records."""

    def __init__(self, cfg, at: int, after: int):
        super().__init__(cfg)
        self.at, self.after = at, after

    def send_and_receive(self, messages, timeout=None):
        replies = []
        for msg in messages:
            config = msg.content["config"]
            done = sum(1 for op, r, *_ in self.traffic if op == "train" and r == self.at)
            if int(config["server-round"]) == self.at and done >= self.after:
                raise Interrupted(f"round {self.at}")
            replies += super().send_and_receive([msg], timeout)
        return replies


def load(path: Path):
    return torch.load(path, map_location="cpu", weights_only=True)


def flatten(state, prefix: str = "") -> Dict[str, np.ndarray]:
    """Every tensor, array and number of a (nested) checkpoint, by path."""
    out: Dict[str, np.ndarray] = {}
    if isinstance(state, dict):
        for k, v in state.items():
            out.update(flatten(v, f"{prefix}/{k}"))
    elif isinstance(state, (list, tuple)):
        for i, v in enumerate(state):
            out.update(flatten(v, f"{prefix}/{i}"))
    elif isinstance(state, torch.Tensor):
        out[prefix] = state.numpy()
    elif isinstance(state, np.ndarray):
        out[prefix] = state
    elif isinstance(state, (int, float, bool)) or state is None:
        out[prefix] = np.asarray(state if state is not None else np.nan)
    return out


def rows(out: Path):
    with open(out / "metrics.csv", newline="") as f:
        return [{k: v for k, v in r.items() if k != "seconds"} for r in csv.DictReader(f)]


def assert_same_run(resumed: Path, reference: Path, clients: int = CLIENTS) -> None:
    """Global checkpoint (aggregate, strategy and reporter state), every site's trainer state
    and metrics.csv (all but the timings) identical; each (round, client) row once."""
    files = ["global/latest.pt"] + [f"client{k}/latest.pt" for k in range(clients)]
    files += [f for f in ["global/best.pt"] + [f"client{k}/best.pt" for k in range(clients)]
              if (reference / f).is_file()]
    for name in files:
        a, b = flatten(load(resumed / name)), flatten(load(reference / name))
        assert sorted(a) == sorted(b), name
        differing = [k for k in a if not np.array_equal(a[k], b[k], equal_nan=a[k].dtype.kind == "f")]
        assert not differing, f"{name}: {len(differing)} entries differ, e.g. {differing[:3]}"
    got, want = rows(resumed), rows(reference)
    keys = [(int(r["round"]), int(r["client"])) for r in got]
    assert len(keys) == len(set(keys))
    assert got == want


# ---------------------------------------------------------------------- the server, in process
@pytest.mark.parametrize("strategy, values, at, after", [
    # FedAP: W and the per-client aggregates from the collection round (2) on
    ("FedAP", dict(model="unet", fedap_pretrain_rounds=1), 3, 1),
    # FedLC: the heads of every site
    ("FedLC", dict(model="unet_lc_calib", procedure="pce_sc", alpha=1.0, sc_grad=True), 3, 2),
    # MetaFed: the ring's last model and client; interrupted in the middle of a pass
    ("MetaFed", dict(model="unet"), 3, 1),
    # FT: interrupted in the fine-tuning round (rounds + 1), after the last aggregate
    ("FT", dict(model="unet", ft_iters=2, ft_lr=0.005), 5, 2),
    # the rows of the converged comparison, which runs over several sittings. FedICRA-ref:
    # W reset, a whole-global start every 4 iterations, the blend validated one round late
    # (round 2's validation runs in round 3, which is interrupted)
    ("FedICRA-ref", dict(ala_warmup_iters=2, ala_reset_weights=True, ala_reset_every_iters=4,
                         ala_validate_blend=True, ala_w_init=0.0), 3, 2),
    # FedICRA: W carried across rounds; FedLPPA: owned prompt rows, per-site auxiliary
    # decoders, a blended task decoder (a minute or more each: FEDICRA_HEAVY=1)
    pytest.param("FedICRA", dict(ala_warmup_iters=2), 3, 1, marks=HEAVY),
    pytest.param("FedLPPA", dict(model="unet_lppa", img_size=32, ala_warmup_iters=2), 3, 1,
                 marks=HEAVY),
    pytest.param("FedRep", dict(model="unet"), 3, 2, marks=HEAVY),
])
def test_a_resumed_run_ends_bit_identical_to_an_uninterrupted_one(
        tiny_federation, tmp_path, task_identity, strategy, values, at, after):
    from strategies.resume import resume_point, rollback_sites
    from strategies.server_app import run_server

    common = dict(strategy=strategy, rounds=4, iters=2, eval_every=1, **values)
    ref_cfg = tiny_run_config(tiny_federation, tmp_path, exp="reference", **common)
    run_server(InProcessGrid(ref_cfg), ref_cfg)

    cfg = tiny_run_config(tiny_federation, tmp_path, exp="resumed", **common)
    grid = InterruptingGrid(cfg, at=at, after=after)
    with pytest.raises(Interrupted):
        run_server(grid, cfg)
    for worker in grid.workers.values():
        worker.close()
    done = int(resume_point(cfg)["round"])
    assert done == min(at - 1, cfg.rounds)
    rolled = rollback_sites(cfg, done)
    assert len(rolled) == after, "the sites that finished the interrupted round go back"
    grid = InProcessGrid(cfg)  # fresh workers: they restore themselves from latest.pt
    run_server(grid, cfg, resume=True)
    first = [r for op, r, *_ in grid.traffic if op == "train"][0]
    assert first == done + 1, "no round is trained twice"
    assert load(cfg.out_dir / "global" / "latest.pt")["finished"]
    assert_same_run(cfg.out_dir, ref_cfg.out_dir)
    with pytest.raises(ValueError, match="has finished"):
        resume_point(cfg)


def test_resume_refuses_a_run_without_a_completed_round(tiny_federation, tmp_path):
    from strategies.resume import resume_point

    cfg = tiny_run_config(tiny_federation, tmp_path)
    with pytest.raises(ValueError, match="no completed round"):
        resume_point(cfg)


def test_rollback_puts_back_sites_ahead_and_leaves_those_behind(tmp_path):
    from networks.checkpoint import save_atomic
    from strategies.resume import rollback_sites

    class Cfg:
        out_dir, num_clients = tmp_path, 4

    def put(cid, name, rounds_done):
        save_atomic({"rounds_done": rounds_done, "tag": f"{name}{rounds_done}"},
                    tmp_path / f"client{cid}" / name)

    put(0, "latest.pt", 2), put(0, "previous.pt", 1)   # at the server's round
    put(1, "latest.pt", 3), put(1, "previous.pt", 2)   # finished the interrupted round
    put(2, "latest.pt", 1)                             # missed round 2 (lost site)
    assert rollback_sites(Cfg, 2) == [1]
    assert [load(tmp_path / f"client{k}" / "latest.pt")["tag"] for k in range(3)] == \
        ["latest.pt2", "previous.pt2", "latest.pt1"]
    put(3, "latest.pt", 3), put(3, "previous.pt", 3)
    with pytest.raises(ValueError, match="client 3 has no checkpoint of round 2"):
        rollback_sites(Cfg, 2)


def test_resumed_metrics_keep_the_completed_rounds_by_column_name(tmp_path):
    from configs.metrics_csv import CSV_COLUMNS
    from strategies.reporting import RunReporter

    (tmp_path / "metrics.csv").write_text(
        "round,client,total,seconds\n1,0,0.5,1.0\n2,0,0.4,1.0\n3,0,0.3,1.0\n")
    RunReporter(tmp_path, 4, resume_round=2).close()
    with open(tmp_path / "metrics.csv", newline="") as f:
        reader = csv.DictReader(f)
        kept = list(reader)
    assert tuple(reader.fieldnames) == CSV_COLUMNS
    assert [(r["round"], r["total"], r["seconds"]) for r in kept] == [("1", "0.5", "1.0"),
                                                                      ("2", "0.4", "1.0")]


# ---------------------------------------------------------------------- flower_runner --resume
def snapshot_run(tiny_federation, tmp_path, **values) -> Path:
    from configs import save_config

    cfg = flower_runner.absolute_paths(tiny_run_config(tiny_federation, tmp_path, **values))
    save_config(cfg, cfg.out_dir / "config.toml")
    return cfg.out_dir


def test_resume_refuses_conflicting_flags_naming_them(tiny_federation, tmp_path, capsys):
    out = snapshot_run(tiny_federation, tmp_path)
    code = flower_runner.main(["--resume", str(out), "--rounds", "8", "--set", "lambda_crf=0.5",
                               "--overwrite", "--num_clients", "3", "--port", "9100"])
    text = capsys.readouterr().out
    assert code == 2
    assert "--rounds 8 (the run's: 2)" in text and "--set lambda_crf=0.5" in text
    assert "--overwrite" in text
    listed = text.split("conflict with it")[1].split("Drop them")[0]
    assert "--num_clients" not in listed and "--port" not in listed  # same value; local key


def test_resume_refuses_an_empty_folder_a_fresh_snapshot_and_centralised_runs(
        tiny_federation, tmp_path, capsys):
    assert flower_runner.main(["--resume", str(tmp_path / "nothing")]) == 2
    assert "holds no config.toml" in capsys.readouterr().out
    out = snapshot_run(tiny_federation, tmp_path)
    assert flower_runner.main(["--resume", str(out)]) == 2
    assert "holds no completed round" in capsys.readouterr().out
    out = snapshot_run(tiny_federation, tmp_path, exp="ct", strategy="CT-weak", model="unet")
    assert flower_runner.main(["--resume", str(out)]) == 2
    assert "centralised training" in capsys.readouterr().out


# ---------------------------------------------------------------------- deployment, end to end
@pytest.fixture(scope="module")
def fed_data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("resume") / "data"
    subprocess.run([sys.executable, "-m", "dataloaders.synthetic", "--task", "faz", "--out",
                    str(out), "--size", "32", "--train-per-site", "6", "--test-per-site", "2",
                    "--seed", "1"], cwd=REPO, check=True, capture_output=True)
    return out


def runner(tmp: Path, data: Path, exp: str, rounds: int = 4):
    return [sys.executable, "flower_runner.py", "--mode", "deployment", "--img_class",
            "synthetic_faz", "--root_path", str(data), "--num_clients", str(CLIENTS), "--rounds",
            str(rounds), "--iters", "2", "--rep_iters", "1", "--batch_size", "2", "--procedure",
            "pce", "--set", "base_channels=4", "--set", "aux_channels=8", "--port",
            str(free_base(2 * CLIENTS + 2)), "--out_root", str(tmp / "model"), "--exp", exp,
            "--stop-timeout", "5", "--eval_every", "1"]


def interrupt_after(cmd, out: Path, rounds_done: int, timeout: float = 300) -> str:
    """Start ``cmd``, SIGINT it once metrics.csv has every client's rows of ``rounds_done``."""
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if (out / "metrics.csv").is_file():
                seen = [line.split(",", 1)[0] for line in
                        (out / "metrics.csv").read_text().splitlines()[1:]]
                if seen.count(str(rounds_done)) >= CLIENTS:
                    break
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before it could be interrupted"
        proc.send_signal(signal.SIGINT)
        stdout, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGINT, stdout[-4000:]
    return stdout


@pytest.mark.slow
def test_resume_after_sigint_gives_the_uninterrupted_run(tmp_path, fed_data):
    """A deployment run stopped by Ctrl-C after round 2 (some sites may have finished round 3
    already), resumed in deployment mode and, from a copy in another folder, in Flower's
    Simulation Engine: both end as the uninterrupted run does. (The interrupted run itself
    is a deployment: after Ctrl-C the Simulation Engine's processes may still finish rounds.)"""
    import shutil

    out = tmp_path / "model" / "cut"
    interrupt_after(runner(tmp_path, fed_data, "cut"), out, 2)
    moved = tmp_path / "elsewhere" / "cut"
    shutil.copytree(out, moved)
    ref = subprocess.run(runner(tmp_path, fed_data, "whole"), cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert ref.returncode == 0, ref.stdout[-4000:] + ref.stderr[-4000:]
    for folder, mode in ((out, "deployment"), (moved, "simulation")):
        res = subprocess.run([sys.executable, "flower_runner.py", "--resume", str(folder),
                              "--mode", mode, "--port", str(free_base(2 * CLIENTS + 2)),
                              "--stop-timeout", "5"],
                             cwd=REPO, capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
        assert "resuming after round" in res.stdout
        assert_same_run(folder, tmp_path / "model" / "whole")
        assert sorted((int(r["round"]), int(r["client"])) for r in rows(folder)) == \
            [(r, k) for r in range(1, 5) for k in range(CLIENTS)]
    assert "elsewhere" in (moved / "config.toml").read_text()
    again = subprocess.run([sys.executable, "flower_runner.py", "--resume", str(out)],
                           cwd=REPO, capture_output=True, text=True, timeout=120)
    assert again.returncode == 2 and "has finished" in again.stdout


def test_timing_keeps_the_completed_rounds_of_every_sitting(tmp_path, monkeypatch):
    """timing.csv: one row per completed round, the wall seconds since the previous round
    (or the sitting's start); a resumed run keeps the rows of its completed rounds, so
    ``recorded_seconds`` adds up every sitting and leaves out the interrupted round."""
    from strategies import reporting
    from strategies.reporting import RunReporter, recorded_seconds

    clock = iter([100.0, 103.0, 110.0, 121.0,   # sitting 1: start, rounds 1-3
                  500.0, 505.0])                # sitting 2: start, round 3 again
    monkeypatch.setattr(reporting.time, "perf_counter", lambda: next(clock))
    first = RunReporter(tmp_path, 4)
    for r in (1, 2, 3):
        first._write_timing(r)
    assert recorded_seconds(tmp_path) == 21.0
    assert recorded_seconds(tmp_path, up_to_round=2) == 10.0
    RunReporter(tmp_path, 4, resume_round=2)._write_timing(3)
    assert recorded_seconds(tmp_path) == 3.0 + 7.0 + 5.0
    assert recorded_seconds(tmp_path / "elsewhere") is None
