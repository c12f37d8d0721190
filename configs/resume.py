"""The resume policy: what ``flower_runner.py --resume RUN_DIR`` may change, and the state it
puts the run folder in before the run continues."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Dict, Tuple

import preflight

from .flags import RUN_FLAGS, flag_values
from .layers import absolute_paths, same_value
from .schema import LOCAL_ONLY_KEYS, RunConfig, load_config, save_config


def _value_or(cfg: RunConfig, key: str) -> object:
    try:
        return cfg.get(key)
    except KeyError:
        return "?"


def prepare_resume(args: argparse.Namespace) -> Tuple[RunConfig, Dict[str, str], Dict, int]:
    """The configuration, sources, data counts and last completed round of ``--resume RUN_DIR``.

    The run's settings are its ``config.toml`` snapshot. Flags that only say where and how it
    runs here (``--port``, ``--gpus``, ``--mode``, ``--set cpus_per_client=N``) may change;
    any other run flag, ``--config`` or ``--overwrite`` is refused unless it repeats the
    snapshot's value. A folder moved since (with its ``<exp>`` path) is followed. Refused:
    a centralised run (CT-*), a folder a live run or site holds (its lock names the pid;
    the lock is taken here and held until the process ends), a busy port, a run with no
    completed round, a finished run. Then every
    site's checkpoint is put back to that round (:func:`strategies.resume.rollback_sites`)
    and the snapshot is rewritten when a local setting or the folder changed.
    """
    from deployment.cli import check_startable
    from deployment.run_folder import claim_existing
    from strategies.resume import resume_point, rollback_sites

    run_dir = Path(args.resume)
    snapshot = run_dir / "config.toml"
    if not snapshot.is_file():
        raise preflight.PreflightError(f"--resume: {run_dir} holds no config.toml, so it is not "
                                       "the folder of a run (model/<exp>)")
    saved = load_config(snapshot)
    cfg = saved
    here = run_dir.resolve()
    if Path(cfg.out_dir).resolve() != here:  # the folder moved: follow it
        parts = Path(cfg.exp_name).parts
        if here.parts[-len(parts):] != parts:
            raise preflight.PreflightError(
                f"--resume: {run_dir} does not end with the snapshot's experiment path "
                f"{cfg.exp_name!r} (its run folder was {cfg.out_dir})")
        cfg = cfg.override({"out_root": str(Path(*here.parts[:-len(parts)]))}, "--resume folder")
    flags = flag_values(args)
    conflicts = []
    for key, value in flags.items():
        if key not in LOCAL_ONLY_KEYS and not same_value(cfg, key, value):
            name = f"--{key}" if key in RUN_FLAGS else f"--set {key}="
            conflicts.append(f"{name}{' ' if key in RUN_FLAGS else ''}{value!r} "
                             f"(the run's: {_value_or(cfg, key)!r})")
    if args.config is not None:
        conflicts.append(f"--config {args.config} (the run's settings are its snapshot)")
    if args.overwrite:
        conflicts.append("--overwrite (it would delete the run to resume)")
    if conflicts:
        raise preflight.PreflightError(
            f"--resume continues the run as its snapshot {snapshot} defines it; these flags "
            f"conflict with it: {'; '.join(conflicts)}. Drop them (only --port, --gpus, --mode, "
            "--set cpus_per_client=N and the deployment process flags may change)")
    local = {k: v for k, v in flags.items() if k in LOCAL_ONLY_KEYS}
    cfg = absolute_paths(cfg.override(local, "command line").validate())
    counts = preflight.check_run(cfg)
    if not cfg.method.federated:
        raise preflight.PreflightError(
            f"--resume: {cfg.strategy} is centralised training (no federated rounds to "
            "continue) and cannot be resumed; run it again with --overwrite")
    claim_existing(cfg.out_dir, cfg.exp_name)  # refused while the run (or a site) is alive
    check_startable(cfg)  # busy port: refused before a checkpoint or the snapshot is touched
    done = int(resume_point(cfg)["round"])
    rollback_sites(cfg, done)
    if cfg.to_dict() != saved.to_dict():
        save_config(cfg, cfg.out_dir / "config.toml")
    sources = {k: "snapshot" for k in cfg.to_dict()}
    sources.update({k: "command line" for k in local})
    sources["config file"] = str(snapshot)
    return cfg, sources, counts, done
