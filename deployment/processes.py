"""Child processes of a deployment: start in their own process group, wait until ready, stop.

Every child starts with ``start_new_session=True``, so it leads a process group that also
holds whatever it spawns (the SuperNode's ClientApp processes, the site worker's threads).
Some descendants leave that group: the SuperLink starts its SuperExec, and so the
``flwr-serverapp`` of the run, in a session of its own, and Ray's helpers under the
Simulation Engine do the same. What ties every process of a run together is its **run
token**: a random ``FEDICRA_RUN_TOKEN`` in the environment of every child, which everything
they start inherits. Stopping a run ends every process that carries the token (read from
``/proc/<pid>/environ``), never a process by its pid alone:

- the launcher's own stop (:meth:`ProcessGroup.stop_all`): SIGTERM to every child's group
  and to every process of the run; SIGKILL after ``timeout`` to the children and their
  groups, after :data:`ORPHAN_GRACE` s to the others (``flwr-serverapp``, Ray);
- a launcher that dies, even by SIGKILL: every child has ``PR_SET_PDEATHSIG`` (SIGTERM), and
  a watchdog (:mod:`deployment.watchdog`, in its own session) that polls the launcher ends
  every process of the run within :data:`ORPHAN_GRACE` s;
- ``flower_runner.py stop RUN_DIR`` (:func:`stop_recorded`): ``pids.json`` records the
  token and, for the launcher and every child, what identifies the process beyond its pid
  (its start time, field 22 of ``/proc/<pid>/stat``, the boot id and its command line); a
  recorded pid that now belongs to another process is left alone.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import signal
import socket
import subprocess
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Mapping, Optional, Sequence

log = logging.getLogger("fedicra.deploy")

POLL = 0.05  # seconds between readiness checks
#: Environment variable holding the run token of every process of a run (see the docstring).
TOKEN_ENV = "FEDICRA_RUN_TOKEN"
#: Seconds a process of the run outside the launcher's children and their groups (the
#: ``flwr-serverapp``, Ray's helpers), or any process once the launcher is dead, gets after
#: SIGTERM before SIGKILL.
ORPHAN_GRACE = 3.0
#: Seconds between two scans of ``/proc`` for the processes of a run while stopping it.
SCAN = 0.1
#: ``format`` of the pids.json this version writes (version 1: ``{name: pid}``).
PIDS_FORMAT = 2


class DeploymentError(RuntimeError):
    """A deployment cannot start (the message says why and which flag to change)."""


class PortBusyError(DeploymentError):
    """A port the deployment needs is taken."""


class ChildFailed(RuntimeError):
    """A child process exited while it should have been starting or serving."""


class Interrupted(Exception):
    """SIGINT or SIGTERM arrived; ``signum`` says which."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


# ---------------------------------------------------------------------- ports
def check_ports_free(ports: Mapping[str, int], host: str = "127.0.0.1") -> None:
    """Raise :class:`PortBusyError` naming the first port in ``ports`` that cannot be bound.

    ``ports`` maps a description (e.g. ``"superlink --port"``) to the port number.
    """
    seen: Dict[int, str] = {}
    for what, port in ports.items():
        if port in seen:
            raise PortBusyError(f"port {port} is planned twice ({seen[port]} and {what})")
        seen[port] = what
        if not 0 < port < 65536:
            raise PortBusyError(f"port {port} for {what} is out of range; choose another --port")
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            # as the servers themselves do: connections in TIME_WAIT do not block the port
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((host, port))
            except OSError as err:
                if err.errno in (errno.EADDRINUSE, errno.EACCES):
                    raise PortBusyError(
                        f"port {port} on {host} ({what}) is already in use; stop whatever "
                        "holds it or choose another base port with --port") from None
                raise


