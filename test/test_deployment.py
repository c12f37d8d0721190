"""Deployment mode: channel, bridge, port checks, and real SuperLink/SuperNode runs.

The end-to-end tests start ``flower_runner.py --mode deployment`` as a subprocess on a tiny
synthetic federation (3 clients, 32 px) with ports chosen free at test time, and check that
afterwards no process the run started is alive (every pid in ``pids.json`` and every member
of their process groups).
"""
from __future__ import annotations

import csv
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from multiprocessing.connection import Listener
from pathlib import Path
from typing import Dict, List

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]

from conftest import SEED_TRAIN, free_base
from deployment.channel import WorkerUnavailable, decode, encode, request
from deployment.packing import pack_arrays, unpack_arrays
from deployment.processes import PortBusyError, check_ports_free, group_members, recorded_pids

CLIENTS = 3


# ---------------------------------------------------------------------- helpers
def runner(tmp: Path, data: Path, port: int, rounds: int, exp: str = "e2e",
           seed_flags: List[str] = ()) -> List[str]:
    """Runner command for a tiny deployment run; ``seed_flags`` go first (later flags win) and
    keep their objective, otherwise pCE alone keeps the run short."""
    objective = [] if seed_flags else ["--procedure", "pce"]
    return [sys.executable, "flower_runner.py", *seed_flags, "--mode", "deployment", "--img_class",
            "synthetic_faz", "--root_path", str(data), "--num_clients", str(CLIENTS), "--rounds",
            str(rounds), "--iters", "2", "--rep_iters", "1", "--batch_size", "2", *objective,
            "--set", "base_channels=4", "--set", "aux_channels=8", "--port", str(port),
            "--out_root", str(tmp / "model"), "--exp", exp, "--stop-timeout", "5"]


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in (b"Z", b"X")


def assert_all_stopped(out_dir: Path) -> Dict[str, int]:
    pids = recorded_pids(out_dir / "pids.json")
    expected = {"superlink", "flwr-run"} | {f"{kind}{k}" for k in range(CLIENTS)
                                            for kind in ("worker", "supernode", "appexec")}
    assert expected <= set(pids), f"pids.json lacks {expected - set(pids)}"
    survivors = {name: pid for name, pid in pids.items() if alive(pid) or group_members(pid)}
    assert not survivors, f"still running after the run: {survivors}"
    return pids


@pytest.fixture(scope="module")
def fed_data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dep") / "data"
    subprocess.run([sys.executable, "-m", "dataloaders.synthetic", "--task", "faz", "--out",
                    str(out), "--size", "32", "--train-per-site", "6", "--test-per-site", "2",
                    "--seed", "1"], cwd=REPO, check=True, capture_output=True)
    return out


