"""Validation curves of runs from their metrics.csv: the mean over sites per round, and the
length rule of the converged protocol (docs/results.md, "The converged protocol").

    python -m benchmarks.pilot_curves docs/data/pilot_faz_cpu_long/*_metrics.csv

A row of round r scores round r's model, except ``val_dice_blend`` (FedICRA-ref's blend with the
aggregate of round r - 1), which is read as round r - 1, as ``compare_strategies`` plots it.
"""
from __future__ import annotations

import argparse
import csv
from pathlib import Path
from typing import Dict, List, Optional, Sequence

CHECKPOINTS = (20, 30, 40)


def curve(path: Path) -> Dict[int, Dict[int, float]]:
    """``{round: {client: validation Dice}}`` of one metrics.csv."""
    by_round: Dict[int, Dict[int, float]] = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            if row.get("client") in ("-1", "", None):
                continue
            if row.get("val_dice_blend"):
                key, lag = "val_dice_blend", 1
            elif row.get("val_dice"):
                key, lag = "val_dice", 0
            else:
                continue
            by_round.setdefault(int(row["round"]) - lag, {})[int(row["client"])] = float(row[key])
    return {r: v for r, v in sorted(by_round.items()) if r >= 1}


def length_rule(curves: Sequence[Dict[int, float]], tolerance: float = 0.01) -> Optional[int]:
    """The smallest R of :data:`CHECKPOINTS` at which every curve's best so far is within
    ``tolerance`` of its best over all its rounds (``None`` when a curve stops before R)."""
    for length in CHECKPOINTS:
        if all(max(c) >= length and
               max(v for r, v in c.items() if r <= length) >= max(c.values()) - tolerance
               for c in curves):
            return length
    return None


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("metrics", nargs="+", type=Path)
    parser.add_argument("--every", type=int, default=5, help="print every N-th round")
    args = parser.parse_args(argv)
    means = []
    for path in args.metrics:
        rounds = curve(path)
        mean = {r: sum(v.values()) / len(v) for r, v in rounds.items()}
        means.append(mean)
        shown = " ".join(f"{r}:{v:.3f}" for r, v in mean.items() if r % args.every == 0 or r == max(mean))
        sites = {k for v in rounds.values() for k in v}
        best = " ".join(f"{k}:{max(v.get(k, 0.0) for v in rounds.values()):.3f}" for k in sorted(sites))
        print(f"{path.name}: {len(mean)} rounds | mean over sites {shown} | best per site {best}")
    print(f"length rule (smallest of {CHECKPOINTS} within 0.01 of every curve's best): "
          f"{length_rule(means) or 'undecided (a curve is shorter than 40 rounds or never settles)'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
