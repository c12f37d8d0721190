"""Every process of a run ends with it, and only those: the run token, the watchdog,
``flower_runner.py stop`` with the identities recorded in ``pids.json``.

"Processes of the run" are found here by something unique to each test (its folder in the
command line or in ``FLWR_HOME``, a marker in the environment), never by name.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

import pytest

from conftest import free_base

REPO = Path(__file__).resolve().parents[1]

#: A process that ignores SIGTERM in a session of its own, as flwr-serverapp (started by the
#: SuperLink's SuperExec) can: only SIGKILL ends it, and its parent's group does not hold it.
STUBBORN = ("import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
            "print('ready', flush=True); time.sleep(300)")
#: A child that starts a STUBBORN process in its own session, prints its pid once it ignores
#: SIGTERM, then waits.
SPAWNER = ("import subprocess, sys, time\n"
           f"p = subprocess.Popen([sys.executable, '-c', {STUBBORN!r}], start_new_session=True,"
           " stdout=subprocess.PIPE)\n"
           "p.stdout.readline()\n"
           "print(p.pid, flush=True)\n"
           "time.sleep(300)\n")


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] not in (b"Z", b"X")
    except OSError:
        return False


def environ(pid: int) -> List[bytes]:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return f.read().split(b"\0")
    except OSError:
        return []


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def processes_with(marker: str) -> Dict[int, str]:
    """Live processes (not this one) with ``marker`` in their command line or environment."""
    needle = marker.encode()
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        pid = int(entry)
        if (marker in cmdline(pid) or any(needle in item for item in environ(pid))) and alive(pid):
            found[pid] = cmdline(pid)[:120]
    return found


def session(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return int(f.read().rsplit(b")", 1)[1].split()[3])
    except (OSError, IndexError, ValueError):
        return -1


def in_sessions(sessions) -> Dict[int, str]:
    """Live processes in the given sessions (Ray's agents rewrite their titles over their
    environment: their session, that of the SuperExec that started them, still tells)."""
    return {int(e): cmdline(int(e))[:120] for e in os.listdir("/proc")
            if e.isdigit() and session(int(e)) in sessions and alive(int(e))}


def wait_until_gone(marker: str, seconds: float, sessions=()) -> Dict[int, str]:
    deadline = time.monotonic() + seconds
    while True:
        left = {**processes_with(marker), **in_sessions(sessions)}
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.2)


def launcher_script(folder: Path, marker: str) -> str:
    """A launcher that starts, through ProcessGroup, a child whose STUBBORN grandchild leaves
    its group, prints that grandchild's pid and waits (``marker`` in the environment)."""
    return ("import os, sys, time; from pathlib import Path; sys.path.insert(0, %r)\n"
            "os.environ['TEST_MARKER'] = %r\n"
            "from deployment.processes import ProcessGroup\n"
            "g = ProcessGroup(Path(%r) / 'logs', Path(%r) / 'pids.json')\n"
            "c = g.start('spawner', [sys.executable, '-c', %r], stdout=-1)\n"
            "print(c.proc.stdout.readline().decode().strip(), flush=True)\n"
            "time.sleep(300)\n") % (str(REPO), marker, str(folder), str(folder), SPAWNER)


def start_launcher(tmp_path: Path, marker: str):
    launcher = subprocess.Popen([sys.executable, "-c", launcher_script(tmp_path, marker)],
                                stdout=subprocess.PIPE, text=True)
    try:
        stubborn = int(launcher.stdout.readline())
        assert alive(stubborn)
    except BaseException:
        launcher.kill()
        launcher.wait()
        raise
    return launcher, stubborn


