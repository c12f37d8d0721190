"""Train and test every compared method on one federation, one seed and one schedule.

    python -m benchmarks.compare_strategies --config configs/compare_faz_cpu.toml --out results/compare_faz_cpu
    python -m benchmarks.compare_strategies --task synthetic_faz --methods all --rounds 2 --iters 2 --img_size 32 --out DIR

Each method runs as its name defines it (``flower_runner.py --strategy NAME``: its own
network, objective and hyper-parameters), on the same data, seed, rounds, local iterations,
batch size and image size, through real Flower processes; then ``test_client.py`` tests what
the method deploys (the global model of FedAvg-like methods, every site's personalised model
otherwise). One row is not a method of its own: ``FedAvg + full objective`` is FedAvg with
FedICRA's network and weakly supervised objective, so that the table separates what the
objective gains from what the federated method gains.

Written to ``--out DIR``:

- ``runs/<method>/``: each run's folder (config snapshot, checkpoints, metrics.csv,
  TensorBoard, test results) and ``compare.json`` (its command and wall time);
- ``comparison.csv``: one row per method, site (and ``mean of sites``, ``pooled``) and target
  (``faz``; ``cup`` and ``disc`` for fundus), Dice and HD95 mean and std over the test cases
  (the ``mean of sites`` std is over sites);
- ``comparison.md``: the same as Markdown tables, methods as rows and sites as columns;
- ``val_dice.png``: the mean over sites of the validation Dice per round, one line per method
  (for methods that deploy a global model, the validation of that global model).

A method whose test results are already in ``DIR`` is skipped, so an interrupted comparison
resumes where it stopped (a half-finished run is trained again from the start).
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
from typing import Dict, List, Mapping, Optional, Sequence

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
    """FedICRA's network and objective (its strategy defaults), for the FedAvg ablation row."""
    from strategies.registry import strategy_class

    defaults = strategy_class("FedICRA").defaults
    return {"model": defaults["model"], "procedure": defaults["procedure"]}


def all_methods() -> List[Method]:
    """The rows of the paper's comparison in its order, FedICRA first, then the ablation.

    Methods that are not registered (yet) are left out with a warning.
    """
    from strategies.registry import strategy_names

    names = ["FedICRA", "FedAvg", "FT", "FedProx", "FedBN", "FedAP", "FedRep", "MetaFed",
             "FedALA", "FedLC", "Local", "CT-weak", "CT-full"]
    known = {n.lower(): n for n in strategy_names()}
    rows = []
    for name in names:
        if name.lower() in known:
            rows.append(Method(name, known[name.lower()]))
        else:
            log.warning("method %s is not registered; left out of the comparison", name)
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
def run_dir(out: Path, method: Method) -> Path:
    return out / "runs" / method.slug


def is_done(out: Path, method: Method) -> bool:
    folder = run_dir(out, method)
    return (folder / "test" / "mean_std_result.csv").is_file() and (folder / "compare.json").is_file()


def train_command(args: argparse.Namespace, method: Method, port: int) -> List[str]:
    cmd = [sys.executable, "flower_runner.py", "--strategy", method.strategy,
           "--out_root", str(Path(args.out).resolve() / "runs"), "--exp", method.slug,
           "--overwrite", "--port", str(port)]
    if args.config:
        cmd += ["--config", str(args.config)]
    if args.task:
        cmd += ["--img_class", args.task]
    for flag in ("rounds", "iters", "img_size", "num_clients", "root_path", "seed",
                 "batch_size", "mode"):
        value = getattr(args, flag)
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


def test_command(args: argparse.Namespace, method: Method) -> List[str]:
    cmd = [sys.executable, "test_client.py", "--client", "all", "--exp", method.slug,
           "--out_root", str(Path(args.out).resolve() / "runs"), "--no_images"]
    if args.device:
        cmd += ["--device", args.device]
    return cmd


