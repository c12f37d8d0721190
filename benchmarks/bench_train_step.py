"""Speed of one site's FedICRA training step, where its time goes, and a 5-client round.

Sections (one run, one device):

1. **step**: iterations per second of ``SiteTrainer.run_iterations`` (the training loop as
   it runs in a federation: data stream with its prefetching threads, augmentation, forward
   under optional bf16 autocast, every loss term, backward, AdamW step, TensorBoard scalars),
   with every parameter trainable, on ``--task faz`` (1 x 256 x 256, 2 classes) or
   ``--task odoc`` (3 x 384 x 384, 3 classes); ``unet_lc_multihead`` with the full objective
   (pCE + multiscale tree energy + gated CRF radius 5 + site-contrastive term);
2. **breakdown**: the same step with the device synchronised between phases: data (time the
   training thread waits for a batch), network forward, each loss term's forward, the rest of
   the objective (softmax, weighted sum, the objective's one transfer of its terms),
   backward, optimiser. The synchronisations make the sum slightly larger than the step;
3. the **sequential reference design**: sections 1 and 2 again with the tree energy loss on
   ``backend="scipy"`` (scipy MST + breadth-first order per image, a level-by-level walk per
   pass, as the reference CUDA code), and the ratio of the two step rates;
4. **amp** (with ``--amp``): the loss terms of one batch under bf16 autocast against float32,
   same weights, same batch, same dropout draw;
5. **round**: 5 clients (``SiteTrainer`` 0..4, each with its own site, model and optimiser)
   sharing the device in one process, each doing its FedICRA local training in turn
   (``rule.local_train``: ``iters - rep_iters`` steps on the head, then ``rep_iters`` on the
   rest); the wall time of the round.

Data come from the synthetic generator (``dataloaders.synthetic``), written to a temporary
folder (or ``--data DIR``, kept and reused), so no data set is needed. No Flower import.

Examples
--------
The CPU check (prints its tables in under 3 minutes on 2 cores)::

    .venv/bin/python -m benchmarks.bench_train_step --task faz --device cpu --batch 2

The GPU targets::

    python -m benchmarks.bench_train_step --task faz --device cuda --batch 12
    python -m benchmarks.bench_train_step --task faz --device cuda --batch 12 --amp
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import json
import os
import platform
import shlex
import shutil
import sys
import tempfile
import time
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch

import losses.objective as objective_module
from benchmarks.bench_losses import cpu_model
import losses.tree_energy as tree_energy_module
from clients.trainer import SiteTrainer
from configs import RunConfig
from dataloaders.dataset import InfiniteBatches
from dataloaders.synthetic import METADATA_NAME, generate_federation

#: task flag -> (synthetic task, image side)
TASKS = {"faz": ("synthetic_faz", 256), "odoc": ("synthetic_odoc", 384)}
#: FedICRA's own defaults (methods/fedicra.py; its params carry the rest).
FEDICRA = dict(strategy="FedICRA", model="unet_lc_multihead", procedure="pce_gatedcrf_mstree",
               alpha=1.0, ala_layer_idx=0)
#: Loss terms timed in the breakdown: (row name, module, function name).
TERM_FUNCTIONS = (("loss: pCE", objective_module, "partial_cross_entropy"),
                  ("loss: tree energy", tree_energy_module, "multiscale_tree_energy_loss"),
                  ("loss: gated CRF", objective_module, "gated_crf_loss"),
                  ("loss: site-contrastive", objective_module, "site_contrastive_loss"))
#: ``--amp`` agreement: |amp - fp32| <= AMP_RTOL * |fp32| + AMP_ATOL for every loss term.
AMP_RTOL, AMP_ATOL = 1e-2, 1e-4


# ----------------------------------------------------------------------------- set-up
def make_federation(task: str, root: Path, cases: int, size: int) -> Path:
    """A five-site synthetic federation at the task's size in ``root`` (reused when it is one).

    Parameters
    ----------
    task : {'faz', 'odoc'}
    root : Path
        Folder of the federation.
    cases : int
        Training cases per site (one of them is held out for validation).
    size : int
        Image side in pixels.
    """
    meta = root / METADATA_NAME
    wanted = {"task": TASKS[task][0], "size": size, "train_per_site": cases}
    if meta.is_file():
        found = json.loads(meta.read_text())
        if all(found.get(k) == v for k, v in wanted.items()):
            return root
    generate_federation(task, root, size=size, train_per_site=cases, test_per_site=1, seed=0)
    return root


def run_config(args: argparse.Namespace, data: Path, out: Path, **overrides) -> RunConfig:
    """The run configuration of the benchmark: FedICRA defaults at the task's full size."""
    name, _ = TASKS[args.task]
    values = dict(FEDICRA, img_class=name, root_path=str(data), out_root=str(out), exp="bench",
                  num_clients=5, batch_size=args.batch, iters=args.round_iters,
                  rep_iters=min(3, args.round_iters), rounds=1000, amp=args.amp,
                  prefetch=args.prefetch, seed=2022)
    values.update(overrides)
    return RunConfig.build(**values).validate()


