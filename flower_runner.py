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
from typing import Dict, List, Mapping, Optional, Tuple

import preflight
from configs import RunConfig, config_dir, load_config, read_config_values, save_config

log = logging.getLogger("fedicra")

def _strategies() -> str:
    from strategies.registry import strategy_names
    return ", ".join(strategy_names())


def _networks() -> str:
    from networks.registry import network_names
    return ", ".join(network_names())


def _procedures() -> str:
    from losses.objective import procedure_names
    return ", ".join(procedure_names())


def _tasks() -> str:
    from dataloaders.tasks import task_names
    return ", ".join(task_names())


#: Flags that map one-to-one onto RunConfig fields (the seed README's names kept):
#: name -> (type, help; a callable adds the valid names from its registry).
_FLAGS = {
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


SUBCOMMANDS = ("superlink", "site", "launch", "stop", "certs")


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
    for name, (kind, spec) in _FLAGS.items():
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


def security_options(args: argparse.Namespace) -> Dict[str, object]:
    """DeployOptions fields of ``--tls DIR`` / ``--auth-keys DIR`` (where a parser has them)."""
    from deployment.certs import server_files

    values: Dict[str, object] = {}
    tls = getattr(args, "tls", None)
    if tls is not None:
        files = server_files(tls.resolve())
        missing = [str(f) for f in files.values() if not f.is_file()]
        if missing:
            raise preflight.PreflightError(
                f"--tls: {', '.join(missing)} not found; write them with python "
                f"flower_runner.py certs --out {tls}")
        values.update(ssl_certfile=str(files["certfile"]), ssl_keyfile=str(files["keyfile"]),
                      ssl_ca_certfile=str(files["ca"]), root_certificates=str(files["ca"]))
    keys = getattr(args, "auth_keys", None)
    if keys is not None:
        if not keys.is_dir():
            raise preflight.PreflightError(f"--auth-keys: {keys} is not a folder; write the keys "
                                           f"with python flower_runner.py certs --out {keys}")
        if tls is None and not getattr(args, "ssl_certfile", ""):
            raise preflight.PreflightError("--auth-keys: Flower authenticates SuperNodes only "
                                           "over TLS; add --tls DIR")
        values.update(auth_keys=str(keys.resolve()), enable_supernode_auth=True)
    return values


def add_tls_client_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(*spellings("root-certificates"), dest="root_certificates", default="",
                   help="CA certificate to verify the SuperLink's TLS certificate "
                        "(default: insecure, plain HTTP)")


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


def parse_subcommand(argv: List[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="flower_runner.py", description="Deployment parts")
    sub = p.add_subparsers(dest="command", required=True)
    link = sub.add_parser("superlink", help="start only the coordinator (SuperLink)")
    link.add_argument("--port", type=int, default=RunConfig().port,
                      help="SuperLink HTTP port (Fleet, Control and ServerAppIo APIs)")
    link.add_argument("--host", default="127.0.0.1",
                      help="address to bind; 0.0.0.0 to accept sites from other machines")
    link.add_argument(*spellings("out_dir"), dest="out_dir", type=Path, default=Path("model") / "superlink",
                      help="folder for logs, pids.json and FLWR_HOME")
    link.add_argument(*spellings("ssl-certfile"), dest="ssl_certfile", default="",
                      help="TLS certificate of the SuperLink (PEM)")
    link.add_argument(*spellings("ssl-keyfile"), dest="ssl_keyfile", default="",
                      help="TLS private key of the SuperLink (PEM)")
    link.add_argument(*spellings("ssl-ca-certfile"), dest="ssl_ca_certfile", default="",
                      help="CA certificate that signed the SuperLink's certificate (PEM)")
    link.add_argument(*spellings("enable-supernode-auth"), dest="enable_supernode_auth", action="store_true",
                      help="accept only SuperNodes whose public keys are registered (needs TLS)")
    add_security_flags(link, "SuperNode authentication: enable it and register every "
                             "DIR/*.pub once the SuperLink is up (needs TLS)")
    add_deploy_flags(link)
    site = sub.add_parser("site", help="start one hospital: its site worker and SuperNode")
    site.add_argument("--cid", type=int, required=True, help="client id (site index)")
    site.add_argument("--superlink", required=True, help="HOST:PORT of the SuperLink")
    site.add_argument("--config", type=Path, required=True, help="the run's config.toml snapshot")
    site.add_argument("--port", type=int, default=None,
                      help="base port (default: the snapshot's); SuperNode on port + 1 + 2*cid, "
                           "worker on port + 2 + 2*cid")
    site.add_argument("--gpu", type=int, default=None, help="GPU id for this site (default CPU)")
    site.add_argument(*spellings("root_path"), dest="root_path", help="this site's data root (default: the snapshot's)")
    site.add_argument(*spellings("out_root"), dest="out_root", help="this site's output root (default: the snapshot's)")
    site.add_argument(*spellings("auth-supernode-private-key"), dest="auth_supernode_private_key", default="",
                      help="private key for SuperNode authentication (needs TLS)")
    add_tls_client_flags(site)
    add_deploy_flags(site)
    launch = sub.add_parser("launch", help="submit a run to a running SuperLink and stream it")
    launch.add_argument("--superlink", required=True, help="HOST:PORT of the SuperLink")
    launch.add_argument(*spellings("dry-run"), dest="dry_run", action="store_true",
                        help="only write the snapshot <out_root>/<exp>/config.toml (to copy to "
                             "the sites) and print its path")
    add_run_flags(launch)
    add_tls_client_flags(launch)
    certs = sub.add_parser("certs", help="write a development CA, the SuperLink's TLS "
                                          "certificate and SuperNode authentication keys")
    certs.add_argument("--out", type=Path, required=True,
                       help="folder (created 0700): ca.crt, ca.key, server.pem, server.key, "
                            "client<k>.key, client<k>.pub")
    certs.add_argument("--clients", type=int, default=5,
                       help="SuperNode key pairs to write, client0 .. client<N-1> (default 5)")
    certs.add_argument("--host", action="append", default=[], metavar="NAME",
                       help="extra name or IP of the SuperLink in its certificate (repeatable; "
                            "localhost, 127.0.0.1 and ::1 are always in)")
    certs.add_argument("--days", type=int, default=365, help="validity in days (default 365)")
    certs.add_argument("--overwrite", action="store_true",
                       help="replace existing keys and certificates (otherwise refused)")
    add_stop_flags(sub.add_parser("stop", help="stop what a run left running, from its pids.json"))
    return p.parse_args(argv)


def add_stop_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", type=Path, help="the run's folder, model/<exp> (for a site: "
                   "<out_root>/<exp>/site<k>)")
    p.add_argument(*spellings("stop-timeout"), dest="stop_timeout", type=float, default=10.0,
                   help="seconds a recorded process of the run gets after SIGTERM before "
                        "SIGKILL (the others: at most 3 s)")


def stop_main(argv: List[str]) -> int:
    """``flower_runner.py stop RUN_DIR``: stop what the run left running
    (:func:`deployment.processes.stop_recorded`). Its own small parser: the full one imports
    every registry (torch), which a machine in trouble should not have to wait for."""
    from deployment.processes import stop_recorded

    p = argparse.ArgumentParser(prog="flower_runner.py stop",
                                description="stop what a run left running, from its pids.json")
    add_stop_flags(p)
    args = p.parse_args(argv)
    try:
        stopped, left = stop_recorded(args.run_dir / "pids.json", args.stop_timeout)
    except (ValueError, FileNotFoundError) as err:
        log.error("error: %s", err)
        return 2
    log.info("stopped %s", ", ".join(f"{n} ({p})" for p, n in sorted(stopped.items()))
             if stopped else "nothing: no process of this run was running")
    if left:
        log.info("left alone (no longer processes of this run): %s",
                 "; ".join(f"{n}: {why}" for n, why in left.items()))
    return 0


def _parse_value(text: str):
    from configs.schema import tomllib

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
    values: Dict[str, object] = {k: getattr(args, k) for k in _FLAGS if getattr(args, k) is not None}
    if args.gpus is not None:
        values["gpus"] = args.gpus
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        values[key.strip()] = _parse_value(value.strip())
    return values


def resolve_layers(args: argparse.Namespace) -> Tuple[RunConfig, Dict[str, str]]:
    """The run configuration and, for every key not left at its schema default, its source.

    Layers, later ones winning: the schema defaults, the strategy's own defaults (its paper's
    network, objective and hyper-parameters, declared beside its registration), the config
    file, the command line. The strategy name is canonicalised (``fedavg`` -> ``FedAvg``) and
    ``exp`` resolved (default ``<img_class>/<strategy>``).
    """
    from strategies.registry import strategy_class

    path = config_file(args)
    file_values = read_config_values(path) if path is not None else {}
    flags = flag_values(args)
    name = str(flags.get("strategy", file_values.get("strategy", RunConfig().strategy)))
    try:
        strategy = strategy_class(name)
    except ValueError as err:
        raise preflight.PreflightError(f"--strategy: {err}") from None
    layers = [("strategy " + strategy.name, dict(strategy.defaults)),
              (str(path), file_values), ("command line", flags)]
    merged: Dict[str, object] = {}
    sources: Dict[str, str] = {}
    for source, values in layers:
        merged.update(values)
        sources.update({k: source for k in values})
    merged["strategy"] = strategy.name
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
    """Schema defaults < strategy defaults < config file < flags (see :func:`resolve_layers`)."""
    return resolve_layers(args)[0]


def _same_value(cfg: RunConfig, key: str, value: object) -> bool:
    """Whether flag ``key = value`` leaves run ``cfg`` as it is (paths resolved, the strategy
    name canonicalised, ``exp`` placeholders filled in)."""
    from strategies.registry import strategy_class

    try:
        if key == "strategy":
            value = strategy_class(str(value)).name
        other = cfg.override({key: value}, "command line")
    except ValueError:
        return False
    if key in ("root_path", "out_root"):
        return Path(getattr(other, key)).resolve() == Path(getattr(cfg, key)).resolve()
    if key == "exp":
        return other.exp_name == cfg.exp_name
    return getattr(other, key) == getattr(cfg, key)


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
    from deployment.run_folder import claim_existing
    from strategies.base import LOCAL_ONLY_KEYS
    from strategies.registry import strategy_class
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
        if key not in LOCAL_ONLY_KEYS and not _same_value(cfg, key, value):
            name = f"--{key}" if key in _FLAGS else f"--set {key}="
            conflicts.append(f"{name}{' ' if key in _FLAGS else ''}{value!r} "
                             f"(the run's: {getattr(cfg, key, '?')!r})")
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
    if not getattr(strategy_class(cfg.strategy), "federated", True):
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


def setup_logging() -> None:
    for old in list(log.handlers):  # main() may run more than once in one process (tests)
        log.removeHandler(old)
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False


def run_simulation_mode(cfg: RunConfig, args: argparse.Namespace) -> int:
    """All sites in Flower's Simulation Engine behind a local SuperLink (``flwr run``);
    clients share ``cfg.gpus`` (CPU if none)."""
    import torch

    from deployment.simulation import run_simulation

    num_gpus = 0.0
    if cfg.gpus and torch.cuda.is_available():
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(str(g) for g in cfg.gpus)
        num_gpus = min(1.0, len(cfg.gpus) / cfg.num_clients)
    elif cfg.gpus:
        log.warning("--gpus %s given but CUDA is not available: training on the CPU", cfg.gpus)
    return run_simulation(cfg, num_gpus, deploy_options(args))


def deploy_options(args: argparse.Namespace, **extra):
    from deployment.launch import DeployOptions

    extra.setdefault("resume", getattr(args, "resume", None) is not None)
    for key, value in security_options(args).items():  # --tls, --auth-keys
        extra.setdefault(key, value)
    extra.setdefault("root_certificates", getattr(args, "root_certificates", ""))
    for key in ("ssl_certfile", "ssl_keyfile", "ssl_ca_certfile", "root_certificates",
                "auth_private_key"):
        if extra.get(key):  # given relative to here; the Flower processes run in the repository
            extra[key] = str(Path(str(extra[key])).resolve())
    return DeployOptions(poll_interval=args.poll_interval, stop_timeout=args.stop_timeout,
                         clientapp_exec=args.clientapp_exec, pack_arrays=args.pack_arrays,
                         **extra)


def absolute_paths(cfg: RunConfig) -> RunConfig:
    """Deployment processes run in other folders: pin data and output roots to absolute paths."""
    return cfg.override({"out_root": str(Path(cfg.out_root).resolve()),
                         "root_path": str(Path(cfg.root_path).resolve())}, "absolute paths")


def check_startable(cfg: RunConfig) -> None:
    """What the deployment and the simulation would refuse, checked before anything is
    written: an output folder that ``flwr run`` would pack, a busy port (DeploymentError)."""
    from strategies.registry import strategy_class

    if not getattr(strategy_class(cfg.strategy), "federated", True):
        return  # CT-*: no Flower processes
    from deployment.launch import check_out_dir_not_packed, planned_ports
    from deployment.processes import check_ports_free

    check_out_dir_not_packed(Path(cfg.out_dir).resolve())
    check_ports_free(planned_ports(cfg))


def prepared_snapshot(args: argparse.Namespace, cfg: RunConfig) -> bool:
    """Whether ``launch --config`` submits the snapshot a ``launch --dry-run`` wrote into the
    run's own folder (``<out_root>/<exp>/config.toml``, the file the sites were started with)
    and no round has been recorded there yet: then the folder is used as it is (no
    ``--overwrite`` needed, live sites expected). Flags that would change that snapshot are
    refused, since the sites run with it."""
    if args.dry_run or args.overwrite or args.config is None:
        return False
    out_dir = Path(cfg.out_dir)
    snapshot = out_dir / "config.toml"
    if not snapshot.is_file() or args.config.resolve() != snapshot.resolve():
        return False
    if (out_dir / "metrics.csv").exists() or (out_dir / "global" / "latest.pt").exists():
        raise preflight.PreflightError(
            f"--config: the run of {snapshot} has recorded rounds already; pass --overwrite to "
            "start it again from round 1 (stop its sites first), or write a new snapshot with "
            "launch --dry-run --exp <another>")
    changed = sorted(k for k, v in load_config(snapshot).to_dict().items()
                     if cfg.to_dict().get(k) != v)
    if changed:
        raise preflight.PreflightError(
            f"--config: {snapshot} is the snapshot the sites run with; the flags change "
            f"{', '.join(changed)}. Drop them, or write a new snapshot with launch --dry-run "
            "(and restart the sites with it)")
    return True


def subcommand_main(argv: List[str]) -> int:
    if argv[0] == "stop":
        return stop_main(argv[1:])
    from deployment import multi_machine
    from deployment.processes import DeploymentError

    args = parse_subcommand(argv)
    try:
        if args.command == "certs":
            from deployment.certs import write_certs

            written = write_certs(args.out, args.clients, args.host, args.days, args.overwrite)
            log.info("wrote %s to %s (private keys 0600)", ", ".join(p.name for p in written),
                     args.out.resolve())
            return 0
        if args.command == "superlink":
            given = {k: getattr(args, k) for k in ("ssl_certfile", "ssl_keyfile",
                                                   "ssl_ca_certfile", "enable_supernode_auth")
                     if getattr(args, k)}  # else from --tls / --auth-keys
            opts = deploy_options(args, host=args.host, **given)
            return multi_machine.serve_superlink(args.port, args.out_dir, opts)
        if args.command == "site":
            opts = deploy_options(args, auth_private_key=args.auth_supernode_private_key)
            overrides = {k: getattr(args, k) for k in ("root_path", "out_root") if getattr(args, k)}
            snapshot = load_config(args.config).override(overrides, "site flags")
            preflight.check_names(snapshot)
            if not 0 <= args.cid < snapshot.num_clients:
                raise preflight.PreflightError(f"--cid: {args.cid} is not a client of this run "
                                               f"(0..{snapshot.num_clients - 1})")
            counts = preflight.count_cases(snapshot, sites=[args.cid])
            preflight.check_gpus([] if args.gpu is None else [args.gpu])
            log.info("site %d data: %s", args.cid, preflight.describe_counts(counts))
            port = args.port if args.port is not None else snapshot.port
            from deployment.launch import PortPlan
            from deployment.processes import check_ports_free
            from deployment.run_folder import claim_site

            check_ports_free(PortPlan(port).site_ports(args.cid))  # before anything is written
            claim_site(Path(snapshot.out_dir).resolve(), snapshot.exp_name, args.cid)
            return multi_machine.serve_site(args.config, args.cid, args.superlink, port, args.gpu,
                                            opts, overrides)
        cfg = absolute_paths(resolve_config(args))
        preflight.check_run(cfg, data=False)  # the data lives on the sites
        from deployment.run_folder import refuse_live

        refuse_live(cfg.out_dir, sites=False)  # a live launch or run holds the folder
        prepared = prepared_snapshot(args, cfg)
        preflight.claim_output(cfg.out_dir, args.overwrite, cfg.exp_name, role="launch",
                               prepared=prepared)  # held until the run ends
        if not prepared:
            save_config(cfg, cfg.out_dir / "config.toml")
        if args.dry_run:
            log.info("snapshot written: %s", (cfg.out_dir / "config.toml").resolve())
            return 0
        return multi_machine.launch_run(cfg.out_dir / "config.toml", args.superlink,
                                        deploy_options(args))
    except (ValueError, FileNotFoundError, FileExistsError, DeploymentError) as err:
        log.error("error: %s", err)
        return 2


def main(argv: Optional[List[str]] = None) -> int:
    """The command line; the lock on the run folder (:mod:`deployment.run_folder`) is held
    until it returns."""
    from deployment.run_folder import release_all

    try:
        return _main(argv)
    finally:
        release_all()


def _main(argv: Optional[List[str]] = None) -> int:
    from deployment.processes import DeploymentError

    setup_logging()
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in SUBCOMMANDS:
        return subcommand_main(argv)
    done = 0
    try:
        args = parse_args(argv)
        security_options(args)  # --tls / --auth-keys: their files exist
        if args.resume is not None:
            cfg, sources, counts, done = prepare_resume(args)
        else:
            cfg, sources = resolve_layers(args)
            cfg = absolute_paths(cfg)  # Flower's processes run in other folders
            counts = preflight.check_run(cfg)
            check_startable(cfg)  # busy port, packed folder: refused before anything is written
            preflight.claim_output(cfg.out_dir, args.overwrite, cfg.exp_name)  # marker + lock
    except (ValueError, FileNotFoundError, DeploymentError) as err:
        log.error("error: %s", err)
        return 2
    out_dir = cfg.out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    if not done:
        save_config(cfg, out_dir / "config.toml")
    log.info("%s -> %s", describe(cfg, sources), out_dir)
    if done:
        log.info("resuming after round %d of %d", done, cfg.rounds)
    log.info("data: %s", preflight.describe_counts(counts))
    from deployment.launch import run_deployment
    from strategies.registry import strategy_class

    outcome: Dict[str, object] = {}  # what the end-of-run summary adds to metrics.csv
    try:
        if not getattr(strategy_class(cfg.strategy), "federated", True):
            from clients.centralised import run_centralised  # CT-*: pooled sites, no Flower

            code = run_centralised(cfg)
        elif cfg.mode == "simulation":
            code = run_simulation_mode(cfg, args)
        else:
            code = run_deployment(cfg, deploy_options(args), outcome=outcome)
    except DeploymentError as err:
        log.error("error: %s", err)
        return 2
    if code:
        return code
    if (out_dir / "metrics.csv").is_file():
        from configs.metrics_csv import summary_table

        log.info("summary of %s:\n%s", cfg.exp, summary_table(
            out_dir / "metrics.csv", dropped=outcome.get("dropped")))
    log.info("done. Test every client: python test_client.py --client all --exp %s --out_root %s",
             cfg.exp, cfg.out_root)
    log.info("TensorBoard: tensorboard --logdir %s", out_dir / "tb")
    return 0


if __name__ == "__main__":
    os.umask(0o077)  # what a run writes is private: files 0600, folders 0700 (docs/deployment.md)
    sys.exit(main())
