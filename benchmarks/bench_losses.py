"""Forward + backward time of the weakly supervised loss terms, with a U-Net for scale.

Rows, per device and image size:

* multiscale tree energy loss (image tree + 3 auxiliary trees), tensor path
  (``backend="torch"``: Boruvka MST, Euler-tour rooting, pointer doubling);
* the same loss on the sequential baseline (``backend="scipy"``: scipy MST + BFS order per
  image, then a level-by-level walk), the structure of the reference code;
* the tree construction alone (4 trees of the batch), both ways;
* gated CRF loss (radius 5) and ``unet_lc_multihead`` forward + backward, when those
  modules exist.

Examples
--------
Full CPU run (slow: the baseline walks ~1,500 tree levels per pass)::

    .venv/bin/python -m benchmarks.bench_losses --device cpu --repeats 1

Smoke run::

    .venv/bin/python -m benchmarks.bench_losses --quick
"""

from __future__ import annotations

import argparse
import math
import platform
import shlex
import sys
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from losses.mst import scipy_rooted_tree
from losses.tree_energy import multiscale_tree_energy_loss
from losses.tree_filter import build_tree, doubling_tables, tree_edge_weights


ROW_GROUPS = ("loss", "trees", "crf", "unet")


@dataclass(frozen=True)
class Size:
    """One benchmark configuration: square images of ``size`` pixels."""

    size: int
    channels: int
    classes: int

    @classmethod
    def parse(cls, text: str) -> "Size":
        """``"256:1:2"`` -> 256x256, 1 image channel, 2 classes."""
        size, channels, classes = (int(t) for t in text.split(":"))
        return cls(size, channels, classes)

    def __str__(self) -> str:
        return f"{self.size}x{self.size}, C={self.channels}, K={self.classes}"


def smooth_field(batch: int, channels: int, size: int, cells: int, generator: torch.Generator) -> torch.Tensor:
    """``(batch, channels, size, size)`` random field, bilinear from a ``cells x cells`` grid."""
    coarse = torch.randn(batch, channels, cells, cells, generator=generator)
    return F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)


def make_inputs(batch: int, cfg: Size, device: torch.device, seed: int = 0) -> dict:
    """Image-like guide, smooth logits, three auxiliary heads (1/4, 1/2, 1) and weak labels."""
    g = torch.Generator().manual_seed(seed)
    image = smooth_field(batch, cfg.channels, cfg.size, 8, g).sigmoid()
    image = (image + 0.03 * torch.randn(image.shape, generator=g)).clamp(0, 1)
    logits = 3 * smooth_field(batch, cfg.classes, cfg.size, 12, g)
    aux = [3 * smooth_field(batch, cfg.classes, cfg.size // s, 12, g) for s in (4, 2, 1)]
    label = torch.randint(0, cfg.classes, (batch, cfg.size, cfg.size), generator=g)
    label[torch.rand(label.shape, generator=g) < 0.9] = cfg.classes  # 90 % unlabelled
    return {
        "image": image.to(device),
        "logits": logits.to(device).requires_grad_(),
        "aux": [a.to(device).requires_grad_() for a in aux],
        "label": label.to(device),
    }


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], None], device: torch.device, repeats: int, warmup: int) -> tuple[float, float]:
    """Minimum wall-clock and process CPU seconds of ``repeats`` calls after ``warmup``.

    The minimum is the least disturbed by other processes sharing the machine; the CPU time
    (all threads of this process) is robust to waiting for a core.
    """
    for _ in range(warmup):
        fn()
    synchronize(device)
    walls, cpus = [], []
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        synchronize(device)
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return min(walls), min(cpus)


def tree_loss_step(inputs: dict, cfg: Size, backend: str) -> Callable[[], None]:
    def step() -> None:
        probs = torch.softmax(inputs["logits"], 1)
        loss = multiscale_tree_energy_loss(probs, inputs["image"], inputs["aux"], inputs["label"], cfg.classes, backend=backend)
        loss.backward()

    return step


def tree_build_step(inputs: dict, backend: str) -> Callable[[], None]:
    size = inputs["image"].shape[-1]
    guides = [inputs["image"]] + [
        F.interpolate(a.detach(), size=(size, size), mode="bilinear", align_corners=False) for a in inputs["aux"]
    ]

    def step() -> None:
        for guide in guides:
            build_tree(guide, backend=backend)

    return step


def gated_crf_step(inputs: dict) -> Callable[[], None] | str:
    try:
        from losses.gated_crf import gated_crf_loss
    except ImportError as err:  # written by another work package
        return f"skipped: {err}"

    def step() -> None:
        probs = torch.softmax(inputs["logits"], 1)
        gated_crf_loss(probs, inputs["image"], sigma_xy=6.0, sigma_rgb=0.1, radius=5).backward()

    return step


def unet_step(inputs: dict, cfg: Size, device: torch.device) -> Callable[[], None] | str:
    try:
        from networks import build

        model = build("unet_lc_multihead", cfg.channels, cfg.classes, num_sites=5, site=0).to(device).train()
    except Exception as err:  # noqa: BLE001 - optional row, report why it is missing
        return f"skipped: {type(err).__name__}: {err}"
    image = inputs["image"]

    def step() -> None:
        model.zero_grad(set_to_none=True)
        out = model(image)
        total = out.logits.float().mean() + sum(a.float().mean() for a in out.aux_logits)
        total.backward()

    return step