def free_port(host: str = "127.0.0.1") -> int:
    """A port the OS reports free right now (for tests and ad-hoc runs)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def free_port_base(span: int, host: str = "127.0.0.1") -> int:
    """A base port with ``span`` free ports above it, drawn below the ephemeral range (for a
    deployment that needs a block of ports: tests, benchmarks)."""
    import random
    import time

    rng = random.Random(os.getpid() ^ time.monotonic_ns())
    for _ in range(200):
        base = rng.randrange(20000, 32000)
        try:
            check_ports_free({f"p{i}": base + i for i in range(span)}, host)
            return base
        except PortBusyError:
            continue
    raise RuntimeError(f"no block of {span} free ports found on {host}")


def port_open(host: str, port: int, timeout: float = 0.2) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


# ---------------------------------------------------------------------- children
@dataclass
class Child:
    name: str
    argv: List[str]
    proc: subprocess.Popen
    log_path: Path
    env: Optional[Dict[str, str]] = None
    cwd: Optional[Path] = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(text[-lines:])


@dataclass
class ProcessGroup:
    """The children of one launcher; see the module docstring.

    Parameters
    ----------
    log_dir : Path
        Every child's stdout and stderr go to ``log_dir/<name>.log``.
    pid_file : Path, optional
        Rewritten with ``{name: pid}`` of every child after each start.
    """

    log_dir: Path
    pid_file: Optional[Path] = None
    children: Dict[str, Child] = field(default_factory=dict)

    def start(self, name: str, argv: Sequence[str], env: Optional[Mapping[str, str]] = None,
              cwd: Optional[Path] = None, stdout: Optional[int] = None) -> Child:
        """Start ``argv`` as child ``name`` in a new session (its own process group).

        ``stdout=subprocess.PIPE`` keeps stdout readable by the caller (stderr still goes to
        the log file); by default both go to the log file.
        """
        if name in self.children:
            raise ValueError(f"a child named {name!r} was already started")
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.log_dir / f"{name}.log"
        with uninterrupted(), open(log_path, "ab") as log_file:  # the child keeps its own fd
            proc = subprocess.Popen(
                list(argv), env=dict(env) if env is not None else None, cwd=cwd,
                stdin=subprocess.DEVNULL, stdout=log_file if stdout is None else stdout,
                stderr=log_file, start_new_session=True, preexec_fn=die_with_parent)
            child = Child(name, list(argv), proc, log_path,
                          dict(env) if env is not None else None, cwd)
            self.children[name] = child
        log.debug("started %s (pid %d): %s", name, proc.pid, " ".join(argv))
        self.write_pids()
        return child

    def restart(self, name: str) -> Child:
        """Start child ``name`` again, as it was started, after it exited (its log goes on)."""
        old = self.children[name]
        if old.alive():
            raise ValueError(f"{name} (pid {old.pid}) is still running")
        _signal_group(old.pid, signal.SIGKILL)  # whatever it left in its group
        del self.children[name]
        return self.start(name, old.argv, old.env, old.cwd)

    def write_pids(self) -> None:
        if self.pid_file is None:
            return
        self.pid_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.pid_file.with_suffix(".tmp")
        tmp.write_text(json.dumps({n: c.pid for n, c in self.children.items()}, indent=1))
        os.replace(tmp, self.pid_file)

    def check_alive(self, names: Optional[Sequence[str]] = None) -> None:
        """Raise :class:`ChildFailed` (with its log tail) if a named child (default: any) exited."""
        for name in list(self.children) if names is None else names:
            child = self.children[name]
            if not child.alive():
                raise ChildFailed(f"{name} exited with code {child.proc.returncode}; last lines "
                                  f"of {child.log_path}:\n{child.log_tail()}")

    def wait_until(self, ready: Callable[[], bool], what: str, timeout: float,
                   watch: Sequence[str] = ()) -> None:
        """Poll ``ready()`` until it holds; fail after ``timeout`` s or when a watched child dies."""
        deadline = time.monotonic() + timeout
        while not ready():
            self.check_alive(watch)
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what} not ready within {timeout:.0f} s")
            time.sleep(POLL)

    def wait_port(self, name: str, host: str, port: int, timeout: float) -> None:
        """Wait until child ``name`` accepts TCP connections on ``host:port``."""
        self.wait_until(lambda: port_open(host, port), f"{name} on {host}:{port}", timeout,
                        watch=[name])

    def stop_all(self, timeout: float = 10.0) -> None:
        """SIGTERM every child's process group, then SIGKILL what outlives ``timeout``.

        A further Ctrl-C or SIGTERM during this cleanup is ignored, so it always completes
        (within ``timeout`` + 5 s).
        """
        with signals_ignored():
            self._stop_all(timeout)

    def _stop_all(self, timeout: float) -> None:
        # Descendants that left their child's process group (Ray's agents under the Simulation
        # Engine start their own sessions) are found now, before their parents exit and they
        # are re-parented out of reach, and stopped after the groups.
        strays = {pid for child in self.children.values() for pid in descendants(child.pid)
                  if _pgid(pid) != child.pid}
        for child in reversed(list(self.children.values())):
            _signal_group(child.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for child in self.children.values():
            _wait_group(child, deadline)
        for child in self.children.values():
            if _group_alive(child.pid):
                log.warning("%s (pid %d) ignored SIGTERM for %.0f s: killing it", child.name,
                            child.pid, timeout)
                _signal_group(child.pid, signal.SIGKILL)
        for child in self.children.values():
            _wait_group(child, time.monotonic() + 5.0)
        stop_pids(strays, timeout=min(timeout, 5.0))


def _proc_table() -> Dict[int, tuple]:
    """``{pid: (parent pid, process group)}`` of every live (non-zombie) process, read from
    ``/proc`` (empty without it)."""
    table: Dict[int, tuple] = {}
    if not os.path.isdir("/proc"):
        return table
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue  # it went away while we looked
        if fields[0] not in (b"Z", b"X"):
            table[int(entry)] = (int(fields[1]), int(fields[2]))
    return table


def descendants(pid: int) -> List[int]:
    """Every live descendant of ``pid`` (children, grandchildren, ...), whatever its group."""
    children: Dict[int, List[int]] = {}
    for child, (parent, _) in _proc_table().items():
        children.setdefault(parent, []).append(child)
    found, todo = [], list(children.get(pid, []))
    while todo:
        p = todo.pop()
        found.append(p)
        todo.extend(children.get(p, []))
    return found


def _pgid(pid: int) -> int:
    try:
        return os.getpgid(pid)
    except (ProcessLookupError, PermissionError):
        return -1


def stop_pids(pids, timeout: float = 5.0) -> None:
    """SIGTERM the live processes among ``pids``, SIGKILL those alive after ``timeout``."""
    alive = [p for p in pids if _pid_alive(p)]
    for p in alive:
        _signal_pid(p, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(_pid_alive(p) for p in alive):
        time.sleep(POLL)
    for p in alive:
        if _pid_alive(p):
            log.warning("process %d (started by a child of the run) ignored SIGTERM: killing it", p)
            _signal_pid(p, signal.SIGKILL)


def _signal_pid(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
        return state not in (b"Z", b"X")
    except OSError:
        return False


def die_with_parent() -> None:
    """In a forked child before exec: ask Linux to send SIGTERM when the launcher dies, so a
    killed runner (even SIGKILL) leaves no child behind. A no-op where prctl is missing."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):
        pass