# ---------------------------------------------------------------------- fast tests
def test_bridge_imports_neither_torch_nor_medpy():
    code = ("import sys, deployment.bridge; "
            "print(','.join(m for m in ('torch', 'medpy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "", f"the bridge imported {out.stdout.strip()}"


def test_channel_and_packing_roundtrip():
    arrays = {"w": np.arange(12, dtype=np.float32).reshape(3, 4), "n": np.array(7),
              "empty": np.zeros((0, 2)), "h": np.ones(3, dtype=np.float16)}
    msg = {"op": "train", "config": {"server-round": 3, "share-include": "encoder,pcs",
                                     "gpus": [0, 1], "flag": True, "lr": np.float32(0.5)},
           "arrays": arrays}
    back = decode(*encode(msg))
    assert back["op"] == "train" and back["config"]["lr"] == 0.5 and back["config"]["gpus"] == [0, 1]
    for blob_back in (back["arrays"], unpack_arrays(pack_arrays(arrays))):
        assert set(blob_back) == set(arrays)
        for k, v in arrays.items():
            assert blob_back[k].dtype == v.dtype and blob_back[k].shape == v.shape
            np.testing.assert_array_equal(blob_back[k], v)
    with pytest.raises(TypeError):
        encode({"op": "x", "config": {"bad": object()}})


def test_channel_rejects_a_wrong_secret():
    port = free_base(1)
    with Listener(("127.0.0.1", port), authkey=b"right") as listener:
        def serve_once():
            try:
                listener.accept()
            except Exception:  # the failed handshake
                pass

        thread = threading.Thread(target=serve_once, daemon=True)
        thread.start()
        with pytest.raises(WorkerUnavailable, match="handshake"):
            request(f"127.0.0.1:{port}", b"wrong", {"op": "ping"}, who="site worker of client 1")
        thread.join(5)


def test_executor_stops_heartbeat_before_the_task_output(monkeypatch):
    """A heartbeat after the task output is refused and makes Flower raise SIGINT in the
    executor; the heartbeat must therefore be stopped (and joined) first."""
    import deployment.appexec as appexec

    events: List[str] = []

    class Heartbeat:
        def __init__(self, fn):
            self.running = False

        def start(self):
            self.running = True

        def stop(self):
            events.append("heartbeat stopped")
            self.running = False

        @property
        def is_running(self):
            return self.running

    class Client:
        def close(self):
            events.append("closed")

    def pull(client):
        raise RuntimeError("no task input")

    monkeypatch.setattr(appexec, "HeartbeatSender", Heartbeat)
    monkeypatch.setattr(appexec, "make_task_heartbeat_fn_http", lambda client: None)
    monkeypatch.setattr(appexec, "pull_task_input", pull)
    monkeypatch.setattr(appexec, "push_task_output", lambda **kw: events.append("task output"))
    executor = object.__new__(appexec.AppExecutor)
    monkeypatch.setattr(executor, "_client", lambda interceptors: Client(), raising=False)
    executor.run_task("token")
    assert events == ["heartbeat stopped", "task output", "closed"]


def test_worker_not_running_names_the_client(tmp_path):
    from flwr.app import Context, RecordDict

    from deployment.bridge import ask_worker

    secret = tmp_path / "key"
    secret.write_text("abc")
    port = free_base(1)
    context = Context(run_id=1, node_id=1, node_config={
        "cid": 2, "worker-address": f"127.0.0.1:{port}", "worker-secret-file": str(secret)},
        state=RecordDict(), run_config={})
    with pytest.raises(WorkerUnavailable, match=r"client 2.*not running"):
        ask_worker(context, "train", {"server-round": 1}, {})


@pytest.mark.parametrize("busy_offset, flag", [(0, "SuperLink"), (2, "site worker of client 0")])
def test_busy_port_gives_a_clear_error(tmp_path, fed_data, busy_offset, flag):
    base = free_base(2 * CLIENTS + 2)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", base + busy_offset))
        sock.listen()
        res = subprocess.run(runner(tmp_path, fed_data, base, 1), cwd=REPO,
                             capture_output=True, text=True, timeout=120)
    text = res.stdout + res.stderr
    assert res.returncode == 2, text
    assert f"port {base + busy_offset}" in text and "--port" in text and flag in text, text
    assert not (tmp_path / "model" / "e2e" / "logs").exists()  # nothing was started


def test_app_bundle_holds_the_code_and_no_data():
    import io
    import zipfile

    from flwr.cli.build import build_fab_from_disk

    fab = build_fab_from_disk(REPO)
    names = zipfile.ZipFile(io.BytesIO(fab)).namelist()
    assert len(fab) < 2_000_000, f"FAB of {len(fab)} bytes"
    for needed in ("deployment/bridge.py", "deployment/server_app.py", "deployment/channel.py",
                   "strategies/server_app.py", "configs/schema.py", "methods/registry.py",
                   "pyproject.toml"):
        assert needed in names
    for banned in (".venv/", "data/", "model/", "demo/", ".git/"):
        assert not any(n.startswith(banned) for n in names), banned


def test_output_folder_inside_the_app_must_be_ignored():
    from deployment.launch import check_out_dir_not_packed
    from deployment.processes import DeploymentError

    check_out_dir_not_packed(REPO / "model" / "x")  # ignored by .gitignore
    check_out_dir_not_packed(Path("/tmp/elsewhere"))
    with pytest.raises(DeploymentError, match="out_root"):
        check_out_dir_not_packed(REPO / "strategies" / "x")


# ---------------------------------------------------------------------- real runs
@pytest.mark.slow
def test_deployment_run_end_to_end(tmp_path, fed_data):
    base = free_base(2 * CLIENTS + 2)
    # the seed README's train command as written, with paths, sizes, port and GPU ids adapted
    res = subprocess.run(runner(tmp_path, fed_data, base, 2, seed_flags=[*SEED_TRAIN, "--gpus"]),
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    out = tmp_path / "model" / "e2e"
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    assert (out / "config.toml").is_file()
    with open(out / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert sorted((int(r["round"]), int(r["client"])) for r in rows) == \
        [(r, k) for r in (1, 2) for k in range(CLIENTS)]
    assert all(float(r["seconds"]) > 0 for r in rows)
    assert all(r[term] != "" for r in rows for term in ("pce", "tree", "crf", "sc"))  # seed objective
    for k in range(CLIENTS):
        assert (out / f"client{k}" / "best.pt").is_file()
        assert (out / f"client{k}" / "latest.pt").is_file()
        assert (out / "logs" / f"worker{k}.log").is_file()
    assert (out / "global" / "latest.pt").is_file()
    assert any((out / "tb").rglob("events.out.tfevents.*"))
    assert "ended: finished:completed" in res.stdout
    assert_all_stopped(out)


@pytest.mark.slow
def test_sigint_after_round_one_stops_everything(tmp_path, fed_data):
    base = free_base(2 * CLIENTS + 2)
    out = tmp_path / "model" / "int"
    proc = subprocess.Popen(runner(tmp_path, fed_data, base, 50, exp="int"), cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if (out / "metrics.csv").is_file():
                rounds = [line.split(",", 1)[0] for line in
                          (out / "metrics.csv").read_text().splitlines()[1:]]
                if rounds.count("1") >= CLIENTS:
                    break
            time.sleep(0.1)
        assert proc.poll() is None, "the run ended before round 1 was recorded"
        proc.send_signal(signal.SIGINT)
        stdout, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGINT, stdout[-4000:]
    assert "interrupted by SIGINT" in stdout
    assert_all_stopped(out)


def final_arrays(out: Path) -> Dict[str, np.ndarray]:
    """The global model and every client's model at the end of a run, by name."""
    import torch

    arrays = {f"global/{k}": np.asarray(v) for k, v in
              torch.load(out / "global" / "latest.pt", weights_only=False)["arrays"].items()}
    for k in range(CLIENTS):
        state = torch.load(out / f"client{k}" / "latest.pt", weights_only=False)
        arrays.update({f"client{k}/{n}": v.numpy() for n, v in state["model"].items()})
    return arrays


@pytest.mark.slow
def test_the_same_deployment_twice_gives_bit_identical_models(tmp_path, fed_data):
    """Replies are aggregated by client id, not arrival order, and every random draw is
    seeded: two runs of one configuration agree bit for bit (FedICRA with its adaptive
    aggregation, so the blend's sampling is covered too)."""
    runs = []
    for exp in ("first", "second"):
        res, out = run_tiny(tmp_path, fed_data, 3, exp)
        assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
        runs.append(final_arrays(out))
    first, second = runs
    assert sorted(first) == sorted(second)
    differing = [k for k in first if not np.array_equal(first[k], second[k])]
    assert not differing, f"{len(differing)} arrays differ, e.g. {differing[:3]}"


def run_tiny(tmp_path: Path, data: Path, rounds: int, exp: str, *flags: str):
    """One tiny deployment run to its end: (completed process, its output folder)."""
    cmd = runner(tmp_path, data, free_base(2 * CLIENTS + 2), rounds, exp=exp) + list(flags)
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    return res, tmp_path / "model" / exp


@pytest.mark.slow
def test_fedavg_keeps_the_global_model_with_the_best_mean_validation(tmp_path, fed_data):
    res, out = run_tiny(tmp_path, fed_data, 3, "avg", "--strategy", "FedAvg", "--eval_every", "1")
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    assert "network unet (strategy FedAvg)" in res.stdout
    import torch

    best = torch.load(out / "global" / "best.pt", weights_only=False)
    with open(out / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    # the round-r rows carry every site's Dice of the aggregate of round r - 1
    means = {int(r): np.mean([float(x["val_dice_global"]) for x in rows if x["round"] == r])
             for r in ("2", "3")}
    scored = {r - 1: m for r, m in means.items()}
    assert all(x["val_dice_global"] == "" for x in rows if x["round"] == "1")
    assert best["val_dice"] >= max(scored.values()) - 1e-12
    if best["round"] in scored:
        assert best["val_dice"] == pytest.approx(scored[best["round"]])
    else:  # the final aggregate, validated by the evaluate message
        assert best["round"] == 3
    latest = torch.load(out / "global" / "latest.pt", weights_only=False)
    if best["round"] == 3:
        assert all(np.array_equal(best["arrays"][k], latest["arrays"][k]) for k in latest["arrays"])


@pytest.mark.slow
def test_divergence_never_reaches_the_global_model_and_the_run_fails(tmp_path, fed_data):
    res, out = run_tiny(tmp_path, fed_data, 4, "nan", "--strategy", "FedAvg", "--base_lr", "1e30")
    assert res.returncode == 1, res.stdout[-4000:] + res.stderr[-4000:]
    said = [line for line in res.stdout.splitlines() if "every client diverged" in line]
    assert len(said) == 1 and "run stopped: round" in said[0], res.stdout[-4000:]
    assert "Traceback" not in res.stdout + res.stderr, res.stdout[-4000:]  # one line, no trace
    import torch

    latest = out / "global" / "latest.pt"
    if latest.is_file():  # rounds before the divergence are kept, finite
        arrays = torch.load(latest, weights_only=True)["arrays"]
        assert all(torch.isfinite(v.float()).all() for v in arrays.values())
    for k in range(CLIENTS):
        best = out / f"client{k}" / "best.pt"
        if best.is_file():
            state = torch.load(best, weights_only=True)
            assert all(torch.isfinite(v.float()).all() for v in state["model"].values())
    assert_all_stopped(out)


def test_stop_ends_every_process_listed_in_a_pids_json_before_the_run_token(tmp_path):
    """`flower_runner.py stop <run>` kills what a crashed runner of an earlier version left
    (a pids.json of ``{name: pid}``), children included: the processes whose FLWR_HOME lies in
    the run's folder (tests of the current pids.json: test/test_run_processes.py)."""
    script = "import subprocess, time; subprocess.Popen(['sleep', '300']); time.sleep(300)"
    env = dict(os.environ, FLWR_HOME=str(tmp_path / "flwr_home" / "supernode0"))
    procs = [subprocess.Popen([sys.executable, "-c", script], start_new_session=True, env=env)
             for _ in range(2)]
    try:
        (tmp_path / "pids.json").write_text(json.dumps({f"leftover{i}": p.pid
                                                        for i, p in enumerate(procs)}))
        time.sleep(0.5)
        assert all(group_members(p.pid) for p in procs)
        res = subprocess.run([sys.executable, "flower_runner.py", "stop", str(tmp_path),
                              "--stop-timeout", "5"], cwd=REPO, capture_output=True, text=True,
                             timeout=60)
        assert res.returncode == 0, res.stdout + res.stderr
        assert "leftover0" in res.stdout and "leftover1" in res.stdout
        for p in procs:
            p.wait(timeout=10)
        assert not any(group_members(p.pid) for p in procs)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()


def test_children_die_with_a_killed_launcher(tmp_path):
    """A child started by ProcessGroup gets SIGTERM when its launcher dies, even by SIGKILL."""
    code = ("import sys, time; from pathlib import Path; sys.path.insert(0, %r);"
            "from deployment.processes import ProcessGroup;"
            "g = ProcessGroup(Path(%r), Path(%r)); g.start('sleeper', ['sleep', '300']);"
            "time.sleep(300)") % (str(REPO), str(tmp_path / "logs"), str(tmp_path / "pids.json"))
    launcher = subprocess.Popen([sys.executable, "-c", code])
    try:
        deadline = time.monotonic() + 30
        while not (tmp_path / "pids.json").is_file() or "sleeper" not in (tmp_path / "pids.json").read_text():
            assert time.monotonic() < deadline
            time.sleep(0.1)
        pid = recorded_pids(tmp_path / "pids.json")["sleeper"]
        assert alive(pid)
        launcher.kill()
        launcher.wait(timeout=10)
        deadline = time.monotonic() + 10
        while alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not alive(pid), "the child outlived its killed launcher"
    finally:
        if launcher.poll() is None:
            launcher.kill()
