"""Keep a site's worker running: restart it when it exits, up to a limit, and block while the
other children live (the long-running ``site`` and ``superlink`` commands, and the one-machine
deployment)."""
from __future__ import annotations

import logging
import time
from typing import Dict, Optional

from .processes import ProcessGroup

log = logging.getLogger("fedicra.deploy")


class WorkerSupervisor:
    """Starts a site worker again when it exits, up to ``restarts`` times each.

    The restarted worker loads its data and model, and the next request it gets continues
    from its ``client<k>/latest.pt`` (:meth:`deployment.worker.SiteWorker._align`): the site
    misses the rounds it was down for (the server goes on without it, see
    ``min_fit_clients``) and rejoins. After ``restarts`` restarts the worker stays down and
    the run goes on without the site.

    Parameters
    ----------
    group : ProcessGroup
        The children; the workers were started with :func:`start_worker`.
    workers : mapping
        Child name -> client id.
    restarts : int
        Restarts allowed per worker.
    """

    def __init__(self, group: ProcessGroup, workers: Dict[str, int], restarts: int = 3) -> None:
        self.group = group
        self.workers = dict(workers)
        self.restarts = int(restarts)
        self.count = {name: 0 for name in self.workers}
        self.given_up: set = set()
        #: client id -> why its site was dropped for the rest of the run (the end-of-run
        #: summary lists them, see :func:`configs.metrics_csv.summary_table`)
        self.dropped: Dict[int, str] = {}

    def check(self) -> None:
        for name, cid in self.workers.items():
            child = self.group.children[name]
            if child.alive() or name in self.given_up:
                continue
            tail = child.log_tail()
            if self.count[name] >= self.restarts:
                self.given_up.add(name)
                self.dropped[cid] = (f"its site worker exited {self.count[name] + 1} times "
                                     f"(last exit code {child.proc.returncode}) and was not "
                                     f"restarted after {self.restarts} restart(s); see "
                                     f"{child.log_path}")
                log.error("%s (client %d) exited with code %s after %d restart(s); not "
                          "restarted again: the run goes on without client %d. Last lines of "
                          "%s:\n%s", name, cid, child.proc.returncode, self.count[name], cid,
                          child.log_path, tail)
                continue
            self.count[name] += 1
            log.warning("%s (client %d) exited with code %s; restarting it (%d of %d), it "
                        "rejoins from its latest.pt. Last lines of %s:\n%s", name, cid,
                        child.proc.returncode, self.count[name], self.restarts, child.log_path,
                        tail)
            self.group.restart(name)


def block_until_exit(group: ProcessGroup, supervise: Optional[WorkerSupervisor] = None) -> int:
    """Wait until a child exits (then fail; ``supervise`` restarts workers instead) or a
    signal arrives."""
    while True:
        if supervise is not None:
            supervise.check()
        group.check_alive([n for n in group.children
                           if supervise is None or n not in supervise.workers])
        time.sleep(0.5)
