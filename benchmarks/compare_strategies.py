"""Train and test every compared method on one federation and schedule, with one or several seeds.

    python -m benchmarks.compare_strategies --config configs/compare_faz_cpu.toml --out results/compare_faz_cpu
    python -m benchmarks.compare_strategies --task synthetic_faz --methods all --rounds 2 --iters 2 --img_size 32 --out DIR
    python -m benchmarks.compare_strategies --config configs/compare_faz_cpu.toml --seeds 2022,2023,2024 --methods FedICRA,FedBN --out DIR

Each method runs as its name defines it (``flower_runner.py --strategy NAME``: its own
network, objective and hyper-parameters), on the same data, seed, rounds, local iterations,
batch size and image size, through real Flower processes; then ``test_client.py`` tests what
the method deploys (the global model of FedAvg-like methods, every site's personalised model
otherwise). One row is not a method of its own: ``FedAvg + full objective`` is FedAvg with
FedICRA's network and weakly supervised objective, so that the table separates what the
objective gains from what the federated method gains.

Seeds: ``--seed S`` (or none: the configuration's) runs every method once, as before;
``--seeds A,B,C`` runs every method once per seed (``--seeds S`` with one seed is ``--seed S``),
seed by seed: every method's first seed before any method's second, so that an interrupted
comparison leaves whole seeds. A seed changes the initialisation and the train/validation
split, never the test set. ``--seed S`` refuses a ``DIR`` whose ``runs/<method>/`` holds a
finished run of another seed (it would report that run as seed ``S``, see below): add seeds to
a single-seed comparison with ``--seeds OLD,S`` instead, which keeps the old run.
``--report-only`` trains nothing: it writes the reports below from the runs already finished
in ``DIR`` (for runs trained elsewhere, or while others are still training) and names those
it leaves out.

Written to ``--out DIR``:

- ``runs/<method>/`` (one seed) or ``runs/<method>_seed<S>/`` (several seeds, one folder per
  seed): each run's folder (config snapshot, checkpoints, metrics.csv, TensorBoard, test
  results) and ``compare.json`` (its command and wall time); ``runs/<folder>.log``: its output.
  With several seeds, a finished single-seed folder ``runs/<method>/`` whose config snapshot
  has seed ``S`` stands for ``runs/<method>_seed<S>/`` (it is not trained again);
- ``comparison.csv``: one row per method, site (and ``mean of sites``, ``pooled``) and target
  (``faz``; ``cup`` and ``disc`` for fundus), Dice and HD95 mean and std. One seed: the std
  is over the test cases (the ``mean of sites`` std is over sites). Several seeds: every value
  is the mean and the (sample, ddof=1) std over the seeds of the per-seed values (a site's mean
  test Dice / HD95 over its cases, the mean of sites, the pooled mean); ``seeds`` lists the
  seeds a row averages, ``train_seconds`` is the mean per seed. Columns ``wilcoxon_ref``,
  ``wilcoxon_p`` and ``wilcoxon_pairs``: the paired test below, for every site row, ``mean of
  sites`` and ``pooled`` (both: every test case of the target). Several seeds: columns
  ``seed_delta_mean``, ``seed_delta_std`` and ``seed_delta_above``: the row's Dice minus the
  reference's, paired by seed, its mean and std over the seeds and in how many the row is above
  (``comparison.md``: ``Δ vs FedICRA, by seed``, for the mean of sites). ``lost_replies``:
  how many site replies the run (several seeds: the runs) trained without, a site that missed
  a round's deadline or failed; a row whose runs lost any is marked ``⚠N`` in
  ``comparison.md`` and logged, since its values depend on the machine's load;
- ``comparison_per_seed.csv`` (several seeds only): the single-seed rows of every run, with
  its ``seed``;
- ``comparison.md``: the same as Markdown tables, methods as rows and sites as columns, with
  the p-value of the pooled test;
- ``val_dice.png``: the mean over sites of the validation Dice per round, one line per method
  (for methods that deploy a global model, the validation of that global model); with several
  seeds the line is the mean over seeds and the shaded band spans min..max over seeds.

Paired test: every row is compared with FedICRA (or, when FedICRA is not among the reported
methods, with the first one, which the table names) by a two-sided Wilcoxon signed-rank test
(``scipy.stats.wilcoxon``) on the per-case test Dice (``test/result.csv``), paired case by
case (same site, case and target). The test set is the same for every seed, so several seeds
are combined by averaging each test case's Dice over the seeds first; the pairs are then the
test cases. All-zero differences give p = 1; cases whose Dice is undefined are left out.

A method (and seed) whose test results are already in ``DIR`` is skipped, so an interrupted
comparison resumes where it stopped, provided its configuration snapshot is what this call
would train (keys that change no computed value aside, :data:`RUN_ONLY_KEYS`); a finished run
configured otherwise (another seed, ``--rounds``, ``--set``, configuration or code default),
whether this call names its method or only reports it, stops the call before any training,
naming the run and the keys. A half-finished federated run of
the same configuration continues after its last completed round (``flower_runner.py
--resume``), one whose training ended is only tested; any other half-finished run is trained
again from the start. The train time of a resumed run (``train_seconds``, ``compare.json``) adds
the completed rounds of its earlier sittings (the run's ``timing.csv``) to this call's training.
"""
from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

