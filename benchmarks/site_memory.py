"""Peak resident memory of one site's training process, for a method on a task.

    python -m benchmarks.site_memory --strategy FedLPPA --img_class faz --site 1

Builds the run configuration exactly as ``flower_runner.py`` would from the same flags, then
trains one site in this process (no Flower, no server: every round receives the initial
model as its aggregate) for ``--rounds`` rounds of ``--iters`` steps, with its validation and
checkpoints. By default the second round blends (``ala_warmup_iters = iters``), so methods
with adaptive aggregation pay for it. Prints, after each round, its time and the process's
peak RSS (``ru_maxrss``), then the command and the device. A federation of K sites on one
machine needs about K times the peak, plus the Flower processes (docs/benchmarks.md).
"""
from __future__ import annotations

import argparse
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import List, Optional


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--strategy", default="FedLPPA")
    p.add_argument("--img_class", default="faz")
    p.add_argument("--site", type=int, default=1)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "site_memory")
    p.add_argument("runner_flags", nargs="*",
                   help="further flower_runner.py flags after --, e.g. -- --img_size 128")
    args = p.parse_args(argv)

    from clients.trainer import SiteTrainer
    from configs.layers import absolute_paths, resolve_layers
    from configs.round_keys import SERVER_ROUND, SHARE_EXCLUDE, SHARE_INCLUDE
    from flower_runner import parse_args
    from networks.factory import build_for_run

    flags = ["--strategy", args.strategy, "--img_class", args.img_class,
             "--rounds", str(args.rounds), "--iters", str(args.iters),
             "--set", f"ala_warmup_iters={args.iters}", "--out_root", str(args.out),
             "--exp", f"{args.strategy}_site{args.site}", "--overwrite", *args.runner_flags]
    cfg = absolute_paths(resolve_layers(parse_args(flags))[0])
    if not 0 <= args.site < cfg.num_clients:
        raise SystemExit(f"--site {args.site}: expected 0 to {cfg.num_clients - 1}")
    trainer = SiteTrainer(cfg, cid=args.site)
    initial = {k: v.detach().cpu().numpy().copy() for k, v in build_for_run(cfg).state_dict().items()}
    print(f"{args.strategy} on {args.img_class}, site {args.site}: network {cfg.model}, "
          f"img_size {cfg.img_size or 'the task default'}, batch {cfg.batch_size}, "
          f"{len(trainer.train_set)} training cases")
    print("| round | seconds | peak RSS (MB) |")
    print("|---|---|---|")
    for server_round in range(1, args.rounds + 1):
        start = time.perf_counter()
        trainer.train(initial, {SERVER_ROUND: server_round, SHARE_INCLUDE: "all",
                                SHARE_EXCLUDE: ""})
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"| {server_round} | {time.perf_counter() - start:.0f} | {peak_mb:.0f} |", flush=True)
    print(f"\ncommand: python -m benchmarks.site_memory {' '.join(sys.argv[1:] if argv is None else argv)}")
    print(f"device: {platform.processor() or platform.machine()}, Python {platform.python_version()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
