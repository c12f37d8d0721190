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
import csv
import json
import logging
import math
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

from methods.registry import get_method, method_names

REPO = Path(__file__).resolve().parents[1]
log = logging.getLogger("fedicra.compare")


@dataclass(frozen=True)
class Method:
    """One row of the comparison: a strategy and the settings that make it this row."""

    label: str
    strategy: str
    settings: Mapping[str, object] = field(default_factory=dict)
    #: folder name under ``runs/`` and the name ``--methods`` accepts besides the label
    short: str = ""

    @property
    def slug(self) -> str:
        return self.short or self.label


def full_objective_settings() -> Dict[str, object]:
    """FedICRA's network and objective (its registered defaults), for the FedAvg ablation row."""
    fedicra = get_method("FedICRA")
    return {"model": fedicra.model, "procedure": fedicra.procedure}


def all_methods() -> List[Method]:
    """The rows of the paper's comparison in its order, FedICRA first, then any other
    registered method (by name), then the ablation.

    Methods that are not registered (yet) are left out with a warning.
    """
    names = ["FedICRA", "FedICRA-ref", "FedLPPA", "FedAvg", "FT", "FedProx", "FedBN", "FedAP", "FedRep", "MetaFed",
             "FedALA", "FedLC", "Local", "CT-weak", "CT-full"]
    known = {n.lower(): n for n in method_names()}
    rows = []
    for name in names:
        if name.lower() in known:
            rows.append(Method(name, known[name.lower()]))
        else:
            log.warning("method %s is not registered; left out of the comparison", name)
    listed = {n.lower() for n in names}
    rows += [Method(n, n) for n in method_names() if n.lower() not in listed]  # added methods
    rows.append(Method("FedAvg + full objective", "FedAvg", full_objective_settings(),
                       short="FedAvg+full"))
    return rows


def select_methods(spec: str) -> List[Method]:
    """``all`` or a comma-separated list of labels (case-insensitive; the ablation row is
    ``FedAvg+full``)."""
    rows = all_methods()
    if spec.strip().lower() == "all":
        return rows
    by_name = {m.label.lower(): m for m in rows}
    by_name.update({m.slug.lower(): m for m in rows})
    chosen = []
    for name in (s.strip() for s in spec.split(",") if s.strip()):
        if name.lower() not in by_name:
            raise SystemExit(f"--methods: unknown method {name!r}; choose from "
                             f"{', '.join(m.slug for m in rows)} or all")
        chosen.append(by_name[name.lower()])
    return chosen


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


def run_dir(out: Path, method: Method, seed: Optional[int] = None) -> Path:
    """Where ``method`` is trained: ``runs/<method>`` (one seed: ``seed=None``) or
    ``runs/<method>_seed<S>`` (one of several seeds)."""
    name = method.slug if seed is None else f"{method.slug}_seed{seed}"
    return out / "runs" / name


def _finished(folder: Path) -> bool:
    return ((folder / "test" / "mean_std_result.csv").is_file()
            and (folder / "compare.json").is_file())


def snapshot_seed(folder: Path) -> Optional[int]:
    """The seed of a run's configuration snapshot (``config.toml``), None if unreadable."""
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib

    try:
        with open(folder / "config.toml", "rb") as f:
            seed = tomllib.load(f).get("seed")
    except (OSError, ValueError):
        return None
    return seed if isinstance(seed, int) else None


def result_dir(out: Path, method: Method, seed: Optional[int] = None) -> Optional[Path]:
    """The folder holding the finished results of ``method`` (and ``seed``), None if there is
    none yet. For one of several seeds, a finished single-seed folder ``runs/<method>`` of the
    same seed stands in for ``runs/<method>_seed<S>``."""
    folder = run_dir(out, method, seed)
    if _finished(folder):
        return folder
    if seed is not None:
        single = run_dir(out, method)
        if _finished(single) and snapshot_seed(single) == seed:
            return single
    return None


def is_done(out: Path, method: Method, seed: Optional[int] = None) -> bool:
    return result_dir(out, method, seed) is not None


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