from .compared_methods import (Method, all_methods, is_done, job_name, result_dir, run_dir,
                               select_methods)
from .comparison_report import best_baseline, write_reports

REPO = Path(__file__).resolve().parents[1]
log = logging.getLogger("fedicra.compare")


# ---------------------------------------------------------------------- running
def parse_seeds(spec: str) -> List[int]:
    """``--seeds``: a comma-separated list of distinct integers."""
    try:
        seeds = [int(s) for s in spec.split(",") if s.strip()]
    except ValueError:
        raise SystemExit(f"--seeds: expected integers separated by commas, got {spec!r}") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise SystemExit(f"--seeds: expected distinct integers separated by commas, got {spec!r}")
    return seeds


def train_command(args: argparse.Namespace, method: Method, port: int,
                  seed: Optional[int] = None) -> List[str]:
    """The runner's command for ``method``; ``seed`` (one of several) replaces ``--seed``."""
    folder = run_dir(Path(args.out), method, seed)
    cmd = [sys.executable, "flower_runner.py", "--strategy", method.strategy,
           "--out_root", str(Path(args.out).resolve() / "runs"), "--exp", folder.name,
           "--overwrite", "--port", str(port)]
    if args.config:
        cmd += ["--config", str(args.config)]
    if args.task:
        cmd += ["--img_class", args.task]
    for flag in ("rounds", "iters", "img_size", "num_clients", "root_path", "seed",
                 "batch_size", "mode"):
        value = seed if flag == "seed" and seed is not None else getattr(args, flag)
        if value is not None:
            cmd += [f"--{flag}", str(value)]
    for key, value in method.settings.items():
        cmd += [f"--{key}", str(value)] if key in ("model", "procedure") else \
            ["--set", f"{key}={value}"]
    for item in args.set:
        cmd += ["--set", item]
    if args.gpus is not None:
        cmd += ["--gpus", *map(str, args.gpus)]
    return cmd


def test_command(args: argparse.Namespace, method: Method, seed: Optional[int] = None) -> List[str]:
    folder = run_dir(Path(args.out), method, seed)
    cmd = [sys.executable, "test_client.py", "--client", "all", "--exp", folder.name,
           "--out_root", str(Path(args.out).resolve() / "runs"), "--no_images"]
    if args.device:
        cmd += ["--device", args.device]
    return cmd


#: keys that change no computed value of a run (where its processes run, where its files go,
#: how long the server waits, what TensorBoard shows): a run that differs from the command
#: only in these is the same run
RUN_ONLY_KEYS = ("exp", "out_root", "root_path", "round_timeout", "tb_images_every", "prefetch")


def config_differences(train: List[str], folder: Path) -> Optional[Dict[str, Tuple[object, object]]]:
    """The keys in which the configuration snapshot of the run in ``folder`` differs from what
    ``train`` (the fresh command) would train, each with (saved, wanted), other than
    :data:`RUN_ONLY_KEYS` and the site-local ones (the data path of a run copied from another
    machine differs, the data need not); None when the snapshot or the command is unreadable."""
    from configs import load_config
    from configs.layers import absolute_paths, resolve_layers
    from configs.schema import LOCAL_ONLY_KEYS
    from flower_runner import parse_args

    try:
        saved = load_config(folder / "config.toml").to_dict()
        wanted = absolute_paths(resolve_layers(parse_args(train[2:]))[0]).to_dict()
    except (ValueError, OSError):
        return None
    ignored = set(LOCAL_ONLY_KEYS) | set(RUN_ONLY_KEYS)
    return {k: (saved.get(k), v) for k, v in sorted(wanted.items())
            if k not in ignored and saved.get(k) != v}


def describe(differences: Mapping[str, Tuple[object, object]]) -> str:
    """``'key: saved -> wanted; ...'``."""
    return "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in differences.items())


