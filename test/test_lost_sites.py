"""Timeouts and lost sites: channel deadlines, a worker that serves connections on threads,
the server's round deadline, runs that go on without a site, and sites that rejoin."""
from __future__ import annotations

import csv
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Dict, List

import numpy as np
import pytest

from conftest import InProcessGrid, free_base, tiny_run_config

REPO = Path(__file__).resolve().parents[1]
SECRET = b"s3cret"


# ---------------------------------------------------------------------- channel and worker
class StubWorker:
    """What :func:`deployment.worker.serve` needs of a SiteWorker: ``cid`` and ``handle``."""

    cid = 4

    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay

    def handle(self, message):
        if message.get("op") != "ping":
            time.sleep(self.delay)
        return {"ok": True, "metrics": {"cid": float(self.cid)}}


def start_serve(worker, **kwargs):
    from deployment.worker import serve

    port = free_base(1)
    stop, ready = threading.Event(), threading.Event()
    thread = threading.Thread(target=serve, args=(worker, f"127.0.0.1:{port}", SECRET),
                              kwargs=dict(stop=stop, ready=ready, **kwargs), daemon=True)
    thread.start()
    assert ready.wait(10)
    return f"127.0.0.1:{port}", stop, thread


def test_a_silent_connection_does_not_block_the_worker():
    from deployment.channel import request

    address, stop, thread = start_serve(StubWorker(), handshake_timeout=30.0)
    host, port = address.split(":")
    silent = [socket.create_connection((host, int(port))) for _ in range(3)]  # send nothing
    try:
        time.sleep(0.2)  # the worker has accepted them and waits for their handshakes
        start = time.monotonic()
        reply = request(address, SECRET, {"op": "ping"})
        assert reply["metrics"]["cid"] == 4
        reply = request(address, SECRET, {"op": "train", "config": {"server-round": 1}})
        assert time.monotonic() - start < 2.0
    finally:
        for sock in silent:
            sock.close()
        stop.set()
        thread.join(5)


def test_keepalives_carry_a_slow_request_past_the_silence_deadline():
    from deployment.channel import request

    address, stop, thread = start_serve(StubWorker(delay=1.5), keepalive=0.1)
    try:
        reply = request(address, SECRET, {"op": "train", "config": {}}, silence_timeout=0.5)
        assert reply["ok"]
    finally:
        stop.set()
        thread.join(5)


def test_a_stopped_worker_fails_the_request_within_the_deadlines():
    """A peer that never completes the handshake, and one that handshakes and then never
    answers (a SIGSTOPped worker): both fail with a clear error, within the deadline."""
    from multiprocessing.connection import Listener

    from deployment.channel import WorkerUnavailable, request

    port = free_base(1)
    with socket.create_server(("127.0.0.1", port)):  # listens; nobody ever accepts
        start = time.monotonic()
        with pytest.raises(WorkerUnavailable, match=r"client 3 .*did not complete the handshake"):
            request(f"127.0.0.1:{port}", SECRET, {"op": "ping"}, who="site worker of client 3",
                    handshake_timeout=0.5)
        assert time.monotonic() - start < 3.0

    port = free_base(1)
    with Listener(("127.0.0.1", port), authkey=SECRET) as listener:
        held = []
        thread = threading.Thread(target=lambda: held.append(listener.accept()), daemon=True)
        thread.start()
        start = time.monotonic()
        with pytest.raises(WorkerUnavailable, match=r"sent nothing for 1 s.*stopped or hung"):
            request(f"127.0.0.1:{port}", SECRET, {"op": "train", "config": {}},
                    who="site worker of client 3", silence_timeout=1.0)
        assert time.monotonic() - start < 4.0
        thread.join(5)
        for conn in held:
            conn.close()


# ---------------------------------------------------------------------- rejoining
def message_config(cfg, server_round: int) -> Dict[str, object]:
    from flwr.app import ConfigRecord

    from configs.schema import LOCAL_ONLY_KEYS

    record = {k: v for k, v in cfg.to_dict().items() if k not in LOCAL_ONLY_KEYS}
    strategy = cfg.method.server(cfg)
    return dict(strategy.message_config(ConfigRecord(record), server_round).items())