# ---------------------------------------------------------------------- fast
def test_stop_leaves_alone_a_process_that_reused_a_recorded_pid(tmp_path):
    """A stale pids.json (a reboot, pid reuse) names a live process that is not the run's:
    ``stop`` must not signal it, whether the record's start time or its command line differ,
    or the record is a pids.json of format 1 (pids only)."""
    unrelated = subprocess.Popen(["sleep", "60"], start_new_session=True)  # a group leader
    try:
        time.sleep(0.2)
        pid = unrelated.pid
        with open(f"/proc/{pid}/stat", "rb") as f:  # field 22: start time
            started = int(f.read().rsplit(b")", 1)[1].split()[19])
        boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        stale = tmp_path / "stale"
        stale.mkdir()
        (stale / "pids.json").write_text(json.dumps({
            "format": 2, "token": "0" * 32, "boot_id": boot_id,
            "launcher": {"pid": pid, "start_time": started + 1, "cmdline": ["python", "x.py"]},
            "watchdog": None,
            "processes": {
                "superlink": {"pid": pid, "start_time": started - 7,
                              "cmdline": ["sleep", "60"]},          # another start time
                "worker0": {"pid": pid, "start_time": started,
                            "cmdline": [sys.executable, "-m", "deployment.worker"]},  # command
            }}))
        legacy = tmp_path / "legacy"
        legacy.mkdir()
        (legacy / "pids.json").write_text(json.dumps({"superlink": pid, "worker0": pid}))
        for folder in (stale, legacy):
            res = subprocess.run([sys.executable, "flower_runner.py", "stop", str(folder),
                                  "--stop-timeout", "2"], cwd=REPO, capture_output=True,
                                 text=True, timeout=60)
            assert res.returncode == 0, res.stdout + res.stderr
            assert "left alone" in res.stdout and f"pid {pid}" in res.stdout, res.stdout
            time.sleep(0.5)
            assert unrelated.poll() is None, f"stop {folder.name} killed an unrelated process"
    finally:
        unrelated.kill()
        unrelated.wait()


def test_stop_ends_a_live_run_and_what_it_started_outside_its_groups(tmp_path):
    """``stop`` on a run whose launcher still runs ends the launcher, its children and a
    descendant in a session of its own that ignores SIGTERM (as flwr-serverapp can)."""
    marker = f"stoptest{os.getpid()}x{time.monotonic_ns()}"
    launcher, stubborn = start_launcher(tmp_path, marker)
    try:
        assert len(processes_with(marker)) >= 2  # the spawner and its stubborn grandchild
        started = time.monotonic()
        res = subprocess.run([sys.executable, "flower_runner.py", "stop", str(tmp_path),
                              "--stop-timeout", "2"], cwd=REPO, capture_output=True, text=True,
                             timeout=60)
        took = time.monotonic() - started
        assert res.returncode == 0, res.stdout + res.stderr
        left = wait_until_gone(marker, 1.0)
        assert not left, f"still running after stop: {left}"
        assert launcher.wait(timeout=1) is not None and not alive(stubborn)
        assert "launcher" in res.stdout, res.stdout
        assert took < 10, f"stop took {took:.1f} s"
    finally:
        if launcher.poll() is None:
            launcher.kill()
        for pid in processes_with(marker):
            os.kill(pid, signal.SIGKILL)


def test_stop_all_ends_what_a_dead_child_left_behind(tmp_path):
    """A child that died (a lost SuperLink) leaves its descendant (its flwr-serverapp, in a
    session of its own, ignoring SIGTERM) re-parented away from the launcher: the launcher's
    stop still ends it, within the short grace of processes outside its groups."""
    from deployment import processes
    from deployment.processes import ProcessGroup

    grace = getattr(processes, "ORPHAN_GRACE", 3.0)

    group = ProcessGroup(tmp_path / "logs", tmp_path / "pids.json")
    child = group.start("superlink", [sys.executable, "-c", SPAWNER], stdout=subprocess.PIPE)
    stubborn = int(child.proc.stdout.readline())
    try:
        os.kill(child.pid, signal.SIGKILL)
        child.proc.wait(timeout=10)
        assert alive(stubborn)
        started = time.monotonic()
        group.stop_all(timeout=10)
        took = time.monotonic() - started
        deadline = time.monotonic() + 2
        while alive(stubborn) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not alive(stubborn), "a descendant of a dead child outlived the run"
        assert took < grace + 3, f"stopping took {took:.1f} s"
    finally:
        if alive(stubborn):
            os.kill(stubborn, signal.SIGKILL)