class NullWriter:
    """Stands in for TensorBoard's writer when the ``tensorboard`` package is missing."""

    def add_scalar(self, *args, **kwargs) -> None:
        return None

    def flush(self) -> None:
        return None

    def close(self) -> None:
        return None


def new_trainer(cfg: RunConfig, cid: int, args: argparse.Namespace) -> SiteTrainer:
    """Client ``cid``'s trainer on ``args.device`` with the benchmark's model options."""
    trainer = SiteTrainer(cfg, cid, device=args.device)
    try:
        trainer.writer  # noqa: B018 - created lazily; needs the tensorboard package
    except ImportError:
        trainer._writer = NullWriter()
    if args.channels_last:
        trainer.model.to(memory_format=torch.channels_last)
    if args.compile:
        trainer.model.compile()
    return trainer


def everything(name: str) -> bool:
    return True


# ----------------------------------------------------------------------------- timing
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PhaseClock:
    """Wall time per named phase, the device synchronised at each phase boundary."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.totals: Dict[str, float] = defaultdict(float)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        synchronize(self.device)
        start = time.perf_counter()
        try:
            yield
        finally:
            synchronize(self.device)
            self.totals[name] += time.perf_counter() - start

    def timed(self, name: str, fn: Callable) -> Callable:
        """``fn`` whose calls are counted as phase ``name``."""
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            with self.phase(name):
                return fn(*args, **kwargs)

        return wrapper


@contextlib.contextmanager
def patched(module, name: str, replacement: Callable) -> Iterator[None]:
    """Temporarily replace ``module.name`` (the objective looks its terms up at call time)."""
    original = getattr(module, name)
    setattr(module, name, replacement)
    try:
        yield
    finally:
        setattr(module, name, original)


@contextlib.contextmanager
def sequential_reference() -> Iterator[None]:
    """The tree energy loss on the sequential reference path (``backend="scipy"``)."""
    original = tree_energy_module.multiscale_tree_energy_loss
    with patched(tree_energy_module, "multiscale_tree_energy_loss",
                 functools.partial(original, backend="scipy")):
        yield


@contextlib.contextmanager
def instrumented(trainer: SiteTrainer, clock: PhaseClock) -> Iterator[None]:
    """Time the network's forward (hooks) and every loss term (wrapped functions)."""
    state = {}

    def before(module, inputs):
        synchronize(clock.device)
        state["start"] = time.perf_counter()

    def after(module, inputs, output):
        synchronize(clock.device)
        clock.totals["forward (network)"] += time.perf_counter() - state["start"]

    handles = [trainer.model.register_forward_pre_hook(before),
               trainer.model.register_forward_hook(after)]
    with contextlib.ExitStack() as stack:
        for row, module, name in TERM_FUNCTIONS:
            stack.enter_context(patched(module, name, clock.timed(row, getattr(module, name))))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()


def seconds_per_step(trainer: SiteTrainer, steps: int, warmup: int) -> Tuple[float, float]:
    """Wall and process CPU seconds per iteration of ``trainer.run_iterations``.

    The CPU time (every thread of this process, user + system) does not count the time spent
    waiting for a core that other jobs hold; on a GPU it is the host's share of the work.
    """
    if warmup:
        trainer.run_iterations(warmup, everything)
    synchronize(trainer.device)
    start, cpu = time.perf_counter(), time.process_time()
    trainer.run_iterations(steps, everything)
    synchronize(trainer.device)
    return (time.perf_counter() - start) / steps, (time.process_time() - cpu) / steps


