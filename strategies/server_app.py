"""Flower ServerApp: builds the strategy a run config names and runs all rounds.

With ``flwr run`` (both modes of ``flower_runner.py``) the run config's ``config-file`` names
the TOML snapshot to use; ``resume = true`` continues the run after the last round recorded in
its ``global/latest.pt`` (``flower_runner.py --resume``, see :mod:`strategies.resume`).
"""
from __future__ import annotations

import logging
import sys

from flwr.app import ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp

from configs import RunConfig, load_config
from configs.schema import LOCAL_ONLY_KEYS
from networks.checkpoint import as_arrays, run_meta
from networks.factory import build_for_run

from .base import to_record
from .errors import quiet_run_stopped
from .reporting import RunReporter
from .resume import resume_point

log = logging.getLogger("fedicra.server")


def ensure_progress_logging() -> None:
    """Show the per-round progress lines where nobody configured the project's logger
    (the ServerApp process that a SuperLink starts)."""
    root = logging.getLogger("fedicra")
    if not root.handlers:
        handler = logging.StreamHandler(sys.stdout)  # the log streamer adds timestamps
        root.addHandler(handler)
        root.setLevel(logging.INFO)
        root.propagate = False


def run_server(grid: Grid, cfg: RunConfig, resume: bool = False) -> None:
    """All rounds of run ``cfg`` on ``grid``; outputs go to ``cfg.out_dir``.

    With ``resume`` the run continues after the round of its ``global/latest.pt``: the saved
    aggregate, strategy and reporter state, metrics.csv kept up to that round (the sites
    restore themselves from ``client<k>/latest.pt``, see :mod:`deployment.worker`).
    """
    ensure_progress_logging()
    quiet_run_stopped()  # a run that stops says why in one line, without a traceback
    point = resume_point(cfg) if resume else None
    done = int(point["round"]) if point is not None else 0
    reporter = RunReporter(cfg.out_dir, cfg.rounds, run_meta(cfg, None), resume_round=done)
    try:
        strategy = cfg.method.server(cfg, reporter)
        reporter.state_source = strategy.state_dict
        initial = to_record(strategy.initial_arrays(build_for_run(cfg, site=0)))
        if point is not None:
            reporter.load_state_dict(point.get("reporter", {}))
            strategy.load_state_dict(point["strategy"])
            strategy.resume_round = done
            initial = to_record(as_arrays(point["arrays"]))
        record = {k: v for k, v in cfg.to_dict().items() if k not in LOCAL_ONLY_KEYS}
        strategy.start(grid, initial, num_rounds=cfg.rounds, train_config=ConfigRecord(record),
                       evaluate_config=ConfigRecord(record))
        reporter.finish()
    finally:
        reporter.close()


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    path = str(context.run_config.get("config-file", ""))
    if not path:
        raise ValueError("run config key 'config-file' is empty: pass --run-config "
                         "\"config-file='<out_dir>/config.toml'\" to flwr run")
    run_server(grid, load_config(path), resume=bool(context.run_config.get("resume", False)))
