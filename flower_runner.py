"""Train a federation: ``python flower_runner.py --strategy FedICRA --img_class faz ...``.

Settings come from a TOML file (``--config``, default ``configs/<img_class>.toml`` when it
exists) overridden by command-line flags; the resolved configuration is saved as
``<out_root>/<exp>/config.toml`` before anything runs. ``--mode simulation`` runs every site
in Flower's Simulation Engine on this machine; ``--mode deployment`` starts a real SuperLink,
one SuperNode and one persistent site worker per client on this machine (loopback), submits
the run with ``flwr run`` and stops everything afterwards (see docs/deployment.md).

``--resume model/<exp>`` continues an interrupted run after its last completed round, from the
folder's own ``config.toml`` (see :func:`prepare_resume`).

Across machines the same parts start apart:

    python flower_runner.py superlink --port P [--host 0.0.0.0]           # coordinator
    python flower_runner.py site --cid K --superlink HOST:P --config SNAP  # each hospital
    python flower_runner.py launch --superlink HOST:P --config SNAP        # submit the run
    python flower_runner.py certs --out DIR --clients N    # TLS certificates, SuperNode keys
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Callable, Dict, List, Optional

import preflight
from configs.devices import usable_gpus
from configs.flags import add_run_flags, add_security_flags
from configs.layers import absolute_paths, describe, resolve_config, resolve_layers  # noqa: F401
from configs.metrics_csv import summary_table
from configs.resume import prepare_resume
from configs.schema import RunConfig, describe_ignored as describe_ignored_keys, save_config
from deployment.cli import (SUBCOMMANDS, check_startable, deploy_options, security_options,
                            subcommand_main)
from deployment.launch import run_deployment
from deployment.processes import DeploymentError
from deployment.run_folder import release_all
from deployment.simulation import run_simulation

log = logging.getLogger("fedicra")


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                epilog="subcommands for multi-machine deployments: "
                                       + ", ".join(SUBCOMMANDS) + " (see --help of each)")
    add_run_flags(p)
    add_security_flags(p, "deployment: SuperNode authentication; SuperNode k signs with "
                          "DIR/client<k>.key and the SuperLink admits only the registered "
                          "DIR/client<k>.pub (python flower_runner.py certs; needs --tls)")
    p.add_argument("--resume", type=Path, default=None, metavar="RUN_DIR",
                   help="continue the interrupted run in RUN_DIR (model/<exp>) after its last "
                        "completed round, with the settings of its config.toml (no other run "
                        "flags needed; only --port, --gpus, --mode, --set cpus_per_client=N and "
                        "the deployment process flags may change)")
    return p.parse_args(argv)


def setup_logging() -> None:
    for old in list(log.handlers):  # main() may run more than once in one process (tests)
        log.removeHandler(old)
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False


def train_centralised(cfg: RunConfig, args: argparse.Namespace, outcome: Dict) -> int:
    """CT-*: the method's own trainer on the pooled sites, no Flower."""
    return cfg.method.train(cfg)


def train_simulation(cfg: RunConfig, args: argparse.Namespace, outcome: Dict) -> int:
    """All sites in Flower's Simulation Engine behind a local SuperLink (``flwr run``);
    clients share ``cfg.gpus`` (CPU if none)."""
    num_gpus = 0.0
    if usable_gpus(cfg.gpus, log):  # else the CPU, with a warning when --gpus named any
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(str(g) for g in cfg.gpus)
        num_gpus = min(1.0, len(cfg.gpus) / cfg.num_clients)
    return run_simulation(cfg, num_gpus, deploy_options(args))


def train_deployment(cfg: RunConfig, args: argparse.Namespace, outcome: Dict) -> int:
    """Real Flower processes on this machine: SuperLink, SuperNodes, site workers."""
    return run_deployment(cfg, deploy_options(args), outcome=outcome)


#: How a run is trained: centralised (a method that is not federated), or the run's mode.
TRAINERS: Dict[str, Callable[[RunConfig, argparse.Namespace, Dict], int]] = {
    "centralised": train_centralised, "simulation": train_simulation,
    "deployment": train_deployment}


def how_trained(cfg: RunConfig) -> str:
    return cfg.mode if cfg.method.federated else "centralised"


def main(argv: Optional[List[str]] = None) -> int:
    """The command line; the lock on the run folder (:mod:`deployment.run_folder`) is held
    until it returns."""
    try:
        return _main(argv)
    finally:
        release_all()


def prepare(args: argparse.Namespace):
    """The configuration, its sources, the data counts and the rounds already done; the run
    folder is claimed (marker and lock) once every check passed."""
    security_options(args)  # --tls / --auth-keys: their files exist
    if args.resume is not None:
        return prepare_resume(args)
    cfg, sources = resolve_layers(args)
    cfg = absolute_paths(cfg)  # Flower's processes run in other folders
    counts = preflight.check_run(cfg)
    check_startable(cfg)  # busy port, packed folder: refused before anything is written
    preflight.claim_output(cfg.out_dir, args.overwrite, cfg.exp_name)  # marker + lock
    return cfg, sources, counts, 0


def _main(argv: Optional[List[str]] = None) -> int:
    setup_logging()
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in SUBCOMMANDS:
        return subcommand_main(argv)
    try:
        args = parse_args(argv)
        cfg, sources, counts, done = prepare(args)
    except (ValueError, FileNotFoundError, DeploymentError) as err:
        log.error("error: %s", err)
        return 2
    out_dir = cfg.out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    if not done:
        save_config(cfg, out_dir / "config.toml")
    log.info("%s -> %s", describe(cfg, sources), out_dir)
    if cfg.ignored_keys:
        log.info("%s", describe_ignored_keys(cfg))
    if done:
        log.info("resuming after round %d of %d", done, cfg.rounds)
    log.info("data: %s", preflight.describe_counts(counts))
    outcome: Dict[str, object] = {}  # what the end-of-run summary adds to metrics.csv
    try:
        code = TRAINERS[how_trained(cfg)](cfg, args, outcome)
    except DeploymentError as err:
        log.error("error: %s", err)
        return 2
    if code:
        return code
    if (out_dir / "metrics.csv").is_file():
        log.info("summary of %s:\n%s", cfg.exp, summary_table(
            out_dir / "metrics.csv", dropped=outcome.get("dropped")))
    log.info("done. Test every client: python test_client.py --client all --exp %s --out_root %s",
             cfg.exp, cfg.out_root)
    log.info("TensorBoard: tensorboard --logdir %s", out_dir / "tb")
    return 0


if __name__ == "__main__":
    os.umask(0o077)  # what a run writes is private: files 0600, folders 0700 (docs/deployment.md)
    sys.exit(main())
