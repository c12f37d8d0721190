"""Flower ServerApp: builds the strategy a run config names and runs all rounds.

With ``flwr run`` (both modes of ``flower_runner.py``) the run config's ``config-file`` names
the TOML snapshot to use.
"""
from __future__ import annotations

import logging
import sys

from flwr.app import ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp

from configs import RunConfig, load_config
from networks.checkpoint import run_meta
from networks.factory import build_for_run

from .base import LOCAL_ONLY_KEYS, to_record
from .registry import strategy_class
from .reporting import RunReporter

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


def run_server(grid: Grid, cfg: RunConfig) -> None:
    """All rounds of run ``cfg`` on ``grid``; outputs go to ``cfg.out_dir``."""
    ensure_progress_logging()
    reporter = RunReporter(cfg.out_dir, cfg.rounds, run_meta(cfg, None))
    try:
        strategy = strategy_class(cfg.strategy)(cfg, reporter)
        initial = to_record(strategy.initial_arrays(build_for_run(cfg, site=0)))
        record = {k: v for k, v in cfg.to_dict().items() if k not in LOCAL_ONLY_KEYS}
        strategy.start(grid, initial, num_rounds=cfg.rounds, train_config=ConfigRecord(record),
                       evaluate_config=ConfigRecord(record))
    finally:
        reporter.close()


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    path = str(context.run_config.get("config-file", ""))
    if not path:
        raise ValueError("run config key 'config-file' is empty: pass --run-config "
                         "\"config-file='<out_dir>/config.toml'\" to flwr run")
    run_server(grid, load_config(path))
