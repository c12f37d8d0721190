"""The deployment side of the command line: the multi-machine subcommands (``superlink``,
``site``, ``launch``, ``stop``, ``certs``) and the options of the Flower processes."""
from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Dict, List

import preflight
from configs.flags import (add_deploy_flags, add_run_flags, add_security_flags,
                           add_tls_client_flags, spellings)
from configs.layers import absolute_paths, resolve_config
from configs.schema import RunConfig, load_config, save_config

log = logging.getLogger("fedicra")

SUBCOMMANDS = ("superlink", "site", "launch", "stop", "certs")


def security_options(args: argparse.Namespace) -> Dict[str, object]:
    """DeployOptions fields of ``--tls DIR`` / ``--auth-keys DIR`` (where a parser has them)."""
    from .certs import server_files

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


def deploy_options(args: argparse.Namespace, **extra):
    from .launch import DeployOptions

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


def check_startable(cfg: RunConfig) -> None:
    """What the deployment and the simulation would refuse, checked before anything is
    written: an output folder that ``flwr run`` would pack, a busy port (DeploymentError)."""
    if not cfg.method.federated:
        return  # CT-*: no Flower processes
    from .launch import check_out_dir_not_packed, planned_ports
    from .processes import check_ports_free

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
    from .processes import stop_recorded

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


def subcommand_main(argv: List[str]) -> int:
    """``superlink``, ``site``, ``launch`` and ``certs`` (``stop``: :func:`stop_main`)."""
    if argv[0] == "stop":
        return stop_main(argv[1:])
    from . import multi_machine
    from .processes import DeploymentError

    args = parse_subcommand(argv)
    try:
        if args.command == "certs":
            from .certs import write_certs

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
            from .launch import PortPlan
            from .processes import check_ports_free
            from .run_folder import claim_site

            check_ports_free(PortPlan(port).site_ports(args.cid))  # before anything is written
            claim_site(Path(snapshot.out_dir).resolve(), snapshot.exp_name, args.cid)
            return multi_machine.serve_site(args.config, args.cid, args.superlink, port, args.gpu,
                                            opts, overrides)
        cfg = absolute_paths(resolve_config(args))
        preflight.check_run(cfg, data=False)  # the data lives on the sites
        from .run_folder import refuse_live

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