def test_a_killed_launcher_leaves_nothing_behind(tmp_path):
    """SIGKILL of the launcher: its children die with it (PR_SET_PDEATHSIG) and the watchdog
    ends what left their groups, SIGTERM-proof or not, within a few seconds."""
    marker = f"killtest{os.getpid()}x{time.monotonic_ns()}"
    launcher, stubborn = start_launcher(tmp_path, marker)
    try:
        launcher.kill()
        launcher.wait(timeout=10)
        left = wait_until_gone(marker, 8.0)
        assert not left, f"still running 8 s after the launcher was killed: {left}"
    finally:
        for pid in processes_with(marker):
            os.kill(pid, signal.SIGKILL)


# ---------------------------------------------------------------------- whole runs
CLIENTS = 2  # the fewest that make a federation: what is tested is the processes


def run_then_kill(cmd: List[str], out: Path, must_see: List[str], timeout: float = 240):
    """Start the runner ``cmd``; once round 1 is in metrics.csv, check that processes whose
    command lines hold each of ``must_see`` belong to the run, SIGKILL the runner and return
    the processes of the run still alive 10 s later (the run's: ``out`` in FLWR_HOME or in the
    command line)."""
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    deadline = time.monotonic() + timeout
    sessions: set = set()  # sessions the run's processes lead
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            sessions |= {pid for pid in processes_with(str(out)) if session(pid) == pid}
            csv_path = out / "metrics.csv"
            if csv_path.is_file() and sum(line.startswith("1,") for line in
                                          csv_path.read_text().splitlines()) >= CLIENTS:
                break
            time.sleep(0.25)
        assert proc.poll() is None, "the run ended before round 1: " + proc.stdout.read()[-3000:]
        ours = processes_with(str(out))
        for name in must_see:
            assert any(name in cmd for cmd in ours.values()), f"no {name} among {ours}"
        sessions |= {pid for pid in ours if session(pid) == pid}
        proc.kill()
        proc.wait(timeout=10)
        return wait_until_gone(str(out), 10.0, sessions), ours
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stdout.close()
        for pid in {**processes_with(str(out)), **in_sessions(sessions)}:
            os.kill(pid, signal.SIGKILL)  # never leave a test's processes behind


def tiny_flags(data: Path, out_root: Path, exp: str, port: int) -> List[str]:
    return ["--strategy", "FedAvg", "--img_class", "synthetic_faz", "--root_path", str(data),
            "--num_clients", str(CLIENTS), "--rounds", "100", "--iters", "2", "--batch_size",
            "2", "--procedure", "pce", "--img_size", "32", "--set", "base_channels=4", "--port", str(port),
            "--out_root", str(out_root), "--exp", exp, "--stop-timeout", "5"]


@pytest.mark.slow
def test_a_killed_deployment_runner_leaves_no_process_of_the_run(tmp_path, tiny_federation):
    out = tmp_path / "model" / "dep"
    cmd = [sys.executable, "flower_runner.py", "--mode", "deployment",
           *tiny_flags(tiny_federation, tmp_path / "model", "dep", free_base(2 * CLIENTS + 2))]
    left, seen = run_then_kill(cmd, out, ["flwr-serverapp", "flower-superlink",
                                          "deployment.worker", "deployment.appexec"])
    assert not left, f"alive 10 s after the runner's SIGKILL: {left} (of {seen})"


@pytest.mark.slow
def test_a_killed_simulation_runner_leaves_no_process_of_the_run(tmp_path, tiny_federation):
    out = tmp_path / "model" / "sim"
    cmd = [sys.executable, "flower_runner.py", "--mode", "simulation",
           *tiny_flags(tiny_federation, tmp_path / "model", "sim", free_base(1))]
    left, seen = run_then_kill(cmd, out, ["flower-superlink", "flwr-simulation", "raylet"])
    assert not left, f"alive 10 s after the runner's SIGKILL: {left} (of {seen})"