def run_method(args: argparse.Namespace, method: Method) -> Dict[str, object]:
    """Train and test ``method``; the run's output is appended to ``runs/<method>.log``."""
    from deployment.processes import free_port_base

    folder = run_dir(Path(args.out), method)
    folder.parent.mkdir(parents=True, exist_ok=True)
    log_path = folder.parent / f"{method.slug}.log"
    train = train_command(args, method, free_port_base(4 + 2 * (args.num_clients or 5)))
    test = test_command(args, method)
    start = time.perf_counter()
    with open(log_path, "w") as logf:
        for step, cmd in (("training", train), ("testing", test)):
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
              "test_command": " ".join(test[1:]), "train_seconds": train_seconds,
              "total_seconds": time.perf_counter() - start,
              "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
    (folder / "compare.json").write_text(json.dumps(record, indent=2))
    return record


# ---------------------------------------------------------------------- reading results
def read_csv(path: Path) -> List[Dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def result_rows(out: Path, method: Method) -> List[Dict[str, object]]:
    """``comparison.csv`` rows of one tested method."""
    folder = run_dir(out, method)
    record = json.loads((folder / "compare.json").read_text())
    rows = []
    for r in read_csv(folder / "test" / "mean_std_result.csv"):
        def num(key: str) -> float:
            return float(r[key]) if r.get(key) not in (None, "") else math.nan

        rows.append({"method": method.label, "site": r["client"], "target": r["target"],
                     "model": r["model"], "dice_mean": num("dice_mean"),
                     "dice_std": num("dice_std"), "hd95_mean": num("hd95_mean"),
                     "hd95_std": num("hd95_std"), "cases": r.get("cases", ""),
                     "train_seconds": float(record["train_seconds"])})
    return rows


def validation_curve(out: Path, method: Method) -> Dict[int, float]:
    """Mean over sites of the validation Dice per round of the model the method deploys.

    A global method's sites validate the global model they receive: the aggregate of round
    ``r`` is scored in round ``r + 1`` (``val_dice_global``); the last aggregate is scored by
    the final evaluation, which metrics.csv does not hold, so its curve ends one round early.
    Centralised runs log one row per site per validation; the pooled row (client -1) is
    skipped. FT's fine-tuning appears as round ``rounds + 1``.
    """
    from strategies.registry import strategy_class

    rows = read_csv(run_dir(out, method) / "metrics.csv")
    is_global = strategy_class(method.strategy).deploys == "global" and \
        getattr(strategy_class(method.strategy), "federated", True)
    by_round: Dict[int, List[float]] = {}
    for r in rows:
        if r.get("client") in ("-1", "", None):
            continue
        key = "val_dice_global" if is_global else "val_dice"
        if r.get(key) in ("", None):
            continue
        round_ = int(r["round"]) - (1 if is_global else 0)
        by_round.setdefault(round_, []).append(float(r[key]))
    return {k: sum(v) / len(v) for k, v in sorted(by_round.items()) if k >= 1}


# ---------------------------------------------------------------------- writing
COLUMNS = ("method", "site", "target", "model", "dice_mean", "dice_std", "hd95_mean",
           "hd95_std", "cases", "train_seconds")


def write_csv(path: Path, rows: Sequence[Mapping[str, object]]) -> None:
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(COLUMNS))
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(path)


def _cell(mean: float, std: float, digits: int) -> str:
    if math.isnan(mean):
        return "n/a"
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if not math.isnan(std) else f"{mean:.{digits}f}"


