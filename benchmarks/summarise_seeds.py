"""Mean and std over seeds of tested runs, as a Markdown table.

    python -m benchmarks.summarise_seeds model/faz_cpu/FedICRA_seed2022 model/faz_cpu/FedICRA_seed2023 ...

Each folder must hold ``test/mean_std_result.csv`` (written by ``test_client.py``). For every
row of those files (each site, ``mean of sites``, ``pooled``) and every target, the table gives
the mean over runs of the run-level mean Dice and HD95, with the standard deviation over runs
(the seed-to-seed spread, not the case-to-case one), plus each run's value.
"""
from __future__ import annotations

import argparse
import csv
import math
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

Row = Tuple[str, str]  # (client label, target)


def read_summary(run: Path) -> Dict[Row, Dict[str, float]]:
    path = run / "test" / "mean_std_result.csv"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: run test_client.py on {run} first")
    with open(path, newline="") as f:
        return {(r["client"], r["target"]): {k: float(v) for k, v in r.items()
                                            if k.endswith("_mean") and v not in ("", None)}
                for r in csv.DictReader(f)}


def _cell(values: Sequence[float], digits: int) -> str:
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return "n/a"
    spread = f" ± {np.std(values, ddof=1):.{digits}f}" if len(values) > 1 else ""
    return f"{np.mean(values):.{digits}f}{spread}"


def default_labels(runs: Sequence[Path]) -> List[str]:
    """The folder names; where two runs share one (the same method in several comparison
    folders), each is named by the seed of its config snapshot instead (``config.toml``)."""
    names = [r.name for r in runs]
    if len(set(names)) == len(names):
        return names
    from configs import load_config

    labels = []
    for run in runs:
        snapshot = run / "config.toml"
        seed = load_config(snapshot).seed if snapshot.is_file() else "?"
        labels.append(f"{run.name} seed {seed}")
    return labels


def table(runs: Sequence[Path], labels: Optional[Sequence[str]] = None) -> str:
    """Markdown: one line per (row, target); Dice and HD95 mean ± std over runs, and each
    run's Dice."""
    summaries = [read_summary(r) for r in runs]
    labels = list(labels) if labels else default_labels(runs)
    if len(labels) != len(runs):
        raise ValueError(f"--labels: {len(labels)} names for {len(runs)} runs")
    keys: List[Row] = [k for k in summaries[0] if all(k in s for s in summaries)]
    head = ("| site | target | Dice (mean ± std over runs) | HD95 | "
            + " | ".join(f"Dice {name}" for name in labels) + " |")
    lines = [head, "|" + "---|" * (4 + len(runs))]
    for key in keys:
        dice = [s[key]["dice_mean"] for s in summaries]
        hd95 = [s[key].get("hd95_mean", math.nan) for s in summaries]
        lines.append(f"| {key[0]} | {key[1]} | {_cell(dice, 3)} | {_cell(hd95, 1)} | "
                     + " | ".join(f"{d:.3f}" for d in dice) + " |")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", type=Path, help="run folders (model/<exp>)")
    p.add_argument("--labels", nargs="*", help="column names (default: the folder names)")
    args = p.parse_args(argv)
    try:
        print(table(args.runs, args.labels))
    except (FileNotFoundError, KeyError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
