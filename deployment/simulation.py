"""Simulation mode through Flower's current API: a SuperLink in simulation mode plus ``flwr run``.

``flwr.simulation.run_simulation`` is deprecated in Flower 1.42; the supported way is to submit
the app with ``flwr run`` to a SuperLink started with ``--simulation``, which runs the
ClientApps in its Simulation Engine (Ray). The app is the deployment one
(:mod:`deployment.server_app`, :mod:`deployment.bridge`); without a site worker in its node
config the bridge trains the site in the Simulation Engine's own process
(:func:`deployment.bridge.local_site`). The SuperLink runs in its own process group like every
deployment child, so one Ctrl-C stops everything (exit 130) and nothing is left running.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Optional

from .launch import (RUN_FAILED, DeployOptions, check_out_dir_not_packed, interrupted_code,
                     process_group, start_superlink, stop_children, submit_run,
                     write_flwr_config)
from .processes import ChildFailed, Interrupted, check_ports_free, interrupts_raise

log = logging.getLogger("fedicra.deploy")


def federation_config(cfg, num_gpus: float) -> str:
    """``--federation-config`` of ``flwr run``: one virtual SuperNode per client and the
    resources of each ClientApp (Ray actor)."""
    return (f"num-supernodes={int(cfg.num_clients)} "
            f"client-resources-num-cpus={cfg.site_threads()} "
            f"client-resources-num-gpus={float(num_gpus)} "
            f"init-args-logging-level='error'")


def run_simulation(cfg, num_gpus: float = 0.0, options: Optional[DeployOptions] = None) -> int:
    """Run ``cfg`` in Flower's Simulation Engine; returns 0 when the run completed, 1 when it
    failed, 128 + signal number when interrupted. ``cfg.out_dir/config.toml`` holds the
    snapshot."""
    opts = options or DeployOptions()
    out_dir = Path(cfg.out_dir).resolve()
    check_out_dir_not_packed(out_dir)
    port = int(cfg.port)
    check_ports_free({f"SuperLink (--port {port})": port})
    flwr_home = out_dir / "flwr_home"
    write_flwr_config(flwr_home, f"127.0.0.1:{port}", opts)
    group = process_group(out_dir)
    started = time.perf_counter()
    try:
        with interrupts_raise():
            start_superlink(group, port, flwr_home, opts, simulation=True)
            log.info("simulation SuperLink up in %.1f s", time.perf_counter() - started)
            return submit_run(group, out_dir / "config.toml", flwr_home, opts, watch=["superlink"],
                              federation_config=federation_config(cfg, num_gpus))
    except Interrupted as err:
        return interrupted_code(err)
    except (ChildFailed, TimeoutError) as err:
        log.error("simulation failed: %s", err)
        return RUN_FAILED
    finally:
        stop_children(group, opts)
