"""Whether two sets of runs computed the same values, to the last bit.

A refactor that claims to change no computed value is checked by running the same runs
before and after it and comparing them here: every ``metrics.csv`` (all columns but the wall
times), every ``test/result.csv`` and every checkpoint tensor (``global/*.pt``,
``client<k>/*.pt``) of each run folder found under both roots.

    python -m benchmarks.same_results BEFORE/runs AFTER/runs

prints one line per run and exits 1 when any value differs (or a run is missing after).
"""
from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path
from typing import Dict, Iterable, List

import numpy as np

#: Columns that hold wall times, not computed values.
TIME_COLUMNS = {"seconds"}
#: Columns that name where a run is, not what it computed.
PLACE_COLUMNS = {"run"}


def csv_rows(path: Path, skip: Iterable[str] = ()) -> List[Dict[str, str]]:
    """The rows without the ``skip`` columns and without empty cells (a column that a later
    format adds, empty for the runs compared, is no computed value)."""
    with open(path, newline="") as f:
        return [{k: v for k, v in row.items() if k not in skip and v != ""}
                for row in csv.DictReader(f)]


def flat_tensors(obj, prefix: str = "") -> Dict[str, np.ndarray]:
    """Every tensor (and number) of a loaded checkpoint, by its path in the nesting."""
    import torch

    out: Dict[str, np.ndarray] = {}
    if isinstance(obj, torch.Tensor):
        out[prefix] = obj.detach().cpu().numpy()
    elif isinstance(obj, dict):
        for k, v in obj.items():
            out.update(flat_tensors(v, f"{prefix}/{k}"))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            out.update(flat_tensors(v, f"{prefix}[{i}]"))
    elif isinstance(obj, (int, float, bool)):
        out[prefix] = np.asarray(obj)
    return out


def same_array(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal shapes and values, bit for bit (NaN equal to NaN where the type has one)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    floating = np.issubdtype(a.dtype, np.floating) or np.issubdtype(a.dtype, np.complexfloating)
    return bool(np.array_equal(a, b, equal_nan=floating))


def compare_run(before: Path, after: Path) -> List[str]:
    """What differs between two run folders (empty: identical computed values)."""
    import torch

    problems: List[str] = []
    for name, skip in (("metrics.csv", TIME_COLUMNS), ("test/result.csv", PLACE_COLUMNS)):
        a, b = before / name, after / name
        if a.is_file() != b.is_file():
            problems.append(f"{name} only in {'before' if a.is_file() else 'after'}")
        elif a.is_file() and csv_rows(a, skip) != csv_rows(b, skip):
            problems.append(f"{name} differs")
    for a in sorted(before.glob("*/*.pt")):
        b = after / a.relative_to(before)
        if not b.is_file():
            problems.append(f"{a.relative_to(before)} missing after")
            continue
        ta = flat_tensors(torch.load(a, map_location="cpu", weights_only=False))
        tb = flat_tensors(torch.load(b, map_location="cpu", weights_only=False))
        if sorted(ta) != sorted(tb):
            problems.append(f"{a.relative_to(before)}: other entries")
            continue
        differing = [k for k in ta if not same_array(ta[k], tb[k])]
        if differing:
            problems.append(f"{a.relative_to(before)}: {len(differing)} entries differ "
                            f"(e.g. {differing[0]})")
    return problems


def main(argv: List[str] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("before", type=Path, help="folder holding the run folders made before")
    p.add_argument("after", type=Path, help="folder holding the same runs made after")
    p.add_argument("--only-after", action="store_true",
                   help="compare only the runs found in AFTER (a subset rerun)")
    args = p.parse_args(argv)
    runs = sorted(d.name for d in args.before.iterdir() if (d / "metrics.csv").is_file()
                  and (not args.only_after or (args.after / d.name / "metrics.csv").is_file()))
    if not runs:
        raise SystemExit(f"{args.before}: no run folder (with a metrics.csv) inside")
    bad = 0
    for name in runs:
        after = args.after / name
        if not (after / "metrics.csv").is_file():
            problems = ["missing after"]
        else:
            problems = compare_run(args.before / name, after)
        bad += bool(problems)
        print(f"{name:<24} {'identical' if not problems else '; '.join(problems)}")
    print(f"{len(runs) - bad} of {len(runs)} runs identical")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
