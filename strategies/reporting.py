"""What the server writes about a run: metrics.csv, TensorBoard, global checkpoints, progress."""
from __future__ import annotations

import csv
import logging
import math
import time
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Sequence

import numpy as np

from networks.checkpoint import as_tensors, load_checkpoint, save_atomic

log = logging.getLogger("fedicra.server")

#: Columns of metrics.csv; loss terms a method does not produce stay empty. ``missing`` is 1 on
#: the row of a client that did not answer the round (its other columns empty), else 0.
CSV_COLUMNS = ("round", "client", "num_examples", "total", "pce", "tree", "crf", "sc", "calib", "extra",
               "lr", "val_dice", "best_val_dice", "val_dice_global", "diverged", "seconds",
               "missing")


def _fmt_seconds(seconds: float) -> str:
    seconds = int(round(seconds))
    minutes, sec = divmod(seconds, 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{sec:02d}s" if hours else f"{minutes}m{sec:02d}s"


class RunReporter:
    """Records every round of one run under ``out_dir``.

    Parameters
    ----------
    out_dir : Path
        The experiment folder (``model/<exp>``).
    rounds : int
        Planned number of rounds (for the ETA).
    meta : mapping, optional
        Stamp of the global checkpoints (:func:`networks.checkpoint.run_meta`).
    resume_round : int
        0 for a new run (a fresh metrics.csv); ``r`` to continue a run after its round ``r``:
        metrics.csv keeps its rows of rounds ``1 .. r`` (rows of a round interrupted after
        they were written are dropped) and TensorBoard hides its events from step ``r + 1``.
    """

    def __init__(self, out_dir: Path, rounds: int, meta: Optional[Mapping[str, object]] = None,
                 resume_round: int = 0) -> None:
        self.out_dir = Path(out_dir)
        self.rounds = rounds
        self.meta = dict(meta or {})  # stamp of the global checkpoints (networks.checkpoint.run_meta)
        self.start = time.perf_counter()
        self.resume_round = int(resume_round)
        self.best_global = -math.inf
        #: returns the strategy's state, stored with every round's global checkpoint
        self.state_source: Optional[Callable[[], Mapping[str, object]]] = None
        self.csv_path = self.out_dir / "metrics.csv"
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if self.resume_round:
            self._keep_rows_up_to(self.resume_round)
        else:
            with open(self.csv_path, "w", newline="") as f:
                csv.writer(f).writerow(CSV_COLUMNS)
        self._writer = None

    def _keep_rows_up_to(self, last_round: int) -> None:
        rows: List[Dict[str, str]] = []
        if self.csv_path.is_file():
            with open(self.csv_path, newline="") as f:
                rows = list(csv.DictReader(f))
        kept = [r for r in rows if r.get("round") and int(r["round"]) <= last_round]
        tmp = self.csv_path.with_name(self.csv_path.name + ".resume.tmp")
        with open(tmp, "w", newline="") as f:  # by column name: the columns may have grown
            out = csv.DictWriter(f, CSV_COLUMNS, restval="", extrasaction="ignore")
            out.writeheader()
            out.writerows(kept)
        tmp.replace(self.csv_path)
        if len(kept) < len(rows):
            log.info("metrics.csv: dropped %d row(s) of the interrupted round %d",
                     len(rows) - len(kept), last_round + 1)

    @property
    def writer(self):
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(self.out_dir / "tb" / "server"),
                                         purge_step=self.resume_round + 1 if self.resume_round
                                         else None)
        return self._writer

    def state_dict(self) -> Dict[str, object]:
        return {"best_global": float(self.best_global)}

    def load_state_dict(self, state: Mapping[str, object]) -> None:
        self.best_global = float(state.get("best_global", -math.inf))

    def finish(self) -> None:
        """Mark the run complete in ``global/latest.pt`` (``--resume`` refuses it then)."""
        path = self.out_dir / "global" / "latest.pt"
        if path.is_file():
            state = load_checkpoint(path)
            state["finished"] = True
            save_atomic(state, path)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def record_round(self, server_round: int, client_metrics: Sequence[Mapping[str, float]],
                     aggregated: Mapping[str, float], global_arrays: Mapping[str, np.ndarray],
                     expected_clients: int, missing: Sequence[int] = ()) -> None:
        """Append one row per client to metrics.csv (``missing``: client ids that did not
        answer), log aggregates, checkpoint the global model."""
        self.write_rows(server_round, client_metrics, missing)
        for key, value in aggregated.items():
            if key not in ("cid", "num-examples"):
                self.writer.add_scalar(f"server/{key}", value, server_round)
        self.writer.flush()
        # with the strategy's and this reporter's state: what flower_runner.py --resume needs
        state = {"round": server_round, "arrays": as_tensors(global_arrays), "meta": self.meta,
                 "strategy": dict(self.state_source()) if self.state_source is not None else {},
                 "reporter": self.state_dict(), "finished": False}
        save_atomic(state, self.out_dir / "global" / "latest.pt")
        self._progress(server_round, len(client_metrics), expected_clients, aggregated)

    def write_rows(self, server_round: int, client_metrics: Sequence[Mapping[str, float]],
                   missing: Sequence[int] = ()) -> None:
        """One metrics.csv row per client, in client-id order; a client of ``missing`` (no
        answer this round) gets a row with ``missing = 1`` and nothing else."""
        rows = []
        for m in client_metrics:
            row = {"round": server_round, "client": int(m.get("cid", -1)),
                   "num_examples": int(m.get("num-examples", 0)), "missing": 0}
            row.update({k: m[k] for k in CSV_COLUMNS if k in m and k not in row})
            rows.append(row)
        rows += [{"round": server_round, "client": int(k), "missing": 1} for k in missing]
        with open(self.csv_path, "a", newline="") as f:
            out = csv.writer(f)
            for row in sorted(rows, key=lambda r: r["client"]):
                out.writerow([row.get(c, "") for c in CSV_COLUMNS])

    def record_global_validation(self, aggregate_round: int, arrays: Mapping[str, np.ndarray],
                                 val_dice: float) -> None:
        """The global model aggregated at ``aggregate_round`` (0: the initial model) scored
        ``val_dice``, the mean over sites of its validation Dice: keep it as
        ``global/best.pt`` when it is the best so far (what global methods deploy)."""
        self.writer.add_scalar("server/val_dice_global", val_dice, aggregate_round)
        log.info("global model of round %d: mean validation dice %.4f over sites",
                 aggregate_round, val_dice)
        if val_dice > self.best_global:
            self.best_global = float(val_dice)
            save_atomic({"round": aggregate_round, "arrays": as_tensors(arrays),
                         "val_dice": float(val_dice), "meta": self.meta},
                        self.out_dir / "global" / "best.pt")

    def _progress(self, server_round: int, answered: int, expected: int,
                  aggregated: Mapping[str, float]) -> None:
        elapsed = time.perf_counter() - self.start
        eta = elapsed / max(server_round - self.resume_round, 1) * (self.rounds - server_round)
        val = aggregated.get("val_dice")
        log.info("round %d/%d | clients %d/%d | train loss %.4f | val dice %s | %s elapsed | ETA %s",
                 server_round, self.rounds, answered, expected, aggregated.get("total", float("nan")),
                 "-" if val is None else f"{val:.4f}", _fmt_seconds(elapsed), _fmt_seconds(eta))

    def record_final(self, client_metrics: Sequence[Mapping[str, float]]) -> None:
        for m in sorted(client_metrics, key=lambda m: m.get("cid", -1)):
            log.info("final validation | client %d | dice %.4f", int(m.get("cid", -1)),
                     m.get("val_dice", float("nan")))


def summary_table(csv_path: Path) -> str:
    """End-of-run table from metrics.csv: per client its best validation Dice and the round
    it was reached (the personalised checkpoint), and the best mean Dice of the global model
    where the method validates it (its row ``round r`` scores the aggregate of round r - 1)."""
    best: Dict[int, tuple] = {}
    global_means: Dict[int, List[float]] = {}
    with open(csv_path, newline="") as f:
        for row in csv.DictReader(f):
            client, rnd = int(row["client"]), int(row["round"])
            if row.get("val_dice"):
                value = float(row["val_dice"])
                if client not in best or value > best[client][0]:
                    best[client] = (value, rnd)
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
    return "\n".join(lines)
