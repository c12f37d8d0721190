"""The run configuration from its layers, and where each value came from.

Layers, later ones winning: the schema defaults, the method's own defaults (its paper's
network, objective and hyper-parameters, declared in its registration: ``methods/<m>.py``),
the config file (``--config``, or ``configs/<img_class>.toml`` when it exists), the command
line (named flags and ``--set KEY=VALUE``).
"""
from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Dict, Mapping, Tuple

import preflight
from methods.registry import get_method

from .flags import config_file, flag_values
from .schema import RunConfig, read_config_values


def method_layer(name: str) -> Tuple[str, Dict[str, object]]:
    """The canonical name of method ``name`` and the values it sets by default."""
    try:
        entry = get_method(name)
    except ValueError as err:
        raise preflight.PreflightError(f"--strategy: {err}") from None
    values: Dict[str, object] = {"model": entry.model, "procedure": entry.procedure}
    values.update(entry.defaults)
    values.update(dataclasses.asdict(entry.params()))
    return entry.name, values


def resolve_layers(args: argparse.Namespace) -> Tuple[RunConfig, Dict[str, str]]:
    """The run configuration and, for every key not left at its schema default, its source.

    The strategy name is canonicalised (``fedavg`` -> ``FedAvg``) and ``exp`` resolved
    (default ``<img_class>/<strategy>``).
    """
    path = config_file(args)
    file_values = read_config_values(path) if path is not None else {}
    flags = flag_values(args)
    name, defaults = method_layer(str(flags.get("strategy", file_values.get(
        "strategy", RunConfig.strategy))))
    merged: Dict[str, object] = {}
    sources: Dict[str, str] = {}
    for source, values in (("strategy " + name, defaults), (str(path), file_values),
                           ("command line", flags)):
        merged.update(values)
        sources.update({k: source for k in values})
    merged["strategy"] = name
    if sources.get("rep_iters", "").startswith("strategy") and "iters" in merged:
        # a method's default share of body steps, on a schedule shorter than it: keep at least
        # one head step (the default suits the reference's iters = 10)
        capped = max(0, min(int(merged["rep_iters"]), int(merged["iters"]) - 1))
        if capped != merged["rep_iters"]:
            merged["rep_iters"] = capped
            sources["rep_iters"] += f", capped below iters = {merged['iters']}"
    sources["config file"] = str(path) if path is not None else "none"
    cfg = RunConfig.from_mapping(merged, "command line")
    cfg.exp = cfg.exp_name
    return cfg.validate(), sources


def resolve_config(args: argparse.Namespace) -> RunConfig:
    """Schema defaults < method defaults < config file < flags (see :func:`resolve_layers`)."""
    return resolve_layers(args)[0]


def same_value(cfg: RunConfig, key: str, value: object) -> bool:
    """Whether flag ``key = value`` leaves run ``cfg`` as it is (paths resolved, the strategy
    name canonicalised, ``exp`` placeholders filled in)."""
    try:
        if key == "strategy":
            value = get_method(str(value)).name
        other = cfg.override({key: value}, "command line")
        if key in ("root_path", "out_root"):
            return Path(other.get(key)).resolve() == Path(cfg.get(key)).resolve()
        if key == "exp":
            return other.exp_name == cfg.exp_name
        return other.get(key) == cfg.get(key)
    except (ValueError, KeyError):
        return False


def describe(cfg: RunConfig, sources: Mapping[str, str]) -> str:
    """One start-up line: what will be trained, and where each choice came from."""
    from dataloaders.tasks import get_task

    def item(key: str) -> str:
        return f"{getattr(cfg, key)} ({sources.get(key, 'default')})"

    size = cfg.img_size or get_task(cfg.img_class).image_size
    return (f"run {cfg.exp}: strategy {cfg.strategy}, network {item('model')}, objective "
            f"{item('procedure')}, task {cfg.img_class} at {size} px from {cfg.root_path}, "
            f"{cfg.num_clients} clients, {cfg.rounds} rounds x {cfg.iters} iterations, "
            f"seed {cfg.seed}, config file {sources.get('config file', 'none')}")


def absolute_paths(cfg: RunConfig) -> RunConfig:
    """Deployment processes run in other folders: pin data and output roots to absolute paths."""
    return cfg.override({"out_root": str(Path(cfg.out_root).resolve()),
                         "root_path": str(Path(cfg.root_path).resolve())}, "absolute paths")
