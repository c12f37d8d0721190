"""One part of a deployment per machine: the coordinator, one site, or the submission.

The ``superlink``, ``site`` and ``launch`` subcommands of ``flower_runner.py``. Each starts
the building blocks of :mod:`deployment.launch` for its part alone and runs until Ctrl-C (the
submission: until the run ends); docs/deployment.md shows a whole multi-machine run.
"""
from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Dict, Optional

from .launch import (RUN_FAILED, DeployOptions, PortPlan, check_out_dir_not_packed,
                     interrupted_code, process_group, register_keys, start_site,
                     start_superlink, stop_children, submit_run, write_flwr_config)
from .processes import (ChildFailed, DeploymentError, Interrupted, ProcessGroup,
                        check_ports_free, interrupts_raise)
from .supervisor import WorkerSupervisor, block_until_exit

log = logging.getLogger("fedicra.deploy")


def serve_superlink(port: int, out_dir: Path, opts: DeployOptions) -> int:
    """Run only the coordinator until Ctrl-C (multi-machine deployments)."""
    out_dir = out_dir.resolve()
    check_ports_free({f"SuperLink (--port {port})": port}, host=opts.host if opts.host not in
                     ("0.0.0.0", "::") else "0.0.0.0")
    flwr_home = out_dir / "flwr_home"
    group = process_group(out_dir)
    try:
        with interrupts_raise():
            start_superlink(group, port, flwr_home, opts)
            if opts.enable_supernode_auth and opts.auth_keys:
                keys = sorted(Path(opts.auth_keys).glob("*.pub"))
                if not keys:
                    raise DeploymentError(f"--auth-keys: no *.pub public keys in {opts.auth_keys}")
                local = "127.0.0.1" if opts.host in ("0.0.0.0", "", "::") else opts.host
                write_flwr_config(flwr_home, f"{local}:{port}", replace(
                    opts, root_certificates=opts.root_certificates or opts.ssl_ca_certfile))
                register_keys(flwr_home, opts, keys)
            log.info("sites join with: python flower_runner.py site --cid K --superlink "
                     "<this host>:%d --config <snapshot>; submit with: python flower_runner.py "
                     "launch --superlink <this host>:%d --config <snapshot>", port, port)
            return block_until_exit(group)
    except Interrupted as err:
        return interrupted_code(err)
    except ChildFailed as err:
        log.error("%s", err)
        return RUN_FAILED
    finally:
        stop_children(group, opts)


def serve_site(snapshot: Path, cid: int, superlink: str, port: int, gpu: Optional[int],
               opts: DeployOptions, overrides: Optional[Dict[str, str]] = None) -> int:
    """Run only client ``cid`` (worker + SuperNode) until Ctrl-C.

    ``overrides`` (``root_path``, ``out_root``) replace the snapshot's data and output roots
    on this machine; logs and pids go to ``<out_dir>/site<cid>/``.
    """
    from configs import load_config

    snapshot = snapshot.resolve()
    cfg = load_config(snapshot).override(dict(overrides or {}), "site flags")
    out_dir = Path(cfg.out_dir).resolve()
    plan = PortPlan(port)
    check_ports_free(plan.site_ports(cid))
    group = process_group(out_dir / f"site{cid}")
    try:
        with interrupts_raise():
            site = start_site(group, cid, snapshot, superlink, out_dir, plan, gpu, opts,
                              threads=cfg.site_threads(sites_here=1), overrides=overrides)
            log.info("client %d joined %s; Ctrl-C to leave", site.cid, superlink)
            supervisor = WorkerSupervisor(group, {site.worker: cid}, opts.worker_restarts)
            return block_until_exit(group, supervisor)
    except Interrupted as err:
        return interrupted_code(err)
    except (ChildFailed, TimeoutError) as err:
        log.error("site %d failed: %s", cid, err)
        return RUN_FAILED
    finally:
        stop_children(group, opts)


def launch_run(snapshot: Path, superlink: str, opts: DeployOptions) -> int:
    """Submit the run of ``snapshot`` to a running SuperLink and stream it (no other children)."""
    from configs import load_config

    out_dir = Path(load_config(snapshot).out_dir).resolve()
    check_out_dir_not_packed(out_dir)
    flwr_home = out_dir / "flwr_home"
    write_flwr_config(flwr_home, superlink, opts)
    group = ProcessGroup(out_dir / "logs")
    try:
        with interrupts_raise():
            return submit_run(group, snapshot, flwr_home, opts, stop_run=True)
    except Interrupted as err:
        return interrupted_code(err)
    finally:
        group.stop_all(opts.stop_timeout)