def batch_build_seconds(trainer: SiteTrainer, batches: int = 8) -> float:
    """Seconds to read, augment and collate one batch on one thread (a copy of the stream).

    One prefetching thread sustains about ``1 / seconds`` batches per second; ``prefetch``
    threads up to ``prefetch`` times that when the augmentation releases the GIL.
    """
    stream = InfiniteBatches(trainer.train_set, trainer.cfg.batch_size, seed=1)
    start = time.perf_counter()
    for _ in range(batches):
        stream.make_batch(stream.draw())
    return (time.perf_counter() - start) / batches


def breakdown(trainer: SiteTrainer, steps: int) -> Dict[str, float]:
    """Seconds per step of each phase of ``steps`` instrumented steps (see module docstring).

    The steps repeat the body of ``SiteTrainer.run_iterations``; ``forward + objective`` is
    split into the network's forward, the loss terms and the rest of the objective.
    """
    clock = PhaseClock(trainer.device)
    trainer.model.train()
    with instrumented(trainer, clock):
        for _ in range(steps):
            with clock.phase("data (wait for the batch, copy to device)"):
                batch = trainer.next_batch()
            with clock.phase("forward + objective"):
                loss, _ = trainer.forward_loss(batch)
            with clock.phase("backward"):
                trainer.optimizer.zero_grad(set_to_none=True)
                loss.backward()
            with clock.phase("optimiser step"):
                trainer.optimizer.step()
            trainer.step += 1
    totals = {k: v / steps for k, v in clock.totals.items()}
    inner = totals.pop("forward + objective")
    terms = sum(totals.get(row, 0.0) for row, _, _ in TERM_FUNCTIONS)
    totals["objective, rest (softmax, sum, transfer of the terms)"] = \
        inner - totals.get("forward (network)", 0.0) - terms
    return totals


BREAKDOWN_ORDER = ("data (wait for the batch, copy to device)", "forward (network)",
                   *(row for row, _, _ in TERM_FUNCTIONS),
                   "objective, rest (softmax, sum, transfer of the terms)", "backward",
                   "optimiser step")


def amp_agreement(trainer: SiteTrainer, batches: int = 2) -> List[Dict[str, object]]:
    """Loss terms of ``batches`` batches in float32 and under bf16 autocast, same weights.

    Returns
    -------
    list of dict
        Per batch and term: ``fp32``, ``amp``, ``abs_diff``, ``rel_diff`` and ``ok``
        (``abs_diff <= AMP_RTOL * |fp32| + AMP_ATOL``).
    """
    rows = []
    amp = trainer.cfg.amp
    trainer.model.train()
    try:
        for index in range(batches):
            batch = trainer.next_batch()
            values = {}
            for flag in (False, True):
                trainer.cfg.amp = flag
                torch.manual_seed(index)  # same dropout draw
                with torch.no_grad():
                    _, terms = trainer.forward_loss(batch)
                values[flag] = {k: float(v) for k, v in terms.items()}
            for key, ref in values[False].items():
                diff = abs(values[True][key] - ref)
                rows.append({"batch": index, "term": key, "fp32": ref, "amp": values[True][key],
                             "abs_diff": diff, "rel_diff": diff / max(abs(ref), 1e-12),
                             "ok": diff <= AMP_RTOL * abs(ref) + AMP_ATOL})
    finally:
        trainer.cfg.amp = amp
    return rows


def host_syncs_per_step(trainer: SiteTrainer) -> Optional[int]:
    """Synchronising calls in one ``run_iterations(1)`` on CUDA (``None`` elsewhere)."""
    if trainer.device.type != "cuda":
        return None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            trainer.run_iterations(1, everything)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def federated_round(args: argparse.Namespace, data: Path, out: Path) -> Dict[str, object]:
    """One round of ``args.clients`` clients sharing the device, in turn, in this process."""
    cfg = run_config(args, data, out / "round")
    trainers = [new_trainer(cfg, cid, args) for cid in range(args.clients)]
    try:
        for trainer in trainers:  # warm-up: first batches, allocator, autotuning
            for _ in range(args.round_warmup):
                trainer.run_iterations(1, everything)
        synchronize(trainers[0].device)
        per_client = []
        start, cpu = time.perf_counter(), time.process_time()
        for trainer in trainers:
            begin = time.perf_counter()
            trainer.rule.local_train(trainer, server_round=2)
            synchronize(trainer.device)
            per_client.append(time.perf_counter() - begin)
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    finally:
        for trainer in trainers:
            trainer.close()
    return {"wall": wall, "cpu": cpu, "per_client": per_client, "iters": cfg.iters, "rep_iters": cfg.params.rep_iters}


