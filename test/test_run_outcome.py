"""How a run says it ended: a site that can take part in no round stops the run, the end-of-run
summary names the sites that missed rounds and those dropped, and a run that stops says why in
one line (the end-to-end check of that line: test_deployment's divergence test)."""
from __future__ import annotations

import io
import logging
import shutil
import sys
import time

import pytest

from conftest import InProcessGrid, task_identity, tiny_run_config  # noqa: F401
from test_lost_sites import LossyGrid, run_strategy


class Cut(Exception):
    """Stands for an interruption after round 1."""


class CutAfterRoundOne(InProcessGrid):
    def send_and_receive(self, messages, timeout=None):
        messages = list(messages)
        if any(int(m.content["config"]["server-round"]) > 1 for m in messages):
            raise Cut()
        return super().send_and_receive(messages, timeout)


class ErrorsAsRepliesGrid(InProcessGrid):
    """InProcessGrid whose sites' failures come back as Flower error replies (as the bridge
    and the executor return them), not as test failures."""

    def send_and_receive(self, messages, timeout=None):
        from flwr.app import Error, Message, MessageType, MetricRecord, RecordDict

        from strategies.base import to_numpy, to_record

        replies = []
        for msg in messages:
            op = "train" if msg.metadata.message_type == MessageType.TRAIN else "evaluate"
            reply = self.workers[msg.metadata.dst_node_id].handle(
                {"op": op, "config": dict(msg.content["config"].items()),
                 "arrays": to_numpy(msg.content["arrays"])})
            if not reply["ok"]:
                replies.append(Message(error=Error(code=0, reason=reply["error"]), reply_to=msg))
                continue
            content = {"metrics": MetricRecord(reply["metrics"])}
            if op == "train":
                content["arrays"] = to_record(reply["arrays"])
            replies.append(Message(RecordDict(content), reply_to=msg))
        return replies


def test_a_site_checkpoint_of_another_run_stops_the_resumed_run(tiny_federation, tmp_path,
                                                                task_identity):
    """On resume, client 1's latest.pt is another client's: its worker refuses it, and would
    refuse it every round. The run stops with that reason instead of completing without the
    site (the ServerApp fails, so flower_runner.py exits 1)."""
    import torch

    from strategies.server_app import run_server

    cfg = tiny_run_config(tiny_federation, tmp_path, strategy="FedAvg", model="unet", rounds=3,
                          iters=1)
    grid = CutAfterRoundOne(cfg)
    with pytest.raises(Cut):
        run_server(grid, cfg)
    for worker in grid.workers.values():
        worker.close()
    shutil.copy(cfg.out_dir / "client0" / "latest.pt", cfg.out_dir / "client1" / "latest.pt")
    with pytest.raises(RuntimeError) as err:  # strategies.errors.RunStopped
        run_server(ErrorsAsRepliesGrid(cfg), cfg, resume=True)
    text = str(err.value)
    assert type(err.value).__name__ == "RunStopped", text
    assert "round 2 train: client 1 (node" in text, text
    assert "cannot take part in this run" in text and "checkpoint of another run or client" in text
    assert "the run stops" in text
    latest = torch.load(cfg.out_dir / "global" / "latest.pt", weights_only=False)
    assert latest["round"] == 1 and not latest["finished"]  # resumable once the file is fixed


def test_the_summary_names_the_sites_that_missed_rounds_and_those_dropped(
        tiny_federation, tmp_path, task_identity):
    """A site whose worker used up its restarts is dropped for the rest of the run; the
    end-of-run summary says so, and lists every site that missed rounds, and which."""
    from configs.metrics_csv import summary_table
    from deployment.processes import ProcessGroup
    from deployment.supervisor import WorkerSupervisor

    group = ProcessGroup(tmp_path / "logs", tmp_path / "pids.json")
    try:
        group.start("worker1", [sys.executable, "-c", "raise SystemExit(3)"])
        supervisor = WorkerSupervisor(group, {"worker1": 1}, restarts=3)
        deadline = time.monotonic() + 60
        while 1 not in supervisor.dropped and time.monotonic() < deadline:
            supervisor.check()
            time.sleep(0.05)
    finally:
        group.stop_all(2)
    assert supervisor.count["worker1"] == 3

    cfg = tiny_run_config(tiny_federation, tmp_path, strategy="FedAvg", model="unet", rounds=3,
                          iters=1, min_fit_clients=1)
    run_strategy(cfg, LossyGrid(cfg, lost={2: {1, 2}, 3: {1}}))
    text = summary_table(cfg.out_dir / "metrics.csv", dropped=supervisor.dropped)
    assert "client 1 missed rounds 2-3 of 3, the last one included" in text, text
    assert "client 2 missed round 2 of 3 (" in text, text
    assert "client 0 missed" not in text
    assert ("client 1 was dropped for the rest of the run: its site worker exited 4 times "
            "(last exit code 3) and was not restarted after 3 restart(s)") in text, text


def test_a_run_that_stops_is_logged_in_one_line_without_a_traceback():
    """Flower logs a ServerApp's exception with its traceback (and the Simulation Engine a
    formatted traceback too); a RunStopped becomes one line."""
    from flwr.common.logger import log

    from strategies.errors import RunStopped, quiet_run_stopped

    quiet_run_stopped()
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    logging.getLogger("flwr").addHandler(handler)
    try:
        try:
            try:
                raise RunStopped("round 3: every client diverged, so no update is left")
            except RunStopped as inner:
                raise RuntimeError("An error was encountered. Ending simulation.") from inner
        except RuntimeError as ex:
            import traceback

            log(logging.ERROR, "ServerApp raised an exception", exc_info=ex)
            log(logging.ERROR, traceback.format_exc())
        try:
            raise ValueError("something else")
        except ValueError as ex:
            log(logging.ERROR, "ServerApp raised an exception", exc_info=ex)
    finally:
        logging.getLogger("flwr").removeHandler(handler)
    lines = stream.getvalue().splitlines()
    assert lines[0] == "run stopped: round 3: every client diverged, so no update is left"
    assert sum("every client diverged" in line for line in lines) == 1
    assert "Traceback" in "\n".join(lines[1:]) and "something else" in lines[-1]  # others kept