# ---------------------------------------------------------------------- reading results
def read_csv(path: Path) -> List[Dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def lost_replies(folder: Path) -> int:
    """How many site replies the run in ``folder`` trained without: the ``metrics.csv`` rows
    with ``missing = 1`` (a site that missed a round's deadline or failed; the round was
    aggregated without it). A run that lost none is what a run alone would compute; one that
    lost some depends on the load of the machine it ran on."""
    path = folder / "metrics.csv"
    if not path.is_file():
        return 0
    return sum(1 for r in read_csv(path) if r.get("missing") not in (None, "", "0"))


def result_rows(out: Path, method: Method, seed: Optional[int] = None) -> List[Dict[str, object]]:
    """``comparison.csv`` rows of one tested method (and seed): std over the test cases."""
    folder = result_dir(out, method, seed)
    if folder is None:
        raise FileNotFoundError(f"{run_dir(out, method, seed)} holds no test results")
    record = json.loads((folder / "compare.json").read_text())
    lost = lost_replies(folder)
    if lost:
        log.warning("%s trained without %d site replies (metrics.csv, missing = 1): its values "
                    "depend on the machine's load; rerun it with a longer round_timeout", folder,
                    lost)
    run_seed = seed if seed is not None else snapshot_seed(folder)
    rows = []
    for r in read_csv(folder / "test" / "mean_std_result.csv"):
        def num(key: str) -> float:
            return float(r[key]) if r.get(key) not in (None, "") else math.nan

        rows.append({"method": method.label, "site": r["client"], "target": r["target"],
                     "model": r["model"], "dice_mean": num("dice_mean"),
                     "dice_std": num("dice_std"), "hd95_mean": num("hd95_mean"),
                     "hd95_std": num("hd95_std"), "cases": r.get("cases", ""),
                     "train_seconds": float(record["train_seconds"]), "lost_replies": lost,
                     "seeds": "" if run_seed is None else str(run_seed)})
    return rows


CaseKey = Tuple[int, str, str]  # (client, case, target)


def case_dice(folders: Sequence[Path]) -> Dict[CaseKey, float]:
    """Per-case test Dice of the runs ``folders`` (``test/result.csv``), each case's Dice
    averaged over the runs (the seeds) where it is defined; NaN where it is nowhere."""
    values: Dict[CaseKey, List[float]] = {}
    for folder in folders:
        path = folder / "test" / "result.csv"
        if not path.is_file():
            log.warning("%s is missing: its run is left out of the paired test", path)
            continue
        for r in read_csv(path):
            dice = float(r["dice"]) if r.get("dice") not in (None, "") else math.nan
            values.setdefault((int(r["client"]), r["case"], r["target"]), []).append(dice)
    out: Dict[CaseKey, float] = {}
    for key, dices in values.items():
        defined = [d for d in dices if not math.isnan(d)]
        out[key] = sum(defined) / len(defined) if defined else math.nan
    return out


def paired_wilcoxon(reference: Mapping[CaseKey, float], other: Mapping[CaseKey, float],
                    keys: Optional[Sequence[CaseKey]] = None) -> Tuple[float, int]:
    """Two-sided Wilcoxon signed-rank p-value of ``other`` against ``reference`` over the
    cases both define (``keys``: only those), and the number of pairs. p = 1 where every
    difference is zero; NaN without pairs."""
    import warnings

    from scipy.stats import wilcoxon

    keys = [k for k in (keys if keys is not None else sorted(reference)) if k in reference
            and k in other and not math.isnan(reference[k]) and not math.isnan(other[k])]
    if not keys:
        return math.nan, 0
    x = [other[k] for k in keys]
    y = [reference[k] for k in keys]
    if all(a == b for a, b in zip(x, y)):
        return 1.0, len(keys)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            p = float(wilcoxon(x, y, alternative="two-sided").pvalue)
        except ValueError:  # scipy versions that refuse all-zero differences after all
            p = 1.0
    return (1.0 if math.isnan(p) else p), len(keys)


def add_wilcoxon(rows: Sequence[Dict[str, object]], cases: Mapping[str, Mapping[CaseKey, float]],
                 reference: str) -> None:
    """Fill ``wilcoxon_ref``, ``wilcoxon_p`` and ``wilcoxon_pairs`` of ``rows`` (per method: its
    per-case Dice ``cases[method]``): a site row pairs that site's cases, ``mean of sites`` and
    ``pooled`` every case of the target. The reference's own rows keep an empty p."""
    for row in rows:
        row["wilcoxon_ref"] = reference
        method, site, target = str(row["method"]), str(row["site"]), str(row["target"])
        if method == reference or method not in cases or reference not in cases:
            row["wilcoxon_p"] = row["wilcoxon_pairs"] = ""
            continue
        if site.startswith("client"):
            cid = int(site[len("client"):])
            keys = [k for k in cases[reference] if k[0] == cid and k[2] == target]
        else:
            keys = [k for k in cases[reference] if k[2] == target]
        p, n = paired_wilcoxon(cases[reference], cases[method], keys)
        row["wilcoxon_p"] = "" if math.isnan(p) else p
        row["wilcoxon_pairs"] = n


def add_seed_deltas(rows: Sequence[Dict[str, object]],
                    per_seed: Mapping[str, Mapping[int, Sequence[Mapping[str, object]]]],
                    reference: str) -> None:
    """Fill ``seed_delta_mean``, ``seed_delta_std`` and ``seed_delta_above`` of ``rows`` (several
    seeds): the row's Dice minus the reference's, paired by seed (a seed is one train/validation
    split and initialisation for every method), its mean and sample std over the seeds both
    finished, and in how many of them the row is above (``'2/3'``). The reference's own rows,
    and rows without a common seed, stay empty."""
    dice = {label: {(str(r["site"]), str(r["target"]), seed): float(r["dice_mean"])
                    for seed, seed_rows in runs.items() for r in seed_rows}
            for label, runs in per_seed.items()}
    ref = dice.get(reference, {})
    for row in rows:
        row["seed_delta_mean"] = row["seed_delta_std"] = row["seed_delta_above"] = ""
        method = str(row["method"])
        if method == reference:
            continue
        keys = [(str(row["site"]), str(row["target"]), seed) for seed in per_seed.get(method, {})]
        diffs = [dice[method][k] - ref[k] for k in keys if k in ref and k in dice[method]
                 and not math.isnan(dice[method][k]) and not math.isnan(ref[k])]
        if not diffs:
            continue
        mean, std = _mean_std(diffs)
        row["seed_delta_mean"] = mean
        row["seed_delta_std"] = "" if math.isnan(std) else std
        row["seed_delta_above"] = f"{sum(d > 0 for d in diffs)}/{len(diffs)}"


def _mean_std(values: Sequence[float]) -> Tuple[float, float]:
    """Mean and sample (ddof=1) std of the defined ``values``; std NaN below two values."""
    defined = [float(v) for v in values if not math.isnan(float(v))]
    if not defined:
        return math.nan, math.nan
    mean = sum(defined) / len(defined)
    if len(defined) < 2:
        return mean, math.nan
    return mean, math.sqrt(sum((v - mean) ** 2 for v in defined) / (len(defined) - 1))


def _common(values: Sequence[object]) -> object:
    """The value all ``values`` share, else ``''``."""
    return values[0] if values and len({str(v) for v in values}) == 1 else ""


def aggregate_seeds(per_seed: Mapping[int, Sequence[Mapping[str, object]]]
                    ) -> List[Dict[str, object]]:
    """One method's ``comparison.csv`` rows over several seeds: for each (site, target) of
    its per-seed rows (``per_seed[seed]``, as :func:`result_rows` gives them), the mean and
    the std over the seeds of the per-seed Dice and HD95 means; ``train_seconds``: the mean
    per seed; ``seeds``: the seeds averaged."""
    order: List[Tuple[str, str]] = []
    groups: Dict[Tuple[str, str], List[Tuple[int, Mapping[str, object]]]] = {}
    for seed, rows in per_seed.items():
        for r in rows:
            key = (str(r["site"]), str(r["target"]))
            if key not in groups:
                order.append(key)
            groups.setdefault(key, []).append((seed, r))
    out = []
    for key in order:
        members = [r for _, r in groups[key]]
        first = members[0]
        row: Dict[str, object] = {"method": first["method"], "site": key[0], "target": key[1],
                                  "model": _common([m["model"] for m in members])}
        for metric in ("dice", "hd95"):
            row[f"{metric}_mean"], row[f"{metric}_std"] = _mean_std(
                [float(m[f"{metric}_mean"]) for m in members])
        row["cases"] = _common([m["cases"] for m in members])
        row["train_seconds"] = sum(float(m["train_seconds"]) for m in members) / len(members)
        row["lost_replies"] = sum(int(m.get("lost_replies", 0)) for m in members)
        row["seeds"] = " ".join(str(s) for s, _ in groups[key])
        out.append(row)
    return out


def validation_curve(out: Path, method: Method, seed: Optional[int] = None) -> Dict[int, float]:
    """Mean over sites of the validation Dice per round of the model the method deploys.

    A global method's sites validate the global model they receive: the aggregate of round
    ``r`` is scored in round ``r + 1`` (``val_dice_global``); the last aggregate is scored by
    the final evaluation, which metrics.csv does not hold, so its curve ends one round early.
    The same holds for a site that validates its model blended with the aggregate
    (``ala_validate_blend``, FedICRA-ref: ``val_dice_blend``). Centralised runs log one row per site per validation; the pooled row (client -1) is
    skipped. FT's fine-tuning appears as round ``rounds + 1``.
    """
    folder = result_dir(out, method, seed) or run_dir(out, method, seed)
    rows = read_csv(folder / "metrics.csv")
    entry = get_method(method.strategy)
    is_global = entry.deploys == "global" and entry.federated
    by_round: Dict[int, List[float]] = {}
    for r in rows:
        if r.get("client") in ("-1", "", None):
            continue
        if is_global:
            key, lag = "val_dice_global", 1
        elif r.get("val_dice_blend") not in ("", None):
            key, lag = "val_dice_blend", 1  # ala_validate_blend: the blend with round r - 1's aggregate
        else:
            key, lag = "val_dice", 0
        if r.get(key) in ("", None):
            continue
        by_round.setdefault(int(r["round"]) - lag, []).append(float(r[key]))
    return {k: sum(v) / len(v) for k, v in sorted(by_round.items()) if k >= 1}


# ---------------------------------------------------------------------- writing
COLUMNS = ("method", "site", "target", "model", "dice_mean", "dice_std", "hd95_mean",
           "hd95_std", "cases", "train_seconds", "lost_replies", "seeds", "wilcoxon_ref",
           "wilcoxon_p", "wilcoxon_pairs", "seed_delta_mean", "seed_delta_std",
           "seed_delta_above")
#: ``comparison_per_seed.csv``: the single-seed columns and the run's seed.
PER_SEED_COLUMNS = ("seed",) + COLUMNS[:COLUMNS.index("seeds")]


def write_csv(path: Path, rows: Sequence[Mapping[str, object]],
              columns: Sequence[str] = COLUMNS) -> None:
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(path)


def _cell(mean: float, std: float, digits: int) -> str:
    if math.isnan(mean):
        return "n/a"
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if not math.isnan(std) else f"{mean:.{digits}f}"


def _num(row: Mapping[str, object], key: str) -> float:
    value = row.get(key, "")
    return math.nan if value in ("", None) else float(value)  # type: ignore[arg-type]


def _p_cell(row: Mapping[str, object]) -> str:
    p = _num(row, "wilcoxon_p")
    if math.isnan(p):
        return ""
    return f"{p:.3g} (n={row.get('wilcoxon_pairs', '')})"


def _delta_cell(row: Mapping[str, object]) -> str:
    mean, std = _num(row, "seed_delta_mean"), _num(row, "seed_delta_std")
    if math.isnan(mean):
        return ""
    spread = "" if math.isnan(std) else f" ± {std:.3f}"
    return f"{mean:+.3f}{spread} ({row.get('seed_delta_above', '')} above)"


def markdown(rows: Sequence[Mapping[str, object]], seeds: Optional[Sequence[int]] = None) -> str:
    """One table per target: methods as rows; each site's Dice, the mean over sites, the mean
    over sites of HD95, the pooled Dice, the training wall time and the p-value of the paired
    test against the reference (pooled over the sites). One seed (``seeds`` None): ± std over
    cases (mean of sites: over sites). Several: every cell is mean ± std over the seeds."""
    parts = []
    multi = seeds is not None
    reference = next((str(r["wilcoxon_ref"]) for r in rows if r.get("wilcoxon_ref")), "")
    targets = list(dict.fromkeys(str(r["target"]) for r in rows))
    for target in targets:
        mine = [r for r in rows if r["target"] == target]
        sites = sorted({str(r["site"]) for r in mine if str(r["site"]).startswith("client")},
                       key=lambda s: int(s[len("client"):]))
        head = (["method", "tested"] + [s.replace("client", "site ") for s in sites]
                + ["mean of sites", "HD95 (mean of sites)", "pooled",
                   "train time" + (" (per seed)" if multi else "")]
                + (["seeds"] if multi else []) + ([f"p vs {reference}"] if reference else [])
                + ([f"Δ vs {reference}, by seed"] if multi and reference else []))
        if multi:
            title = (f"**{target}**: test Dice, mean ± std over the seeds "
                     f"({', '.join(map(str, seeds))}) of each seed's value (a site: the mean "
                     "over its test cases)")
        else:
            title = (f"**{target}**: test Dice (mean ± std over cases; mean of sites: ± std over "
                     "sites)")
        lines = [title, "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for method in dict.fromkeys(str(r["method"]) for r in mine):
            by_site = {str(r["site"]): r for r in mine if r["method"] == method}
            mean = by_site.get("mean of sites", {})
            pooled = by_site.get("pooled", {})
            first = next(iter(by_site.values()))
            lost = _num(first, "lost_replies")
            cells = [method + (f" ⚠{lost:.0f}" if lost > 0 else ""), str(first["model"])]
            cells += [_cell(_num(by_site[s], "dice_mean"), _num(by_site[s], "dice_std"), 3)
                      if s in by_site else "n/a" for s in sites]
            cells += [f"**{_cell(_num(mean, 'dice_mean'), _num(mean, 'dice_std'), 3)}**",
                      _cell(_num(mean, "hd95_mean"), _num(mean, "hd95_std"), 1),
                      _cell(_num(pooled, "dice_mean"),
                            _num(pooled, "dice_std") if multi else math.nan, 3),
                      f"{float(first['train_seconds']) / 60:.1f} min"]
            if multi:
                cells.append(str(len(str(first.get("seeds", "")).split())))
            if reference:
                cells.append(_p_cell(pooled or mean))
            if multi and reference:
                cells.append(_delta_cell(mean))
            lines.append("| " + " | ".join(cells) + " |")
        parts.append("\n".join(lines))
    if any(_num(r, "lost_replies") > 0 for r in rows):
        parts.append("⚠N: the run (over the seeds: the runs) trained without N site replies "
                     "(metrics.csv rows with missing = 1: a site missed a round's deadline or "
                     "failed, and the round was aggregated without it), so its values depend on "
                     "the machine's load; rerun it with a longer round_timeout.")
    if reference:
        note = (f"p vs {reference}: two-sided Wilcoxon signed-rank test (scipy.stats.wilcoxon) "
                f"of the row's per-case test Dice against {reference}'s, paired case by case over "
                "every test case of the target (all sites); n: the number of pairs; p = 1 where "
                "every difference is zero. comparison.csv also holds it per site.")
        if multi:
            note += (" Seeds are combined by averaging each test case's Dice over the seeds "
                     "first: the test set is the same for every seed (a seed changes only the "
                     "initialisation and the validation split). The p-value says how "
                     "consistently one model beats another case by case, not whether another "
                     f"seed would. That is Δ vs {reference}, by seed: the row's mean of sites "
                     f"minus {reference}'s, paired by seed, mean ± std over the seeds both "
                     "finished, and in how many of them the row is above.")
        if reference != "FedICRA":
            note += (f" FedICRA is not among the compared methods: the reference is {reference}, "
                     "the first method.")
        parts.append(note)
    return "\n\n".join(parts) + "\n"


def plot(curves: Mapping[str, Sequence[Mapping[int, float]]], path: Path, title: str) -> None:
    """One line per method: its validation curve, or with several seeds (curves) the mean over
    seeds per round and a shaded band from the lowest to the highest seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    styles = ["-", "--", "-.", ":"]
    banded = False
    for i, (label, runs) in enumerate(curves.items()):
        runs = [c for c in runs if c]
        if not runs:
            continue
        rounds = sorted({k for c in runs for k in c})
        values = [[c[k] for c in runs if k in c] for k in rounds]
        means = [sum(v) / len(v) for v in values]
        line, = ax.plot(rounds, means, styles[i // 10 % 4], marker="o", markersize=3,
                        label=label if len(runs) == 1 else f"{label} ({len(runs)} seeds)")
        if len(runs) > 1:
            banded = True
            ax.fill_between(rounds, [min(v) for v in values], [max(v) for v in values],
                            color=line.get_color(), alpha=0.15, linewidth=0)
    ax.set_xlabel("round")
    ax.set_ylabel("validation Dice (mean of sites)")
    ax.set_title(title + ("\nline: mean over seeds; band: min..max over seeds" if banded else ""))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


def reference_method(labels: Sequence[str]) -> str:
    """FedICRA when it is among ``labels``, else the first one ("" for none)."""
    return "FedICRA" if "FedICRA" in labels else (labels[0] if labels else "")


def write_reports(out: Path, methods: Sequence[Method], title: str,
                  seeds: Optional[Sequence[int]] = None) -> List[Path]:
    """``comparison.csv``, ``comparison.md`` and ``val_dice.png`` of the finished ``methods``
    (one seed: ``seeds`` None; several: mean ± std over those of ``seeds`` each has finished,
    and ``comparison_per_seed.csv``)."""
    plan: List[Optional[int]] = list(seeds) if seeds is not None else [None]
    folders = {m.label: [(s, result_dir(out, m, s)) for s in plan] for m in methods}
    folders = {label: [(s, f) for s, f in runs if f is not None] for label, runs in folders.items()}
    done = [m for m in methods if folders[m.label]]
    if seeds is None:
        rows = [row for m in done for row in result_rows(out, m)]
    else:
        per_seed = {m.label: {s: result_rows(out, m, s) for s, _ in folders[m.label]} for m in done}
        write_csv(out / "comparison_per_seed.csv",
                  [dict(r, seed=s) for m in done for s, runs in per_seed[m.label].items()
                   for r in runs], PER_SEED_COLUMNS)
        rows = [row for m in done for row in aggregate_seeds(per_seed[m.label])]
    reference = reference_method([m.label for m in done])
    cases = {m.label: case_dice([f for _, f in folders[m.label]]) for m in done}
    add_wilcoxon(rows, cases, reference)
    if seeds is not None:
        add_seed_deltas(rows, per_seed, reference)
    write_csv(out / "comparison.csv", rows)
    text = markdown(rows, seeds) if rows else "no method finished yet\n"
    tmp = out / "comparison.md.tmp"
    tmp.write_text(text)
    tmp.replace(out / "comparison.md")
    plot({m.label: [validation_curve(out, m, s) for s, _ in folders[m.label]] for m in done},
         out / "val_dice.png", title)
    written = [out / "comparison.csv", out / "comparison.md", out / "val_dice.png"]
    return written + ([out / "comparison_per_seed.csv"] if seeds is not None else [])


#: Rows that are not competitors of FedICRA: the ablation and the centralised references.
NOT_BASELINES = ("FedICRA", "FedICRA-ref", "FedAvg + full objective", "CT-weak", "CT-full")


def best_baseline(out: Path, target: str = "") -> str:
    """The ``--methods`` name of the compared method with the highest mean-of-sites test Dice
    in ``out/comparison.csv`` (averaged over targets unless ``target`` is given), leaving out
    FedICRA, the ablation row and the centralised references."""
    rows = [r for r in read_csv(out / "comparison.csv") if r["site"] == "mean of sites"
            and r["method"] not in NOT_BASELINES and (not target or r["target"] == target)]
    if not rows:
        raise SystemExit(f"{out / 'comparison.csv'} holds no baseline yet")
    scores: Dict[str, List[float]] = {}
    for r in rows:
        scores.setdefault(r["method"], []).append(float(r["dice_mean"]))
    label = max(scores, key=lambda m: sum(scores[m]) / len(scores[m]))
    return next(m.slug for m in all_methods() if m.label == label)


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


def job_name(method: Method, seed: Optional[int]) -> str:
    return method.label + ("" if seed is None else f" seed {seed}")


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