def stop_recorded(pid_file: Path, timeout: float = 10.0) -> Dict[str, int]:
    """Stop every process group listed in a run's ``pids.json`` (SIGTERM, then SIGKILL after
    ``timeout``); returns the ``{name: pid}`` that were still running."""
    if not pid_file.is_file():
        raise FileNotFoundError(f"{pid_file} does not exist: no run was started there")
    try:
        pids = {str(k): int(v) for k, v in json.loads(pid_file.read_text()).items()}
    except (ValueError, AttributeError) as err:
        raise ValueError(f"{pid_file}: not a pids.json written by flower_runner.py ({err})") from None
    running = {name: pid for name, pid in pids.items() if _group_alive(pid)}
    with signals_ignored():
        for pid in running.values():
            _signal_group(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and any(_group_alive(p) for p in running.values()):
            time.sleep(POLL)
        for name, pid in running.items():
            if _group_alive(pid):
                log.warning("%s (process group %d) ignored SIGTERM: killing it", name, pid)
                _signal_group(pid, signal.SIGKILL)
    return running


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def group_members(pgid: int) -> List[int]:
    """Live (non-zombie) processes in process group ``pgid``, read from ``/proc``."""
    return [pid for pid, (_, group) in _proc_table().items() if group == pgid]


def _group_alive(pgid: int) -> bool:
    if os.path.isdir("/proc"):
        return bool(group_members(pgid))
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _wait_group(child: Child, deadline: float) -> None:
    """Reap the leader and wait (until ``deadline``) for the rest of its group to go."""
    while time.monotonic() < deadline:
        child.proc.poll()
        if not _group_alive(child.pid):
            return
        time.sleep(POLL)
    child.proc.poll()


# ---------------------------------------------------------------------- signals
@contextmanager
def signals_ignored() -> Iterator[None]:
    """Ignore SIGINT and SIGTERM while active (no-op outside the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


_deferred = {"depth": 0, "pending": None}


@contextmanager
def interrupts_raise() -> Iterator[None]:
    """Turn SIGINT and SIGTERM into :class:`Interrupted` in the main thread while active.

    Inside :func:`uninterrupted` blocks the exception is raised when the block ends, so a
    signal never falls between starting a child and recording it.
    """

    def handler(signum: int, frame) -> None:
        if _deferred["depth"]:
            _deferred["pending"] = signum
        else:
            raise Interrupted(signum)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


@contextmanager
def uninterrupted() -> Iterator[None]:
    """Hold back :class:`Interrupted` until the block has run."""
    _deferred["depth"] += 1
    try:
        yield
    finally:
        _deferred["depth"] -= 1
        pending, _deferred["pending"] = _deferred["pending"], None
        if pending is not None and not _deferred["depth"]:
            raise Interrupted(pending)