# ----------------------------------------------------------------------------- report
def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = cpu_model()
    load = ", load average %.1f / %.1f / %.1f" % os.getloadavg() if hasattr(os, "getloadavg") else ""
    return f"{model}, {os.cpu_count()} cores, {torch.get_num_threads()} torch thread(s){load}"


def print_header(args: argparse.Namespace) -> None:
    command = " ".join(shlex.quote(a) for a in ["python", "-m", "benchmarks.bench_train_step",
                                                 *sys.argv[1:]])
    name, size = TASKS[args.task][0], args.size
    print(f"command: {command}")
    print(f"date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}")
    print(f"device: {args.device}: {device_name(torch.device(args.device))}")
    print(f"torch {torch.__version__}, python {platform.python_version()}")
    print(f"task {args.task} ({name}, {size}x{size}), batch {args.batch}, amp {args.amp}, "
          f"prefetch {args.prefetch}, channels_last {args.channels_last}, compile {args.compile}; "
          f"{args.steps} timed step(s) after {args.warmup} warm-up\n")


def print_steps(rates: Dict[str, Tuple[float, float]], syncs: Optional[int], build: float,
                prefetch: int) -> None:
    print("| design | wall s / step | it / s | CPU s / step | vs sequential reference (wall / CPU) |")
    print("|---|---|---|---|---|")
    reference = rates.get("sequential reference (scipy MST + level-by-level tree passes)")
    for name, (wall, cpu) in rates.items():
        ratio = ""
        if reference and "reference" not in name:
            ratio = f"{reference[0] / wall:.2f}x / {reference[1] / cpu:.2f}x"
        print(f"| {name} | {wall:.3f} | {1 / wall:.2f} | {cpu:.3f} | {ratio} |")
    print(f"\nbuilding one batch (read, augment, collate) on one thread: {build:.4f} s; "
          f"prefetch {prefetch} keeps up with up to ~{max(prefetch, 1) / build:.1f} it/s")
    if syncs is not None:
        print(f"host-device synchronisations in one run_iterations(1) call: {syncs}")
    print()


def print_breakdown(splits: Dict[str, Dict[str, float]], measured: Dict[str, float]) -> None:
    names = list(splits)
    print("| phase | " + " | ".join(f"{n}: s / step | %" for n in names) + " |")
    print("|---|" + "---|---|" * len(names))
    for phase in BREAKDOWN_ORDER:
        cells = []
        for n in names:
            total = sum(splits[n].values())
            value = splits[n].get(phase, 0.0)
            cells.append(f"{value:.4f} | {100 * value / total:.1f}")
        print(f"| {phase} | " + " | ".join(cells) + " |")
    print("| sum of phases (synchronised) | " + " | ".join(
        f"{sum(splits[n].values()):.4f} | 100" for n in names) + " |")
    print("| step without synchronisation (section 1) | " + " | ".join(
        f"{measured[n][0]:.4f} | " for n in names) + " |")
    print()


def print_amp(rows: List[Dict[str, object]]) -> None:
    print(f"bf16 autocast against float32 (same weights, batch and dropout draw); tolerance "
          f"|amp - fp32| <= {AMP_RTOL:g} |fp32| + {AMP_ATOL:g}\n")
    print("| batch | term | fp32 | amp | abs diff | rel diff | within tolerance |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['batch']} | {r['term']} | {r['fp32']:.6g} | {r['amp']:.6g} | "
              f"{r['abs_diff']:.2e} | {r['rel_diff']:.2e} | {'yes' if r['ok'] else 'NO'} |")
    print()


def print_round(result: Dict[str, object], args: argparse.Namespace) -> None:
    per = result["per_client"]
    iters, rep = result["iters"], result["rep_iters"]
    print(f"{args.clients} clients sharing {args.device}, in turn in one process, FedICRA local "
          f"training of {iters} iteration(s) each ({iters - rep} head-only + {rep} full), batch "
          f"{args.batch}, after {args.round_warmup} warm-up iteration(s) each:\n")
    print("| round wall s | round CPU s | per client wall s (min / max) | iterations / s over the round |")
    print("|---|---|---|---|")
    print(f"| {result['wall']:.2f} | {result['cpu']:.2f} | {min(per):.2f} / {max(per):.2f} | "
          f"{args.clients * iters / result['wall']:.2f} |")
    print()


