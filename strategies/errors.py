"""Why a run stops, said in one line.

:class:`RunStopped` is raised by the server when the run cannot go on (every client diverged,
fewer than ``min_fit_clients`` sites answered, a site can never take part). Flower logs a
ServerApp's exception with its traceback; :func:`quiet_run_stopped` installs a filter on
Flower's logger that turns the records of a :class:`RunStopped` into the one line
``run stopped: <reason>`` (the run still ends as failed, so ``flower_runner.py`` exits 1).

:data:`SITE_REFUSED` is the text a site worker puts in its error when it cannot take part in
this run in any round (its checkpoint is of another run or unreadable): unlike a passing
failure, the server stops the run on it rather than going on without the site every round.
This module imports nothing of the project (the site worker imports it).
"""
from __future__ import annotations

import logging
import sys
from typing import Optional

#: In a site's error reply: the site can take part in no round of this run.
SITE_REFUSED = "cannot take part in this run"


class RunStopped(RuntimeError):
    """The run cannot go on; the message says why and what is on disk."""


def _run_stopped(exc: Optional[BaseException]) -> Optional[RunStopped]:
    """``exc`` or an exception it was raised from, if a :class:`RunStopped`."""
    seen = 0
    while exc is not None and seen < 10:
        if isinstance(exc, RunStopped):
            return exc
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return None


class QuietRunStopped(logging.Filter):
    """Turns a logged :class:`RunStopped` (Flower's ``ServerApp raised an exception`` with
    the traceback, or a traceback text) into one line without the traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = _run_stopped(record.exc_info[1] if record.exc_info else None)
        if exc is None:
            exc = _run_stopped(sys.exc_info()[1])  # logged inside the ``except`` block
            if exc is None:
                return True
            if str(record.msg).lstrip().startswith("Traceback"):
                return False  # a formatted traceback of it (traceback.format_exc())
            if "exception" not in str(record.msg).lower():
                return True
        record.msg, record.args = "run stopped: %s", (str(exc),)
        record.exc_info, record.exc_text = None, None
        return True


def quiet_run_stopped() -> None:
    """Install :class:`QuietRunStopped` on Flower's logger (once per process)."""
    logger = logging.getLogger("flwr")
    if not any(isinstance(f, QuietRunStopped) for f in logger.filters):
        logger.addFilter(QuietRunStopped())