def resumable_round(train: List[str], folder: Path) -> Optional[int]:
    """The last completed round of an interrupted run in ``folder`` that ``train`` (the fresh
    command) would train the same way, so that ``--resume`` continues it; None when there is
    no such run (no completed round, another configuration, a centralised method), -1 when its
    training has finished (only the test is missing)."""
    from configs import load_config
    from strategies.resume import global_latest, resume_point

    if not (folder / "config.toml").is_file() or not global_latest(folder).is_file():
        return None
    differs = config_differences(train, folder)
    if differs is None:
        return None
    if differs:
        log.info("%s: the interrupted run was configured otherwise (%s): trained again",
                 folder, describe(differs))
        return None
    saved = load_config(folder / "config.toml")
    if not saved.method.federated:
        return None
    try:
        return int(resume_point(saved)["round"])
    except ValueError as err:
        return -1 if "has finished" in str(err) else None


def earlier_train_seconds(folder: Path, done: Optional[int]) -> Optional[float]:
    """The training time that the earlier sittings of a run resumed after round ``done`` (-1:
    its training has finished) spent on the rounds this call keeps (``timing.csv``); 0 for a
    fresh run, None when the run predates that file (its time is then this call's only)."""
    from strategies.reporting import TIMING_FILE, recorded_seconds

    if done is None:
        return 0.0
    seconds = recorded_seconds(folder, None if done < 0 else done)
    if seconds is None:
        log.warning("%s has no %s: its train time counts this call only", folder, TIMING_FILE)
    return seconds


def stale_results(args: argparse.Namespace, jobs: Sequence[Tuple[Method, Optional[int]]]
                  ) -> Dict[Path, Dict[str, Tuple[object, object]]]:
    """The finished runs among ``jobs`` whose configuration is not what this call would train
    (another seed, ``--rounds``, ``--set``, configuration file or code default), with the keys
    that differ: skipping them as done, or reporting them, would put them under this call's
    protocol."""
    out = Path(args.out)
    stale = {}
    for method, seed in jobs:
        folder = result_dir(out, method, seed)
        if folder is None or not (folder / "config.toml").is_file():
            continue
        differs = config_differences(train_command(args, method, 0, seed), folder)
        if differs:
            stale[folder] = differs
    return stale


def run_method(args: argparse.Namespace, method: Method, seed: Optional[int] = None
               ) -> Dict[str, object]:
    """Train and test ``method`` (with ``seed``, one of several); the run's output goes to
    ``runs/<folder>.log``. An interrupted federated run of the same configuration continues
    after its last completed round (``flower_runner.py --resume``); one whose training ended
    is only tested."""
    from deployment.processes import free_port_base

    folder = run_dir(Path(args.out), method, seed)
    folder.parent.mkdir(parents=True, exist_ok=True)
    log_path = folder.parent / f"{folder.name}.log"
    port = free_port_base(4 + 2 * (args.num_clients or 5))
    train = train_command(args, method, port, seed)
    done = resumable_round(train, folder)
    earlier = earlier_train_seconds(folder, done)
    steps = [("testing", test_command(args, method, seed))]
    if done is None:
        steps.insert(0, ("training", train))
    elif done > 0:
        log.info("%s: resuming after round %d", folder.name, done)
        steps.insert(0, ("training", [sys.executable, "flower_runner.py", "--resume",
                                      str(folder.resolve()), "--port", str(port)]))
    start = time.perf_counter()
    train_seconds = 0.0
    with open(log_path, "a" if done else "w") as logf:
        for step, cmd in steps:
            logf.write("$ " + " ".join(cmd) + "\n")
            logf.flush()
            began = time.perf_counter()
            code = subprocess.call(cmd, cwd=REPO, stdout=logf, stderr=subprocess.STDOUT)
            if code != 0:
                raise RuntimeError(f"{method.label}: {step} failed with exit code {code}; see "
                                   f"{log_path}")
            if step == "training":
                train_seconds = time.perf_counter() - began
    record = {"method": method.label, "strategy": method.strategy,
              "settings": dict(method.settings), "train_command": " ".join(train[1:]),
              "test_command": " ".join(steps[-1][1][1:]),
              "train_seconds": (earlier or 0.0) + train_seconds,
              "total_seconds": time.perf_counter() - start,
              "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
    if done:
        # train_seconds adds the rounds of the earlier sittings; total_seconds is this call's
        record["resumed_after_round"] = done
        record["earlier_train_seconds"] = earlier
    if seed is not None:
        record["seed"] = seed
    (folder / "compare.json").write_text(json.dumps(record, indent=2))
    return record


# ---------------------------------------------------------------------- command line
def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, help="folder of the comparison")
    p.add_argument("--best-baseline", type=Path, metavar="DIR",
                   help="print the best baseline of the finished comparison DIR and exit")
    p.add_argument("--methods", default="all",
                   help="all, or a comma-separated list (e.g. FedICRA,FedAvg,FedAvg+full)")
    p.add_argument("--config", type=Path, help="run configuration TOML shared by every method")
    p.add_argument("--task", help="task (--img_class of the runner)")
    for flag, kind in (("rounds", int), ("iters", int), ("img_size", int), ("num_clients", int),
                       ("root_path", str), ("seed", int), ("batch_size", int)):
        p.add_argument(f"--{flag}", type=kind, help=f"--{flag} of every run")
    p.add_argument("--seeds", metavar="S1,S2,...",
                   help="run every method once per seed (runs/<method>_seed<S>/) and report "
                        "mean ± std over the seeds; not with --seed")
    p.add_argument("--mode", choices=("deployment", "simulation"),
                   help="how each federation runs (default: the runner's)")
    p.add_argument("--gpus", type=int, nargs="*", default=None,
                   help="GPU ids the clients of every run are spread over (none: CPU)")
    p.add_argument("--device", default="", help="device of test_client.py (default: CUDA if any)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any other configuration key for every run")
    p.add_argument("--keep-going", action="store_true",
                   help="go on with the next method when one fails (default: stop)")
    p.add_argument("--report-only", action="store_true",
                   help="train nothing: write the reports from the finished runs in --out (a "
                        "method or seed without one is named and left out)")
    args = p.parse_args(argv)
    if args.seeds is not None:
        if args.seed is not None:
            p.error("give --seed S or --seeds S1,S2,..., not both")
        seeds = parse_seeds(args.seeds)
        # one seed is the single-seed layout (runs/<method>/), as with --seed
        args.seed, args.seeds = (seeds[0], None) if len(seeds) == 1 else (None, seeds)
    return args