def tree_stats(size: int, device: torch.device, seed: int = 0) -> dict:
    """Depth and round counts of the MST of one uniformly random ``size x size`` guide."""
    g = torch.Generator().manual_seed(seed)
    guide = torch.rand(1, 1, size, size, generator=g).to(device)
    tree, _ = build_tree(guide)
    _, depth = scipy_rooted_tree(guide)
    stats = {"boruvka_rounds": tree.num_rounds, "depth": int(depth.max())}
    for sigma in (0.02, 1e6):
        scaled, _ = tree_edge_weights(guide, tree, sigma)
        stats[f"doubling_rounds_sigma_{sigma:g}"] = len(doubling_tables(tree.parent, scaled))
    stats["doubling_rounds_bound"] = math.ceil(math.log2(stats["depth"] + 1))
    return stats


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo where there is one)."""
    model = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return model


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_model()}, {torch.get_num_threads()} thread(s)"


def run(args: argparse.Namespace) -> None:
    devices = [torch.device(d) for d in args.device]
    print(f"command: {' '.join(shlex.quote(a) for a in [sys.executable, '-m', 'benchmarks.bench_losses', *sys.argv[1:]])}")
    print(f"torch {torch.__version__}")
    if args.tree_stats:
        for device in devices:
            print(f"tree statistics, random {args.tree_stats}x{args.tree_stats} guide on {device}: {tree_stats(args.tree_stats, device)}")
    for device in devices:
        print(f"\n### {device.type}: {device_name(device)}, batch {args.batch}, {args.repeats} timed repeat(s) after {args.warmup} warm-up\n")
        print("| size | row | wall s | CPU s | speed-up vs sequential baseline (wall / CPU) |")
        print("|---|---|---|---|---|")
        for cfg in args.sizes:
            inputs = make_inputs(args.batch, cfg, device)
            # (name, step, key of the baseline row it is compared with)
            rows: list[tuple[str, Callable[[], None] | str, str]] = []
            if "loss" in args.rows:
                rows += [
                    ("tree energy loss, tensor path (fwd+bwd)", tree_loss_step(inputs, cfg, "torch"), "loss"),
                    ("tree energy loss, sequential baseline (fwd+bwd)", tree_loss_step(inputs, cfg, "scipy"), "loss"),
                ]
            if "trees" in args.rows:
                rows += [
                    ("4 trees: Boruvka + Euler tour (tensor)", tree_build_step(inputs, "torch"), "tree"),
                    ("4 trees: scipy MST + BFS (baseline)", tree_build_step(inputs, "scipy"), "tree"),
                ]
            if "crf" in args.rows:
                rows.append(("gated CRF loss, radius 5 (fwd+bwd)", gated_crf_step(inputs), ""))
            if "unet" in args.rows:
                rows.append(("unet_lc_multihead (fwd+bwd)", unet_step(inputs, cfg, device), ""))
            results: dict[str, tuple[float, float] | str] = {}
            for name, step, _ in rows:
                if isinstance(step, str):
                    results[name] = step
                    continue
                results[name] = time_call(step, device, args.repeats, args.warmup)
                wall, cpu = results[name]
                print(f"  [{cfg}] {name}: wall {wall:.3f} s, CPU {cpu:.3f} s", file=sys.stderr, flush=True)
            baselines = {key: results[name] for name, _, key in rows if "baseline" in name}
            baselines.update({key: "" for _, _, key in rows if key and key not in baselines})
            for name, _, key in rows:
                value = results[name]
                if isinstance(value, str):
                    print(f"| {cfg} | {name} | {value} | | |")
                    continue
                wall, cpu = value
                ratio = ""
                if key and "baseline" not in name and not isinstance(baselines[key], str):
                    ratio = f"{baselines[key][0] / wall:.2f}x / {baselines[key][1] / cpu:.2f}x"
                print(f"| {cfg} | {name} | {wall:.3f} | {cpu:.3f} | {ratio} |")
            tensor_loss = results.get("tree energy loss, tensor path (fwd+bwd)")
            unet = results.get("unet_lc_multihead (fwd+bwd)")
            if isinstance(tensor_loss, tuple) and isinstance(unet, tuple):
                print(f"| {cfg} | tensor-path tree loss / U-Net fwd+bwd | {tensor_loss[0] / unet[0]:.2f} | {tensor_loss[1] / unet[1]:.2f} | |")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", nargs="+", default=None, help="devices (default: cpu, and cuda if present)")
    parser.add_argument("--batch", type=int, default=12)
    parser.add_argument("--sizes", nargs="+", type=Size.parse, default=None, help="SIZE:CHANNELS:CLASSES, e.g. 256:1:2 384:3:3")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per row (default 1 on CPU, 5 on CUDA)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--tree-stats", type=int, default=256, help="report MST depth and rounds for a random guide of this size (0: skip)")
    parser.add_argument("--rows", nargs="+", default=list(ROW_GROUPS), choices=ROW_GROUPS, help="row groups to time")
    parser.add_argument("--quick", action="store_true", help="smoke run: batch 2, small sizes")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device is None:
        args.device = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    if args.quick:
        args.batch = 2
        args.sizes = args.sizes or [Size(64, 1, 2), Size(48, 3, 3)]
        args.tree_stats = min(args.tree_stats, 64)
    args.sizes = args.sizes or [Size(256, 1, 2), Size(384, 3, 3)]
    if args.repeats is None:
        args.repeats = 5 if any(d.startswith("cuda") for d in args.device) else 1
    return args


if __name__ == "__main__":
    run(parse_args())
