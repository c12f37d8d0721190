"""Train a federation: ``python flower_runner.py --strategy FedICRA --img_class faz ...``.

Settings come from a TOML file (``--config``, default ``configs/<img_class>.toml`` when it
exists) overridden by command-line flags; the resolved configuration is saved as
``<out_root>/<exp>/config.toml`` before anything runs. ``--mode simulation`` runs every site
in Flower's Simulation Engine on this machine.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Dict, List, Optional

from configs import RunConfig, config_dir, load_config, save_config

log = logging.getLogger("fedicra")

#: Flags that map one-to-one onto RunConfig fields (the seed README's names kept).
_FLAGS = {
    "port": int, "procedure": str, "exp": str, "base_lr": float, "img_class": str,
    "model": str, "strategy": str, "alpha": float, "rep_iters": int, "root_path": str,
    "rounds": int, "iters": int, "batch_size": int, "img_size": int, "num_clients": int,
    "seed": int, "mode": str, "out_root": str, "base_channels": int, "eval_every": int,
}


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", type=Path, help="TOML run configuration (flags override it)")
    for name, kind in _FLAGS.items():
        p.add_argument(f"--{name}", type=kind, default=None)
    p.add_argument("--gpus", type=int, nargs="*", default=None,
                   help="GPU ids the clients are spread over (none: CPU)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any other configuration key, e.g. --set lambda_crf=0.2")
    return p.parse_args(argv)


def _parse_value(text: str):
    from configs.schema import tomllib

    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def resolve_config(args: argparse.Namespace) -> RunConfig:
    """Config file (explicit, else ``configs/<img_class>.toml``, else defaults) + flags."""
    if args.config is not None:
        cfg = load_config(args.config)
    else:
        default = config_dir() / f"{args.img_class or RunConfig().img_class}.toml"
        cfg = load_config(default) if default.is_file() else RunConfig()
    overrides: Dict[str, object] = {k: getattr(args, k) for k in _FLAGS}
    if args.gpus is not None:
        overrides["gpus"] = args.gpus
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        overrides[key.strip()] = _parse_value(value.strip())
    return cfg.override(overrides, "command line").validate()


def setup_logging() -> None:
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False


def run_simulation_mode(cfg: RunConfig) -> None:
    """All sites in Flower's Simulation Engine; clients spread over ``cfg.gpus`` (CPU if none)."""
    import torch
    from flwr.simulation import run_simulation

    from clients.client_app import app as client_app
    from strategies.server_app import make_server_app

    num_gpus = 0.0
    if cfg.gpus and torch.cuda.is_available():
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(str(g) for g in cfg.gpus)
        num_gpus = min(1.0, len(cfg.gpus) / cfg.num_clients)
    elif cfg.gpus:
        log.warning("--gpus %s given but CUDA is not available: training on the CPU", cfg.gpus)
    backend_config = {
        "client_resources": {"num_cpus": cfg.cpus_per_client, "num_gpus": num_gpus},
        "init_args": {"num_cpus": os.cpu_count() or 1,
                      "num_gpus": len(cfg.gpus) if num_gpus else 0,
                      "logging_level": "error", "log_to_driver": True},
    }
    run_simulation(server_app=make_server_app(cfg), client_app=client_app,
                   num_supernodes=cfg.num_clients, backend_config=backend_config)


def main(argv: Optional[List[str]] = None) -> int:
    setup_logging()
    try:
        cfg = resolve_config(parse_args(argv))
    except (ValueError, FileNotFoundError) as err:
        log.error("error: %s", err)
        return 2
    out_dir = cfg.out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out_dir / "config.toml")
    log.info("run %s: %s on %s, %d clients, %d rounds x %d iterations -> %s",
             cfg.exp, cfg.strategy, cfg.img_class, cfg.num_clients, cfg.rounds, cfg.iters, out_dir)
    if cfg.mode == "simulation":
        run_simulation_mode(cfg)
    else:
        from deployment import run_deployment  # noqa: WPS433 (heavy, mode-specific)

        return run_deployment(cfg)
    log.info("done. Test every client: python test_client.py --client all --exp %s --out_root %s",
             cfg.exp, cfg.out_root)
    log.info("TensorBoard: tensorboard --logdir %s", out_dir / "tb")
    return 0


if __name__ == "__main__":
    sys.exit(main())
