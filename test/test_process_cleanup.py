"""A child's descendants that leave its process group (as Ray's agents do under the
Simulation Engine) are stopped with the run's children."""
from __future__ import annotations

import sys
import time

from deployment.processes import ProcessGroup, _pid_alive, descendants

SPAWN = ("import subprocess, sys, time\n"
         "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'],"
         " start_new_session=True)\n"
         "print(p.pid, flush=True)\n"
         "time.sleep(120)\n")


def test_stop_all_stops_descendants_in_other_sessions(tmp_path):
    group = ProcessGroup(tmp_path / "logs", tmp_path / "pids.json")
    child = group.start("parent", [sys.executable, "-c", SPAWN])
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not descendants(child.pid):
        time.sleep(0.1)
    strays = descendants(child.pid)
    assert len(strays) == 1, "the child did not start its own-session grandchild"
    group.stop_all(timeout=5)
    time.sleep(0.2)
    assert not _pid_alive(child.pid)
    assert not _pid_alive(strays[0]), "a grandchild in its own session outlived the run"