def test_a_restarted_worker_rejoins_a_later_round_from_its_latest_checkpoint(
        tiny_federation, tmp_path, caplog):
    import torch

    from deployment.worker import SiteWorker

    from methods.registry import get_method
    from networks.factory import build_for_run

    cfg = tiny_run_config(tiny_federation, tmp_path, strategy="FedAvg", model="unet", rounds=4)
    initial = get_method("FedAvg").server(cfg).initial_arrays(build_for_run(cfg, site=0))
    first = SiteWorker(cfg, 1)
    reply = first.handle({"op": "train", "config": message_config(cfg, 1), "arrays": initial})
    assert reply["ok"], reply.get("error")
    first.close()
    saved = torch.load(cfg.out_dir / "client1" / "latest.pt", weights_only=False)
    assert saved["rounds_done"] == 1 and saved["step"] == cfg.iters
    # the site was down for round 2; a new worker process gets round 3 with the global arrays
    shared = reply["arrays"]
    again = SiteWorker(cfg, 1)
    with caplog.at_level(logging.WARNING, logger="fedicra.worker"):
        reply = again.handle({"op": "train", "config": message_config(cfg, 3), "arrays": shared})
    assert reply["ok"], reply.get("error")
    assert "rejoining at round 3" in caplog.text and "rounds 2..2 were missed" in caplog.text
    assert again.trainer.rounds_done == 3
    assert again.trainer.step == 2 * cfg.iters  # continued from the checkpoint's step
    # a worker ahead of the request still refuses (it cannot go back)
    reply = again.handle({"op": "train", "config": message_config(cfg, 2), "arrays": shared})
    assert not reply["ok"] and "does not continue it" in reply["error"]
    again.close()


# ---------------------------------------------------------------------- the server
def test_round_clock_policy():
    from strategies.deadlines import FIRST, FLOOR, RoundClock

    clock = RoundClock(0.0)
    assert clock.timeout() == FIRST
    for seconds in (1.0, 2.0, 30.0):
        clock.record(seconds)
    assert clock.timeout() == FLOOR  # 10 x 2 s < 120 s
    clock.record(40.0)
    clock.record(50.0)
    assert clock.timeout() == pytest.approx(300.0)  # 10 x the median 30 s
    clock.scale = 20.0  # FT's fine-tuning round
    assert clock.timeout() == pytest.approx(6000.0)
    fixed = RoundClock(4.0)
    assert fixed.timeout() == 4.0 and "round_timeout = 4 s" in fixed.describe()


def test_each_kind_of_round_has_its_own_automatic_deadline():
    from strategies.deadlines import FIRST, RoundClock

    clock = RoundClock(0.0)
    for seconds in (30.0, 31.0, 32.0, 33.0, 34.0):  # warm-up rounds: copy and train
        clock.record(seconds)
    assert clock.timeout() == pytest.approx(320.0)
    # the first blending round takes 400 s: one median for both would have cut it at 320 s
    clock.kind = "blend"
    assert clock.timeout() == FIRST and "of kind 'blend' has completed" in clock.describe()
    clock.record(400.0)
    assert clock.timeout() == pytest.approx(4000.0)
    clock.kind = "train"
    assert clock.timeout() == pytest.approx(320.0)  # the warm-up's own median, unchanged


@pytest.mark.parametrize("strategy, extra", [
    ("FedICRA", dict(ala_warmup_iters=4)),
    ("FedICRA-ref", dict(ala_warmup_iters=4, ala_reset_every_iters=4)),
    ("FedALA", dict(model="unet")),
])
def test_the_blending_rounds_are_those_the_server_gives_the_blend_deadline(
        strategy, extra, tiny_federation, tmp_path, task_identity, monkeypatch):
    """The server predicts which rounds learn blending weights at the sites (their deadline
    kind): it must name exactly the rounds in which a site calls the blending."""
    from flwr.app import MessageType

    from clients.ala import AdaptiveAggregator
    from strategies.deadlines import RoundClock
    from strategies.server_app import run_server

    cfg = tiny_run_config(tiny_federation, tmp_path, strategy=strategy, rounds=5, iters=2,
                          eval_every=1, **extra)
    now = {"round": None, "kind": None}
    blended, kinds = set(), {}
    real_blend, real_timeout = AdaptiveAggregator.blend, RoundClock.timeout

    def blend(self, *args, **kwargs):
        blended.add(now["round"])
        return real_blend(self, *args, **kwargs)

    def timeout(self):
        now["kind"] = self.kind
        return real_timeout(self)

    monkeypatch.setattr(AdaptiveAggregator, "blend", blend)
    monkeypatch.setattr(RoundClock, "timeout", timeout)

    class KindGrid(InProcessGrid):
        def send_and_receive(self, messages, timeout=None):
            messages = list(messages)
            r = int(messages[0].content["config"]["server-round"])
            if messages[0].metadata.message_type == MessageType.TRAIN:
                now["round"], kinds[r] = r, now["kind"]
            else:
                now["round"] = ("evaluate", r)
            return super().send_and_receive(messages, timeout)

    run_server(KindGrid(cfg), cfg)
    assert sorted(kinds) == list(range(1, 6))
    blend_rounds = {r for r, kind in kinds.items() if kind == "blend"}
    assert blended - {r for r in blended if isinstance(r, tuple)} == blend_rounds
    assert blend_rounds and blend_rounds != set(kinds), kinds  # both kinds occur


