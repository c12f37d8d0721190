"""Ends every process of a run once its launcher is gone, however it went (SIGKILL included).

:class:`deployment.processes.ProcessGroup` starts one watchdog per launcher, in a session of
its own and without the run token (so Ctrl-C in the launcher's terminal does not reach it and
it never stops itself):

``python -m deployment.watchdog --launcher PID --start-time TICKS --token TOKEN --grace S``

It checks every 0.2 s that the launcher (the pid with that start time, see
:func:`deployment.processes.start_time`) is alive. Once it is not, it sends SIGTERM to every
process carrying the run token (the launcher's children, the SuperLink's ``flwr-serverapp``,
Ray's helpers, whatever they started), SIGKILL to those alive ``--grace`` s later, and exits
when none is left. A launcher that stops its children itself stops its watchdog too; a
watchdog that outlives a clean launcher finds nothing and exits.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from typing import List, Optional

from .processes import RunFinder, _pid_alive, start_time, terminate

log = logging.getLogger("fedicra.deploy")

#: Seconds between two looks at the launcher.
INTERVAL = 0.2
#: Every so many looks, scan /proc for the run's sessions (see RunFinder): when the launcher
#: dies its children die at once too, and the sessions they led must be known by then.
LEARN_EVERY = 10


def launcher_alive(pid: int, started: Optional[int]) -> bool:
    """Whether the launcher still runs (a zombie, or another process with its pid, does not)."""
    return _pid_alive(pid) and (started is None or start_time(pid) == started)


def watch(pid: int, started: Optional[int], token: str, grace: float,
          interval: float = INTERVAL) -> int:
    """Wait for the launcher to end, then end every process of the run; returns how many
    processes it stopped."""
    finder = RunFinder(token)
    looks = 0
    while launcher_alive(pid, started):
        if looks % LEARN_EVERY == 0:
            finder(keep=False)  # learn the run's sessions while their leaders live
        looks += 1
        time.sleep(interval)
    stopped = terminate(finder, grace, grace)
    if stopped:
        log.warning("launcher %d is gone: stopped %d process(es) of its run: %s", pid,
                    len(stopped), ", ".join(f"{n} ({p})" for p, n in sorted(stopped.items())))
    return len(stopped)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--launcher", type=int, required=True, help="pid of the launcher")
    p.add_argument("--start-time", dest="start_time", default="None",
                   help="the launcher's start time (field 22 of /proc/<pid>/stat)")
    p.add_argument("--token", required=True, help="the run token (FEDICRA_RUN_TOKEN)")
    p.add_argument("--grace", type=float, default=3.0,
                   help="seconds between SIGTERM and SIGKILL")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s watchdog %(levelname)s %(message)s")
    started = None if args.start_time == "None" else int(args.start_time)
    watch(args.launcher, started, args.token, args.grace)
    return 0


if __name__ == "__main__":
    sys.exit(main())