def main(argv: Optional[List[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    args = parse_args(argv)
    if args.best_baseline is not None:
        print(best_baseline(args.best_baseline))
        return 0
    if args.out is None:
        raise SystemExit("--out DIR is required")
    if args.config is None and args.task is None:
        raise SystemExit("give --config FILE or --task NAME (or both)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    methods = select_methods(args.methods)
    plan: List[Optional[int]] = list(args.seeds) if args.seeds else [None]
    # the reports hold every method tested in DIR, also those of earlier calls
    reported = [m for m in all_methods()
                if m in methods or any(is_done(out, m, s) for s in plan)]
    log.info("comparing %s in %s%s", ", ".join(m.label for m in methods), out,
             f", seeds {', '.join(map(str, args.seeds))}" if args.seeds else "")
    title = str(args.config or args.task)
    jobs = [(m, s) for s in plan for m in methods]  # seed-major: whole seeds first
    stale = stale_results(args, [(m, s) for s in plan for m in reported])
    if stale:
        old_seeds = sorted({str(d["seed"][0]) for d in stale.values() if "seed" in d})
        hint = (f"; to add seed {args.seed} to the finished seeds, give --seeds "
                f"{','.join(old_seeds)},{args.seed} (one folder per seed, the finished runs "
                "kept)" if args.seed is not None and old_seeds else "")
        raise SystemExit(
            f"{out} holds finished runs configured otherwise than this call would train them: "
            + " | ".join(f"{folder} ({describe(d)})" for folder, d in stale.items())
            + f". Give another --out, or remove those folders to train them again{hint}.")
    if args.report_only:
        pending = [job_name(m, s) for m, s in jobs if not is_done(out, m, s)]
        if pending:
            log.warning("--report-only: no finished run of %s, left out of the reports",
                        ", ".join(pending))
        jobs = []
    failed = []
    for i, (method, seed) in enumerate(jobs, 1):
        name = job_name(method, seed)
        if is_done(out, method, seed):
            log.info("[%d/%d] %s: results already in %s, skipped", i, len(jobs), name,
                     result_dir(out, method, seed))
            continue
        log.info("[%d/%d] %s: training and testing ...", i, len(jobs), name)
        try:
            record = run_method(args, method, seed)
        except RuntimeError as err:
            log.error("%s", err)
            failed.append(name)
            if not args.keep_going:
                break
            continue
        log.info("[%d/%d] %s: done in %.1f min", i, len(jobs), name,
                 record["total_seconds"] / 60)
        write_reports(out, reported, title, args.seeds)
    files = write_reports(out, reported, title, args.seeds)
    total = sum(json.loads((folder / "compare.json").read_text())["total_seconds"]
                for m in reported for s in plan
                for folder in [result_dir(out, m, s)] if folder is not None)
    log.info("wrote %s (train + test wall time of the finished runs: %.1f min)",
             ", ".join(str(f) for f in files), total / 60)
    if failed:
        log.error("failed: %s", ", ".join(failed))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