def test_min_fit_clients_is_validated():
    from configs import RunConfig

    assert RunConfig(num_clients=5).min_fit == 4
    assert RunConfig(num_clients=1).min_fit == 1
    assert RunConfig(num_clients=5, min_fit_clients=5).validate().min_fit == 5
    for bad in (-1, 6):
        with pytest.raises(ValueError, match="min_fit_clients"):
            RunConfig(num_clients=5, min_fit_clients=bad).validate()
    with pytest.raises(ValueError, match="round_timeout"):
        RunConfig(round_timeout=-1.0).validate()


class LossyGrid(InProcessGrid):
    """InProcessGrid where the clients of ``lost[round]`` do not answer train messages (as
    after the round deadline) and those of ``failing[round]`` answer with an error."""

    def __init__(self, cfg, lost=None, failing=None):
        super().__init__(cfg)
        self.cid_of = {n: k for k, n in enumerate(self.workers)}
        self.lost = lost or {}
        self.failing = failing or {}

    def send_and_receive(self, messages, timeout=None):
        from flwr.app import Error, Message, MessageType

        kept, errors = [], []
        for msg in messages:
            rnd = int(msg.content["config"]["server-round"])
            cid = self.cid_of[msg.metadata.dst_node_id]
            if msg.metadata.message_type == MessageType.TRAIN and cid in self.lost.get(rnd, ()):
                continue
            if msg.metadata.message_type == MessageType.TRAIN and cid in self.failing.get(rnd, ()):
                errors.append(Message(error=Error(code=0, reason=f"site worker of client {cid} is "
                                                          "not running"), reply_to=msg))
                continue
            kept.append(msg)
        return super().send_and_receive(kept, timeout) + errors


