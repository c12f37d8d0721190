"""What the server writes about a run: metrics.csv, timing.csv, TensorBoard, global checkpoints,
progress."""
from __future__ import annotations

import csv
import logging
import math
import time
from pathlib import Path
from typing import Callable, Dict, Mapping, Optional, Sequence

import numpy as np

from configs.metrics_csv import CSV_COLUMNS, append_rows, keep_rows_up_to, start_file
from networks.checkpoint import as_tensors, load_checkpoint, save_atomic

log = logging.getLogger("fedicra.server")


def _fmt_seconds(seconds: float) -> str:
    seconds = int(round(seconds))
    minutes, sec = divmod(seconds, 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{sec:02d}s" if hours else f"{minutes}m{sec:02d}s"


#: one row per completed round: the server's wall seconds from the end of the previous round (or
#: the start of the sitting) to the end of this one. A resumed run keeps the rows of its
#: completed rounds, so the file adds up the training time of every sitting.
TIMING_FILE = "timing.csv"
TIMING_COLUMNS = ("round", "seconds")


def recorded_seconds(out_dir: Path, up_to_round: Optional[int] = None) -> Optional[float]:
    """Wall seconds of the completed rounds ``1 .. up_to_round`` (None: every round) of the run
    in ``out_dir``, over all its sittings; None when it has no timing file (a run made before
    the file existed). The part of a round cut off by an interruption is not counted."""
    path = Path(out_dir) / TIMING_FILE
    if not path.is_file():
        return None
    with open(path, newline="") as f:
        return float(sum(float(r["seconds"]) for r in csv.DictReader(f)
                         if up_to_round is None or int(r["round"]) <= up_to_round))


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
        self.timing_path = self.out_dir / TIMING_FILE
        self._round_began = self.start
        self.out_dir.mkdir(parents=True, exist_ok=True)
        keep_rows_up_to(self.timing_path, self.resume_round, TIMING_COLUMNS)  # 0: a new file
        if self.resume_round:
            dropped = keep_rows_up_to(self.csv_path, self.resume_round)
            if dropped:
                log.info("metrics.csv: dropped %d row(s) of the interrupted round %d",
                         dropped, self.resume_round + 1)
        else:
            start_file(self.csv_path)
        self._writer = None

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
        self._write_timing(server_round)
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
        append_rows(self.csv_path, sorted(rows, key=lambda r: r["client"]))

    def _write_timing(self, server_round: int) -> None:
        now = time.perf_counter()
        with open(self.timing_path, "a", newline="") as f:
            csv.writer(f).writerow([server_round, f"{now - self._round_began:.3f}"])
        self._round_began = now

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