# ----------------------------------------------------------------------------- main
def run(args: argparse.Namespace) -> None:
    print_header(args)
    keep = args.data is not None
    work = Path(tempfile.mkdtemp(prefix="bench_train_step_"))
    data = Path(args.data) if keep else work / "data"
    try:
        make_federation(args.task, data, args.cases, args.size)
        trainer = new_trainer(run_config(args, data, work / "out"), 0, args)
        rates, splits = {}, {}
        designs = [("tensor path (Boruvka MST + pointer-doubling passes)", contextlib.nullcontext)]
        if not args.no_reference:
            designs.append(("sequential reference (scipy MST + level-by-level tree passes)",
                            sequential_reference))
        for name, context in designs:
            with context():
                rates[name] = seconds_per_step(trainer, args.steps, args.warmup)
                splits[name] = breakdown(trainer, args.breakdown_steps)
            print(f"  [{name}] wall {rates[name][0]:.3f} s, CPU {rates[name][1]:.3f} s / step",
                  file=sys.stderr, flush=True)
        syncs = host_syncs_per_step(trainer)
        print("## Step\n")
        print_steps(rates, syncs, batch_build_seconds(trainer), args.prefetch)
        print("## Time split (per step)\n")
        print_breakdown(splits, rates)
        if args.amp:
            print("## Mixed precision\n")
            print_amp(amp_agreement(trainer))
        trainer.close()
        if args.clients > 0:
            print("## Federated round\n")
            print_round(federated_round(args, data, work), args)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", choices=sorted(TASKS), default="faz")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu, cuda or cuda:N (default: cuda when visible)")
    p.add_argument("--amp", action="store_true", help="bf16 autocast (RunConfig key amp)")
    p.add_argument("--batch", type=int, default=12)
    p.add_argument("--steps", type=int, default=None, help="timed steps (default: 20 on CUDA, 2 on CPU)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps (default: 5 on CUDA, 1 on CPU)")
    p.add_argument("--breakdown-steps", type=int, default=None,
                   help="instrumented steps of the time split (default: 5 on CUDA, 1 on CPU)")
    p.add_argument("--no-reference", action="store_true", help="skip the sequential reference design")
    p.add_argument("--clients", type=int, default=5, help="clients of the round (0: no round)")
    p.add_argument("--round-iters", type=int, default=None,
                   help="local iterations per client in the round (default: 10 on CUDA, 1 on CPU)")
    p.add_argument("--round-warmup", type=int, default=None,
                   help="warm-up iterations per client before the round (default: 1 on CUDA, 0 on CPU)")
    p.add_argument("--prefetch", type=int, default=RunConfig().prefetch,
                   help="batches built ahead on background threads (RunConfig key prefetch)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--channels-last", action="store_true", help="model in channels-last memory format")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (Module.compile)")
    p.add_argument("--cases", type=int, default=4, help="synthetic training cases per site")
    p.add_argument("--data", default=None, help="keep (and reuse) the synthetic federation here")
    p.add_argument("--size", type=int, default=0,
                   help="image side (default: the task's, 256 for faz, 384 for odoc; smaller for smoke runs)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error(f"--device {args.device}: CUDA is not available on this machine")
    if device.type not in ("cpu", "cuda"):
        p.error(f"--device must be cpu or cuda[:N], got {args.device!r}")
    gpu = device.type == "cuda"
    defaults = {"steps": (20, 2), "warmup": (5, 1), "breakdown_steps": (5, 1),
                "round_iters": (10, 1), "round_warmup": (1, 0)}
    for key, (on_gpu, on_cpu) in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, on_gpu if gpu else on_cpu)
    for key in ("batch", "steps", "breakdown_steps", "round_iters", "cases"):
        if getattr(args, key) < 1:
            p.error(f"--{key.replace('_', '-')} must be >= 1, got {getattr(args, key)}")
    if args.cases < 2:
        p.error(f"--cases must be >= 2 (one case is held out for validation), got {args.cases}")
    for key in ("warmup", "round_warmup", "clients", "prefetch", "threads"):
        if getattr(args, key) < 0:
            p.error(f"--{key.replace('_', '-')} must be >= 0, got {getattr(args, key)}")
    if args.size == 0:
        args.size = TASKS[args.task][1]
    if args.size < 32 or args.size % 16:
        p.error(f"--size must be a multiple of 16 and at least 32, got {args.size}")
    if args.clients > 5:
        p.error(f"--clients must be at most 5 (the task has 5 sites), got {args.clients}")
    if args.threads:
        torch.set_num_threads(args.threads)
    return args


if __name__ == "__main__":
    run(parse_args())