def read_rows(out: Path) -> List[Dict[str, str]]:
    with open(out / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def run_strategy(cfg, grid):
    from flwr.app import ConfigRecord

    from networks.checkpoint import run_meta
    from networks.factory import build_for_run
    from configs.schema import LOCAL_ONLY_KEYS
    from strategies.base import to_record
    from strategies.reporting import RunReporter

    reporter = RunReporter(cfg.out_dir, cfg.rounds, run_meta(cfg, None))
    strategy = cfg.method.server(cfg, reporter)
    record = {k: v for k, v in cfg.to_dict().items() if k not in LOCAL_ONLY_KEYS}
    try:
        strategy.start(grid, to_record(strategy.initial_arrays(build_for_run(cfg, site=0))),
                       num_rounds=cfg.rounds, train_config=ConfigRecord(record),
                       evaluate_config=ConfigRecord(record))
    finally:
        reporter.close()
    return strategy


def test_a_round_goes_on_without_a_lost_site_which_rejoins_later(tiny_federation, tmp_path,
                                                                  task_identity, caplog):
    cfg = tiny_run_config(tiny_federation, tmp_path, strategy="FedAvg", model="unet", rounds=3)
    grid = LossyGrid(cfg, lost={2: {1}})
    with caplog.at_level(logging.WARNING):
        run_strategy(cfg, grid)
    rows = read_rows(cfg.out_dir)
    marks = {(int(r["round"]), int(r["client"])): r["missing"] for r in rows}
    assert marks == {(r, k): ("1" if (r, k) == (2, 1) else "0") for r in (1, 2, 3) for k in range(3)}
    lost = [r for r in rows if r["missing"] == "1"][0]
    assert lost["num_examples"] == "" and lost["val_dice"] == ""
    assert "round 2 train: client 1 (node" in caplog.text and "is missing: no reply" in caplog.text
    assert "rejoining at round 3" in caplog.text  # client 1 trained round 3 from its round 1
    trained = [(rnd, grid.cid_of[node]) for op, rnd, node, _, _ in grid.traffic if op == "train"]
    assert sorted(trained) == sorted((r, k) for r in (1, 2, 3) for k in range(3) if (r, k) != (2, 1))


def test_below_min_fit_clients_the_run_stops_with_its_last_round_on_disk(
        tiny_federation, tmp_path, task_identity):
    import torch

    cfg = tiny_run_config(tiny_federation, tmp_path, strategy="FedAvg", model="unet", rounds=3)
    grid = LossyGrid(cfg, lost={2: {1}}, failing={2: {2}})
    with pytest.raises(RuntimeError) as err:
        run_strategy(cfg, grid)
    text = str(err.value)
    assert "round 2 train: 1 of 3 clients answered, fewer than the 2 needed" in text
    assert "client 1 (node" in text and "no reply" in text
    assert "client 2 (node" in text and "site worker of client 2 is not running" in text
    assert torch.load(cfg.out_dir / "global" / "latest.pt", weights_only=False)["round"] == 1
    assert {r["round"] for r in read_rows(cfg.out_dir)} == {"1"}


class RenumberingGrid(InProcessGrid):
    """After round 1, client 1's node leaves and comes back under a new id (a restarted
    SuperNode)."""

    NEW = 4242

    def send_and_receive(self, messages, timeout=None):
        messages = list(messages)
        replies = super().send_and_receive(messages, timeout)
        rounds = {int(m.content["config"]["server-round"]) for m in messages}
        old = list(self.workers)[1]
        if rounds == {1} and old != self.NEW:
            self.workers[self.NEW] = self.workers.pop(old)
        return replies


def test_a_restarted_supernode_is_identified_and_rejoins(tiny_federation, tmp_path,
                                                         task_identity, caplog):
    cfg = tiny_run_config(tiny_federation, tmp_path, strategy="FedAvg", model="unet", rounds=2)
    grid = RenumberingGrid(cfg)
    with caplog.at_level(logging.INFO, logger="fedicra.server"):
        strategy = run_strategy(cfg, grid)
    assert f"node {RenumberingGrid.NEW} serves client 1" in caplog.text
    assert strategy.node_cid[RenumberingGrid.NEW] == 1
    assert ("train", 2, RenumberingGrid.NEW) in [t[:3] for t in grid.traffic]
    assert all(r["missing"] == "0" for r in read_rows(cfg.out_dir))


@pytest.mark.slow
def test_metafed_skips_a_missing_site_in_the_ring(tiny_federation, tmp_path, task_identity,
                                                  caplog):
    cfg = tiny_run_config(tiny_federation, tmp_path, strategy="MetaFed", model="unet",
                          rounds=3, iters=1)
    grid = LossyGrid(cfg, lost={2: {1}})
    with caplog.at_level(logging.WARNING):
        strategy = run_strategy(cfg, grid)
    assert "client 1 is missing from the ring; client 2 learns from client 0's model" in caplog.text
    ring2 = [(grid.cid_of[node], arrays) for op, rnd, node, arrays, _ in grid.traffic
             if op == "train" and rnd == 2]
    assert [c for c, _ in ring2] == [0, 2]  # client 1's step was sent but never came back
    rows = read_rows(cfg.out_dir)
    assert [r["client"] for r in rows if r["missing"] == "1"] == ["1"]
    assert strategy._last_cid == 2


@pytest.mark.slow
def test_fedap_weighs_the_clients_present_at_collection(tiny_federation, tmp_path,
                                                        task_identity):
    cfg = tiny_run_config(tiny_federation, tmp_path, strategy="FedAP", model="unet", rounds=4,
                          iters=1, fedap_pretrain_rounds=1)
    grid = LossyGrid(cfg, lost={2: {2}, 4: {0}})  # missing at collection, then later
    strategy = run_strategy(cfg, grid)
    assert strategy.cids == [0, 1] and strategy.weights.shape == (2, 2)
    np.testing.assert_allclose(strategy.weights.sum(axis=1), 1.0)
    rows = read_rows(cfg.out_dir)
    assert sorted((r["round"], r["client"]) for r in rows if r["missing"] == "1") == \
        [("2", "2"), ("4", "0")]


# ---------------------------------------------------------------------- real deployments
CLIENTS = 3


def deployment_cmd(tmp: Path, data: Path, port: int, rounds: int, exp: str, *flags: str):
    return [sys.executable, "flower_runner.py", "--mode", "deployment", "--img_class",
            "synthetic_faz", "--root_path", str(data), "--num_clients", str(CLIENTS),
            "--rounds", str(rounds), "--iters", "2", "--rep_iters", "1", "--batch_size", "2",
            "--procedure", "pce", "--strategy", "FedAvg", "--set", "base_channels=4",
            "--port", str(port), "--out_root", str(tmp / "model"), "--exp", exp,
            "--stop-timeout", "5", *flags]


def run_and_act(cmd: List[str], out: Path, act, timeout: float = 300):
    """Run ``cmd``; once round 1's rows are in metrics.csv call ``act(pids)``."""
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    acted = False
    deadline = time.monotonic() + timeout
    try:
        while not acted and proc.poll() is None and time.monotonic() < deadline:
            csv_path = out / "metrics.csv"
            if csv_path.is_file() and sum(line.startswith("1,") for line in
                                          csv_path.read_text().splitlines()) >= CLIENTS:
                from deployment.processes import recorded_pids

                act(recorded_pids(out / "pids.json"))
                acted = True
            time.sleep(0.05)
        assert acted, "the run ended before round 1 was recorded"
        stdout, _ = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, stdout


@pytest.fixture(scope="module")
def dep_data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("lost") / "data"
    subprocess.run([sys.executable, "-m", "dataloaders.synthetic", "--task", "faz", "--out",
                    str(out), "--size", "32", "--train-per-site", "6", "--test-per-site", "2",
                    "--seed", "1"], cwd=REPO, check=True, capture_output=True)
    return out


@pytest.mark.slow
def test_a_stopped_worker_misses_its_rounds_after_the_deadline_and_the_run_finishes(
        tmp_path, dep_data):
    from test_deployment import assert_all_stopped

    out = tmp_path / "model" / "stop"
    stopped = []

    def stop_worker(pids):
        os.kill(pids["worker1"], signal.SIGSTOP)
        stopped.append(pids["worker1"])

    cmd = deployment_cmd(tmp_path, dep_data, free_base(2 * CLIENTS + 2), 3, "stop",
                         "--set", "round_timeout=4")
    try:
        code, stdout = run_and_act(cmd, out, stop_worker)
    finally:
        for pid in stopped:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
    assert code == 0, stdout[-4000:]
    rows = read_rows(out)
    marks = {(int(r["round"]), int(r["client"])): r["missing"] for r in rows}
    assert {k: v for k, v in marks.items() if v == "1"} == {(2, 1): "1", (3, 1): "1"}
    assert all(marks[(r, k)] == "0" for r in (1, 2, 3) for k in (0, 2))
    assert "client 1 (node" in stdout and "no reply within 4 s" in stdout
    assert "ended: finished:completed" in stdout
    assert_all_stopped(out)


@pytest.mark.slow
def test_a_killed_worker_is_restarted_and_the_run_goes_on_without_it_meanwhile(
        tmp_path, dep_data):
    from test_deployment import assert_all_stopped

    out = tmp_path / "model" / "kill"
    cmd = deployment_cmd(tmp_path, dep_data, free_base(2 * CLIENTS + 2), 4, "kill")
    code, stdout = run_and_act(cmd, out, lambda pids: os.kill(pids["worker1"], signal.SIGKILL))
    assert code == 0, stdout[-4000:]
    rows = read_rows(out)
    marks = {(int(r["round"]), int(r["client"])): r["missing"] for r in rows}
    assert all(marks[(r, k)] == "0" for r in range(1, 5) for k in (0, 2))
    missed = sorted(r for (r, k), v in marks.items() if k == 1 and v == "1")
    assert missed and missed[0] == 2, marks  # killed after round 1
    assert "worker1 (client 1) exited with code -9; restarting it (1 of 3)" in stdout
    assert "client 1 missed round" in stdout  # the end-of-run summary says so
    assert re.search(r"site worker of client 1 (is not running|at \S+ closed the connection)",
                     stdout), stdout[-4000:]
    back = [r for (r, k), v in marks.items() if k == 1 and v == "0" and r > missed[0]]
    if back:  # restarted in time to rejoin: from its round-1 checkpoint
        assert "rejoining at round" in (out / "logs" / "worker1.log").read_text()
    assert_all_stopped(out)
