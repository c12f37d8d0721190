"""The ``metrics.csv`` of a run: its columns, how rows are added, and the end-of-run summary.

One format for every writer (the federated server's reporter, the centralised trainer) and
reader (the summary, the comparison tools), kept beside the configuration snapshot because
both are files a run leaves behind; the module imports nothing of the project.
"""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Optional, Sequence

import numpy as np

#: Columns of metrics.csv; loss terms a method does not produce stay empty (``prompt`` and
#: ``pseudo``: FedLPPA's prompt divergence and pseudo-label terms). ``missing`` is 1 on
#: the row of a client that did not answer the round (its other columns empty), else 0.
#: ``val_dice_global`` and ``val_dice_blend`` in the row of round r score the aggregate of round
#: r - 1: the received global model, and the site's model blended with it (``ala_validate_blend``).
CSV_COLUMNS = ("round", "client", "num_examples", "total", "pce", "tree", "crf", "sc", "calib", "extra",
               "prompt", "pseudo", "lr", "val_dice", "best_val_dice", "val_dice_global", "val_dice_blend", "diverged",
               "seconds", "missing")


def start_file(path: Path) -> None:
    """A new metrics.csv holding only the header (an existing file is replaced)."""
    with open(path, "w", newline="") as f:
        csv.writer(f).writerow(CSV_COLUMNS)


def append_rows(path: Path, rows: Iterable[Mapping[str, object]]) -> None:
    """Append ``rows`` in the given order to a file begun by :func:`start_file` (or
    :func:`keep_rows_up_to`); keys outside :data:`CSV_COLUMNS` are ignored, absent columns
    stay empty."""
    with open(path, "a", newline="") as f:
        out = csv.writer(f)
        for row in rows:
            out.writerow([row.get(c, "") for c in CSV_COLUMNS])


def keep_rows_up_to(path: Path, last_round: int, columns: Sequence[str] = CSV_COLUMNS) -> int:
    """Rewrite metrics.csv (or another per-round file with a ``round`` column and ``columns``)
    with its rows of rounds ``1 .. last_round`` only (for a resumed run); rows are matched by
    column name, so a file written before a column was added keeps its values. Returns how
    many rows were dropped."""
    rows: List[Dict[str, str]] = []
    if path.is_file():
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    kept = [r for r in rows if r.get("round") and int(r["round"]) <= last_round]
    tmp = path.with_name(path.name + ".resume.tmp")
    with open(tmp, "w", newline="") as f:
        out = csv.DictWriter(f, columns, restval="", extrasaction="ignore")
        out.writeheader()
        out.writerows(kept)
    tmp.replace(path)
    return len(rows) - len(kept)


def rounds_text(rounds: Iterable[int]) -> str:
    """``[2, 3, 4, 7]`` -> ``"rounds 2-4, 7"`` (``"round 3"`` for one)."""
    rounds = sorted(set(rounds))
    spans: List[List[int]] = []
    for r in rounds:
        if spans and r == spans[-1][1] + 1:
            spans[-1][1] = r
        else:
            spans.append([r, r])
    text = ", ".join(f"{a}-{b}" if b > a else f"{a}" for a, b in spans)
    return f"round{'s' if len(rounds) > 1 else ''} {text}"


def summary_table(csv_path: Path, dropped: Optional[Mapping[int, str]] = None) -> str:
    """End-of-run table from metrics.csv: per client its best validation Dice and the round
    it was reached (the personalised checkpoint), and the best mean Dice of the global model
    where the method validates it (its row ``round r`` scores the aggregate of round r - 1).

    Then the sites that missed rounds (``missing = 1`` rows), which rounds, and whether they
    came back, and the sites dropped for the rest of the run (``dropped``: client id -> why,
    e.g. a site worker that used up its restarts).
    """
    best: Dict[int, tuple] = {}
    global_means: Dict[int, List[float]] = {}
    missed: Dict[int, List[int]] = {}
    last_round = 0
    with open(csv_path, newline="") as f:
        for row in csv.DictReader(f):
            client, rnd = int(row["client"]), int(row["round"])
            last_round = max(last_round, rnd)
            if row.get("missing") == "1":
                missed.setdefault(client, []).append(rnd)
            for key, scored in (("val_dice", rnd), ("val_dice_blend", rnd - 1)):
                if row.get(key):
                    value = float(row[key])
                    if client not in best or value > best[client][0]:
                        best[client] = (value, scored)
            if row.get("val_dice_global"):
                global_means.setdefault(rnd - 1, []).append(float(row["val_dice_global"]))
    lines = ["client | best validation Dice | round"]
    lines += [f"{k:>6} | {v:.4f} | {r}" for k, (v, r) in sorted(best.items())]
    if best:
        lines.append(f"{'mean':>6} | {np.mean([v for v, _ in best.values()]):.4f} |")
    if global_means:
        rnd, value = max(((r, float(np.mean(v))) for r, v in global_means.items()),
                         key=lambda item: item[1])
        lines.append(f"global model: best mean validation Dice {value:.4f} (aggregate of round "
                     f"{rnd}; the final aggregate is scored after the last round)")
    for client, rounds in sorted(missed.items()):
        lines.append(f"client {client} missed {rounds_text(rounds)} of {last_round}"
                     f"{', the last one included' if last_round in rounds else ''} (the "
                     "run's log says why)")
    for client, why in sorted((dropped or {}).items()):
        lines.append(f"client {client} was dropped for the rest of the run: {why}")
    return "\n".join(lines)