def markdown(rows: Sequence[Mapping[str, object]]) -> str:
    """One table per target: methods as rows; each site's Dice, the mean over sites (± std
    over sites), the mean over sites of HD95, the pooled Dice and the training wall time."""
    parts = []
    targets = list(dict.fromkeys(str(r["target"]) for r in rows))
    for target in targets:
        mine = [r for r in rows if r["target"] == target]
        sites = sorted({str(r["site"]) for r in mine if str(r["site"]).startswith("client")},
                       key=lambda s: int(s[len("client"):]))
        head = (["method", "tested"] + [s.replace("client", "site ") for s in sites]
                + ["mean of sites", "HD95 (mean of sites)", "pooled", "train time"])
        lines = [f"**{target}**: test Dice (mean ± std over cases; mean of sites: ± std over "
                 "sites)", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for method in dict.fromkeys(str(r["method"]) for r in mine):
            by_site = {str(r["site"]): r for r in mine if r["method"] == method}
            mean = by_site.get("mean of sites", {})
            pooled = by_site.get("pooled", {})
            first = next(iter(by_site.values()))
            cells = [method, str(first["model"])]
            cells += [_cell(float(by_site[s]["dice_mean"]), float(by_site[s]["dice_std"]), 3)
                      if s in by_site else "n/a" for s in sites]
            cells += [f"**{_cell(float(mean.get('dice_mean', math.nan)), float(mean.get('dice_std', math.nan)), 3)}**",
                      _cell(float(mean.get("hd95_mean", math.nan)), float(mean.get("hd95_std", math.nan)), 1),
                      _cell(float(pooled.get("dice_mean", math.nan)), math.nan, 3),
                      f"{float(first['train_seconds']) / 60:.1f} min"]
            lines.append("| " + " | ".join(cells) + " |")
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n"


def plot(curves: Mapping[str, Mapping[int, float]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    styles = ["-", "--", "-.", ":"]
    for i, (label, curve) in enumerate(curves.items()):
        if curve:
            ax.plot(list(curve), list(curve.values()), styles[i // 10 % 4], marker="o",
                    markersize=3, label=label)
    ax.set_xlabel("round")
    ax.set_ylabel("validation Dice (mean of sites)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


def write_reports(out: Path, methods: Sequence[Method], title: str) -> List[Path]:
    done = [m for m in methods if is_done(out, m)]
    rows = [row for m in done for row in result_rows(out, m)]
    write_csv(out / "comparison.csv", rows)
    text = markdown(rows) if rows else "no method finished yet\n"
    tmp = out / "comparison.md.tmp"
    tmp.write_text(text)
    tmp.replace(out / "comparison.md")
    plot({m.label: validation_curve(out, m) for m in done}, out / "val_dice.png", title)
    return [out / "comparison.csv", out / "comparison.md", out / "val_dice.png"]


#: Rows that are not competitors of FedICRA: the ablation and the centralised references.
NOT_BASELINES = ("FedICRA", "FedAvg + full objective", "CT-weak", "CT-full")


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
    p.add_argument("--mode", choices=("deployment", "simulation"),
                   help="how each federation runs (default: the runner's)")
    p.add_argument("--gpus", type=int, nargs="*", default=None,
                   help="GPU ids the clients of every run are spread over (none: CPU)")
    p.add_argument("--device", default="", help="device of test_client.py (default: CUDA if any)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any other configuration key for every run")
    p.add_argument("--keep-going", action="store_true",
                   help="go on with the next method when one fails (default: stop)")
    return p.parse_args(argv)


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
    # the reports hold every method tested in DIR, also those of earlier calls
    reported = [m for m in all_methods() if m in methods or is_done(out, m)]
    log.info("comparing %s in %s", ", ".join(m.label for m in methods), out)
    failed = []
    for i, method in enumerate(methods, 1):
        if is_done(out, method):
            log.info("[%d/%d] %s: results already in %s, skipped", i, len(methods),
                     method.label, run_dir(out, method))
            continue
        log.info("[%d/%d] %s: training and testing ...", i, len(methods), method.label)
        try:
            record = run_method(args, method)
        except RuntimeError as err:
            log.error("%s", err)
            failed.append(method.label)
            if not args.keep_going:
                break
            continue
        log.info("[%d/%d] %s: done in %.1f min", i, len(methods), method.label,
                 record["total_seconds"] / 60)
        write_reports(out, reported, str(args.config or args.task))
    files = write_reports(out, reported, str(args.config or args.task))
    total = sum(json.loads((run_dir(out, m) / "compare.json").read_text())["total_seconds"]
                for m in reported if is_done(out, m))
    log.info("wrote %s (train + test wall time of the finished methods: %.1f min)",
             ", ".join(str(f) for f in files), total / 60)
    if failed:
        log.error("failed: %s", ", ".join(failed))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
