"""Run-level resume (``flower_runner.py --resume model/<exp>``): where a run stopped.

A run can continue from its last completed round ``r``, the round of ``global/latest.pt``.
That checkpoint holds, besides the aggregate of round ``r``, the strategy's server state
(:meth:`strategies.base.PersonalizedStrategy.state_dict`), the reporter's (best global
validation so far) and ``finished`` (set once the whole run, final evaluation included, is
done). Each site holds its whole trainer state of round ``r`` in ``client<k>/latest.pt``, or,
when the interruption came after it had finished round ``r + 1`` but before the server
recorded that round, in ``client<k>/previous.pt`` (the trainer keeps the checkpoint it
replaces), which :func:`rollback_sites` puts back.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Dict, List, Optional

from networks.checkpoint import copy_atomic, load_checkpoint, run_meta

log = logging.getLogger("fedicra.server")


def global_latest(out_dir: Path) -> Path:
    return Path(out_dir) / "global" / "latest.pt"


def resume_point(cfg) -> Dict[str, Any]:
    """``global/latest.pt`` of run ``cfg``, checked to be resumable.

    Raises ValueError (message starting ``--resume:``) when the run has no completed round,
    has finished, or was written without the strategy state a resumed run needs.
    """
    out_dir = Path(cfg.out_dir)
    path = global_latest(out_dir)
    if not path.is_file():
        raise ValueError(f"--resume: {out_dir} holds no completed round (no {path.relative_to(out_dir)}), "
                         "so there is nothing to resume; start the run again (--overwrite)")
    state = load_checkpoint(path, expect=run_meta(cfg, None))
    done = int(state.get("round", 0))
    if state.get("finished"):
        raise ValueError(f"--resume: the run in {out_dir} has finished (all {cfg.rounds} rounds "
                         "and its final evaluation); there is nothing to resume")
    if "strategy" not in state:
        raise ValueError(f"--resume: {path} was written by an earlier version of the project "
                         "without the strategy's state, so the run cannot be resumed")
    if not 1 <= done <= cfg.rounds:
        raise ValueError(f"--resume: {path} is at round {done}, outside the run's 1..{cfg.rounds}")
    return state


def site_round(path: Path) -> Optional[int]:
    """``rounds_done`` of a site checkpoint, None when it is missing or unreadable."""
    if not path.is_file():
        return None
    try:
        return int(load_checkpoint(path)["rounds_done"])
    except (ValueError, KeyError, TypeError):
        return None


def rollback_sites(cfg, done: int, cids: Optional[List[int]] = None) -> List[int]:
    """Make every site's ``latest.pt`` its state as of the end of round ``done``; returns the
    client ids rolled back (those that had finished round ``done + 1`` before the
    interruption: their ``previous.pt`` is put back).

    A site behind round ``done`` (it missed rounds, see ``min_fit_clients``) or without any
    checkpoint is left as it is: its worker rejoins from there, as it would have. Raises
    ValueError naming the client when ``latest.pt`` is ahead and ``previous.pt`` is too.
    """
    rolled = []
    for cid in range(cfg.num_clients) if cids is None else cids:
        folder = Path(cfg.out_dir) / f"client{cid}"
        latest, previous = folder / "latest.pt", folder / "previous.pt"
        have = site_round(latest)
        if have is None or have <= done:
            if have is None or have < done:
                log.warning("client %d: %s; it rejoins at round %d", cid,
                            f"no checkpoint in {folder}" if have is None
                            else f"its checkpoint is of round {have}", done + 1)
            continue
        before = site_round(previous)
        if before is not None and before <= done:
            copy_atomic(previous, latest)
            rolled.append(cid)
            log.info("client %d: back to its checkpoint of round %d (it had finished round %d "
                     "before the interruption)", cid, before, have)
            continue
        raise ValueError(f"--resume: client {cid} has no checkpoint of round {done} (the "
                         f"server's last completed round) or earlier: {latest} is of round "
                         f"{have}, {previous} of round {before}")
    return rolled
