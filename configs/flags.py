"""The command-line flags that define a run, and the keys they set.

Every named flag maps one-to-one onto a :class:`configs.schema.RunConfig` key (the seed
README's names kept); ``--set KEY=VALUE`` reaches every other key, a method's included.
Multi-word flags are accepted with ``_`` and ``-``.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Dict, List, Optional

from .schema import RunConfig, config_dir, tomllib


def _strategies() -> str:
    from methods.registry import method_names
    return ", ".join(method_names())


def _networks() -> str:
    from networks.registry import network_names
    return ", ".join(network_names())


def _procedures() -> str:
    from losses.objective import procedure_names
    return ", ".join(procedure_names())


def _tasks() -> str:
    from dataloaders.tasks import task_names
    return ", ".join(task_names())


#: name -> (type, help; a callable adds the valid names from its registry).
RUN_FLAGS = {
    "strategy": (str, ("federated method (default FedICRA; sets its own network, objective "
                       "and hyper-parameters)", _strategies)),
    "model": (str, ("network (default: the strategy's)", _networks)),
    "procedure": (str, ("training objective (default: the strategy's)", _procedures)),
    "img_class": (str, ("task; also picks configs/<img_class>.toml when --config is not given",
                        _tasks)),
    "root_path": (str, "data root holding Domain1..DomainK/{train,test}/*.h5"),
    "exp": (str, "experiment name: outputs go to <out_root>/<exp> (default <img_class>/<strategy>)"),
    "out_root": (str, "folder holding the experiments (default model)"),
    "rounds": (int, "federated rounds"),
    "iters": (int, "local iterations per round"),
    "rep_iters": (int, "FedICRA/FedRep: of the iters, how many train the body (the rest the head)"),
    "batch_size": (int, "batch size per site"),
    "base_lr": (float, "initial learning rate (poly decay over all local iterations)"),
    "alpha": (float, "weight of the site-contrastive term"),
    "img_size": (int, "training resolution in px, a multiple of 16 (0: the task's)"),
    "num_clients": (int, "number of clients, one per site (at most the task's sites)"),
    "seed": (int, "random seed of the whole run"),
    "eval_every": (int, "validate every N rounds (and at the last)"),
    "base_channels": (int, "width of the first U-Net stage"),
    "mode": (str, ("deployment: real Flower processes on this machine; simulation: Flower's "
                   "Simulation Engine", lambda: "deployment, simulation")),
    "port": (int, "deployment: SuperLink port; SuperNodes and workers use the ports above it"),
}


def spellings(name: str) -> List[str]:
    """``--base_lr`` and ``--base-lr`` (both accepted for every multi-word flag)."""
    names = [f"--{name}"]
    for variant in (name.replace("_", "-"), name.replace("-", "_")):
        if f"--{variant}" not in names:
            names.append(f"--{variant}")
    return names


def _help(spec) -> str:
    if isinstance(spec, tuple):
        text, names = spec
        return f"{text}; one of: {names()}"
    return spec


def add_run_flags(p: argparse.ArgumentParser) -> None:
    """The flags that define a run (shared by the plain form and ``launch``)."""
    p.add_argument("--config", type=Path,
                   help="TOML run configuration (default configs/<img_class>.toml; flags override it)")
    for name, (kind, spec) in RUN_FLAGS.items():
        p.add_argument(*spellings(name), dest=name, type=kind, default=None, help=_help(spec))
    p.add_argument("--gpus", type=int, nargs="*", default=None,
                   help="GPU ids the clients are spread over, round-robin (none: CPU)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any other configuration key of configs/schema.py, "
                        "e.g. --set lambda_crf=0.2")
    p.add_argument("--overwrite", action="store_true",
                   help="delete an earlier run in <out_root>/<exp> first (otherwise refused)")
    add_deploy_flags(p)


def add_deploy_flags(p: argparse.ArgumentParser) -> None:
    """Flags of the deployment processes (ignored by the simulation)."""
    p.add_argument(*spellings("poll-interval"), dest="poll_interval", type=float, default=0.1,
                   help="deployment: seconds between Flower's internal polls (0: Flower's "
                        "stock 3 s / 1 s intervals)")
    p.add_argument(*spellings("clientapp-exec"), dest="clientapp_exec",
                   choices=("persistent", "subprocess"), default="persistent",
                   help="deployment: one long-lived ClientApp executor per SuperNode "
                        "(persistent) or Flower's default new process per message (subprocess)")
    p.add_argument(*spellings("no-pack"), dest="pack_arrays", action="store_false",
                   help="deployment: send every array as its own Flower object (Flower's "
                        "default) instead of one packed array per message")
    p.add_argument(*spellings("stop-timeout"), dest="stop_timeout", type=float, default=10.0,
                   help="deployment: seconds a child gets after SIGTERM before SIGKILL")


def add_security_flags(p: argparse.ArgumentParser, auth_help: str) -> None:
    """``--tls DIR`` and ``--auth-keys DIR``: the files of ``flower_runner.py certs``."""
    p.add_argument("--tls", type=Path, default=None, metavar="DIR",
                   help="deployment: TLS with DIR/server.pem, DIR/server.key and DIR/ca.crt "
                        "(python flower_runner.py certs --out DIR); default plain HTTP")
    p.add_argument(*spellings("auth-keys"), dest="auth_keys", type=Path, default=None,
                   metavar="DIR", help=auth_help)


def add_tls_client_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(*spellings("root-certificates"), dest="root_certificates", default="",
                   help="CA certificate to verify the SuperLink's TLS certificate "
                        "(default: insecure, plain HTTP)")


def parse_value(text: str):
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def config_file(args: argparse.Namespace) -> Optional[Path]:
    """``--config``, else ``configs/<img_class>.toml`` when it exists, else none."""
    if args.config is not None:
        return args.config
    default = config_dir() / f"{args.img_class or RunConfig().img_class}.toml"
    return default if default.is_file() else None


def flag_values(args: argparse.Namespace) -> Dict[str, object]:
    """The keys the command line sets (named flags, ``--gpus``, every ``--set KEY=VALUE``)."""
    values: Dict[str, object] = {k: getattr(args, k) for k in RUN_FLAGS if getattr(args, k) is not None}
    if args.gpus is not None:
        values["gpus"] = args.gpus
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        values[key.strip()] = parse_value(value.strip())
    return values
