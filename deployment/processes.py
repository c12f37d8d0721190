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
import sys
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple

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
    #: field 22 of /proc/<pid>/stat (clock ticks after boot): with the pid, the process
    start_time: Optional[int] = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def identity(self) -> Dict[str, object]:
        """What ``pids.json`` records of this child (see :func:`same_process`)."""
        return {"pid": self.pid, "start_time": self.start_time, "cmdline": list(self.argv)}

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
        Rewritten after each start with the run token, the launcher, the watchdog and every
        child, each with what identifies it (:func:`read_pid_file`).
    watchdog : bool
        Start :mod:`deployment.watchdog` with the first child: it ends every process of the
        run when this launcher dies without stopping them (SIGKILL, a crash).
    """

    log_dir: Path
    pid_file: Optional[Path] = None
    children: Dict[str, Child] = field(default_factory=dict)
    watchdog: bool = True
    #: the run token every child (and whatever it starts) carries in its environment
    token: str = field(default_factory=lambda: uuid.uuid4().hex)
    _watchdog: Optional[subprocess.Popen] = None

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
        if self.watchdog and self._watchdog is None:
            self._start_watchdog()
        child_env = dict(os.environ if env is None else env)
        child_env[TOKEN_ENV] = self.token
        launcher = os.getpid()
        _load_prctl()
        with uninterrupted(), open(log_path, "ab") as log_file:  # the child keeps its own fd
            proc = subprocess.Popen(
                list(argv), env=child_env, cwd=cwd,
                stdin=subprocess.DEVNULL, stdout=log_file if stdout is None else stdout,
                stderr=log_file, start_new_session=True,
                preexec_fn=lambda: die_with_parent(launcher))
            child = Child(name, list(argv), proc, log_path,
                          dict(env) if env is not None else None, cwd,
                          start_time=start_time(proc.pid))
            self.children[name] = child
        log.debug("started %s (pid %d): %s", name, proc.pid, " ".join(argv))
        self.write_pids()
        return child

    def restart(self, name: str) -> Child:
        """Start child ``name`` again, as it was started, after it exited (its log goes on)."""
        old = self.children[name]
        if old.alive():
            raise ValueError(f"{name} (pid {old.pid}) is still running")
        for pid in group_members(old.pid):  # whatever it left in its group
            if carries_token(pid, self.token):
                _signal_pid(pid, signal.SIGKILL)
        del self.children[name]
        return self.start(name, old.argv, old.env, old.cwd)

    def _start_watchdog(self) -> None:
        """Start :mod:`deployment.watchdog` for this launcher (its own session, no token, no
        parent-death signal: it must outlive the launcher)."""
        env = {k: v for k, v in os.environ.items() if k != TOKEN_ENV}
        repo = str(Path(__file__).resolve().parents[1])
        env["PYTHONPATH"] = os.pathsep.join(p for p in [repo, env.get("PYTHONPATH", "")] if p)
        argv = [sys.executable, "-m", "deployment.watchdog", "--launcher", str(os.getpid()),
                "--start-time", str(start_time(os.getpid())), "--token", self.token,
                "--grace", str(ORPHAN_GRACE)]
        with open(self.log_dir / "watchdog.log", "ab") as log_file:
            self._watchdog = subprocess.Popen(argv, env=env, cwd=repo, stdin=subprocess.DEVNULL,
                                              stdout=log_file, stderr=log_file,
                                              start_new_session=True)

    def _stop_watchdog(self) -> None:
        if self._watchdog is not None:
            if self._watchdog.poll() is None:
                self._watchdog.terminate()
                try:
                    self._watchdog.wait(5.0)
                except subprocess.TimeoutExpired:
                    self._watchdog.kill()
                    self._watchdog.wait()
            self._watchdog = None

    def write_pids(self) -> None:
        """Write ``pid_file`` (format :data:`PIDS_FORMAT`, read by :func:`read_pid_file`)."""
        if self.pid_file is None:
            return
        self.pid_file.parent.mkdir(parents=True, exist_ok=True)
        me = os.getpid()
        record = {
            "format": PIDS_FORMAT, "token": self.token, "boot_id": boot_id(),
            "launcher": {"pid": me, "start_time": start_time(me), "cmdline": cmdline(me)},
            "watchdog": (None if self._watchdog is None else
                         {"pid": self._watchdog.pid, "start_time": start_time(self._watchdog.pid),
                          "cmdline": list(self._watchdog.args)}),
            "processes": {n: c.identity() for n, c in self.children.items()},
        }
        tmp = self.pid_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(record, indent=1))
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
        """End every process of the run: SIGTERM to each child's process group and to every
        process carrying the run token (``flwr-serverapp``, Ray's helpers, whatever a dead
        child left); SIGKILL after ``timeout`` s to the children and their groups, after
        ``min(timeout, ORPHAN_GRACE)`` s to the others. Then the watchdog is stopped.

        A further Ctrl-C or SIGTERM during this cleanup is ignored, so it always completes
        (within ``timeout`` + 5 s).
        """
        with signals_ignored():
            self._stop_all(timeout)
            self._stop_watchdog()

    def _stop_all(self, timeout: float) -> None:
        names = {c.pid: c.name for c in self.children.values()}
        finder = RunFinder(self.token)
        finder(keep=False)  # learn the run's sessions while their leaders live
        signalled = set()
        for child in reversed(list(self.children.values())):
            if child.alive():  # not reaped: its pid, and so its group id, are still its own
                signalled.update(group_members(child.pid))
                _signal_group(child.pid, signal.SIGTERM)

        def in_groups(pid: int) -> bool:
            return _pgid(pid) in names

        def reap() -> None:
            for child in self.children.values():
                child.proc.poll()

        terminate(finder, timeout, min(timeout, ORPHAN_GRACE),
                  patient=in_groups, names=names, reap=reap, signalled=signalled)
        reap()


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
    except (OSError, IndexError):
        return False


# ---------------------------------------------------------------------- what a process is
def start_time(pid: int) -> Optional[int]:
    """Field 22 of ``/proc/<pid>/stat``: when the process started, in clock ticks after boot
    (unchanged by ``exec``); None when there is no such process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return int(f.read().rsplit(b")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def cmdline(pid: int) -> Optional[List[str]]:
    """The command line of ``pid`` (``/proc/<pid>/cmdline``), None when unreadable."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            raw = f.read()
    except OSError:
        return None
    return [a.decode(errors="replace") for a in raw.split(b"\0")[:-1]] if raw else []


def boot_id() -> str:
    """This boot's id (``/proc/sys/kernel/random/boot_id``; empty where unavailable)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def _environ(pid: int) -> List[bytes]:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return f.read().split(b"\0")
    except OSError:
        return []


def carries_token(pid: int, token: str) -> bool:
    """Whether ``pid`` has ``FEDICRA_RUN_TOKEN=token`` in its environment."""
    return f"{TOKEN_ENV}={token}".encode() in _environ(pid)


def _scan(match: Callable[[List[bytes]], bool]) -> List[int]:
    """Live processes (this one excepted) whose environment satisfies ``match``."""
    if not os.path.isdir("/proc"):
        return []
    me = os.getpid()
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != me and match(_environ(int(entry))):
            found.append(int(entry))
    return [p for p in found if _pid_alive(p)]


def _ticks_now() -> int:
    """Now, in the clock ticks after boot of :func:`start_time` (a little ahead, so a process
    started this instant counts as started before)."""
    try:
        with open("/proc/uptime") as f:
            return int((float(f.read().split()[0]) + 1.0) * os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return 2 ** 62


def _session(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return int(f.read().rsplit(b")", 1)[1].split()[3])
    except (OSError, IndexError, ValueError):
        return -1


class RunFinder:
    """Finds the live processes of the run with ``token``: those that carry it in their
    environment, and every member of a session whose leader carried it when seen (a process
    that rewrites its title, as Ray's do with ``setproctitle``, may overwrite its environment;
    its session, inherited from the SuperExec that started it, still names the run).

    Called with ``keep=True`` (a sweep, seconds long) the sessions seen are remembered from
    call to call, so their members are found after their leader's death; ``keep=False``
    (learning them over a long run) keeps only the sessions whose leaders live now. A member
    found by its session alone must have started before the last ``keep=False`` call (or the
    finder's creation): a process that reused the number of a session that has ended since is
    never taken for the run's.
    """

    def __init__(self, token: str) -> None:
        self.needle = f"{TOKEN_ENV}={token}".encode()
        self.sessions: set = set()
        self.horizon = _ticks_now()

    def __call__(self, keep: bool = True) -> List[int]:
        if not os.path.isdir("/proc"):
            return []
        if not keep:
            self.sessions = set()
            self.horizon = _ticks_now()
        me = os.getpid()
        mine = {_session(me), me, 0, 1}  # never this process's own session
        found, others = [], []
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) == me:
                continue
            pid = int(entry)
            if self.needle in _environ(pid):
                found.append(pid)
                if _session(pid) == pid and pid not in mine:
                    self.sessions.add(pid)
            else:
                others.append(pid)
        if self.sessions:
            found += [p for p in others if _session(p) in self.sessions
                      and (start_time(p) or 0) <= self.horizon]
        return [p for p in found if _pid_alive(p)]


def run_processes(token: str) -> List[int]:
    """Every live process of the run with ``token`` (see :class:`RunFinder`)."""
    return RunFinder(token)()


def flwr_home_processes(homes: Sequence[Path]) -> List[int]:
    """Live processes whose ``FLWR_HOME`` lies in one of ``homes`` (the processes of a run
    whose ``pids.json`` predates the run token)."""
    prefixes = [str(Path(h).resolve()) for h in homes]

    def match(env: List[bytes]) -> bool:
        for item in env:
            if item.startswith(b"FLWR_HOME="):
                home = item[len(b"FLWR_HOME="):].decode(errors="replace")
                return any(home == p or home.startswith(p + os.sep) for p in prefixes)
        return False

    return _scan(match)


def argv_matches(recorded: Sequence[str], live: Sequence[str]) -> bool:
    """Whether ``live`` (``/proc/<pid>/cmdline``) is the command ``recorded`` was started
    with: equal, or run through an interpreter (a ``#!`` script: ``python /venv/bin/NAME
    ARGS`` for ``NAME ARGS``)."""
    recorded, live = list(recorded), list(live)
    if live == recorded:
        return True
    if not recorded or len(live) < len(recorded):
        return False
    tail = recorded[1:]
    if tail and live[len(live) - len(tail):] != tail:
        return False
    head = live[:len(live) - len(tail)]
    return any(os.path.basename(a) == os.path.basename(recorded[0]) for a in head)


def same_process(record: Mapping[str, object], boot: str = "") -> bool:
    """Whether the process ``record`` of a ``pids.json`` describes still runs: its pid is
    alive, this is the boot it was recorded in, and its start time and command line agree."""
    try:
        pid = int(record.get("pid") or 0)
        recorded_start = record.get("start_time")
    except (TypeError, ValueError, AttributeError):
        return False
    if pid <= 0 or recorded_start is None or not _pid_alive(pid):
        return False
    if boot and boot != boot_id():
        return False
    if start_time(pid) != int(recorded_start):
        return False
    return argv_matches(list(record.get("cmdline") or []), cmdline(pid) or [])


def describe_pid(pid: int) -> str:
    """A short name for ``pid``: its program (``flwr-serverapp``, ``deployment.worker``, ...)."""
    argv = cmdline(pid) or []
    for i, arg in enumerate(argv):
        if arg == "-m" and i + 1 < len(argv):
            return argv[i + 1]
        if arg == "-c":
            return "python -c"
        if not (arg.startswith("-") or os.path.basename(arg).startswith("python")):
            return os.path.basename(arg)
    return os.path.basename(argv[0]) if argv else "process"


# ---------------------------------------------------------------------- stopping
def terminate(find: Callable[[], Iterable[int]], timeout: float, grace: float,
              patient: Callable[[int], bool] = lambda pid: True,
              names: Optional[Mapping[int, str]] = None,
              reap: Optional[Callable[[], None]] = None,
              signalled: Iterable[int] = ()) -> Dict[int, str]:
    """End every process ``find()`` returns, and what they start meanwhile.

    ``find`` is called again every :data:`SCAN` s until it returns no live process: each new
    process gets SIGTERM, then SIGKILL ``timeout`` s later when ``patient(pid)`` (the
    launcher's children and their groups), ``grace`` s later otherwise; ``signalled`` got
    their SIGTERM just before (a second one could cut their cleanup short). ``reap`` runs
    before each scan (to collect the launcher's exited children). Gives up, with an error, 5 s
    after the last SIGKILL could have gone out. Returns ``{pid: name}`` of every process
    signalled.
    """
    names = dict(names or {})
    termed: Dict[int, float] = {p: time.monotonic() for p in signalled}
    killed: set = set()
    described: Dict[int, str] = {}
    give_up = time.monotonic() + max(timeout, grace) + 5.0
    empty = 0
    while True:
        if reap is not None:
            reap()
        alive = [p for p in set(find()) if _pid_alive(p)]
        now = time.monotonic()
        empty = 0 if alive else empty + 1
        if empty >= 2:  # nothing twice in a row: nothing was being started either
            break
        for pid in alive:
            if pid not in described:
                described[pid] = names.get(pid) or describe_pid(pid)
            if pid not in termed:
                termed[pid] = now
                give_up = max(give_up, now + max(timeout, grace) + 5.0)
                _signal_pid(pid, signal.SIGTERM)
            elif pid not in killed and now - termed[pid] >= (timeout if patient(pid) else grace):
                log.warning("%s (pid %d) ignored SIGTERM for %.0f s: killing it",
                            described[pid], pid, now - termed[pid])
                _signal_pid(pid, signal.SIGKILL)
                killed.add(pid)
        if now > give_up:
            log.error("still running after SIGKILL: %s", ", ".join(
                f"{described.get(p, describe_pid(p))} (pid {p})" for p in alive))
            break
        time.sleep(SCAN)
    return described


_PRCTL: Dict[str, object] = {}


def _load_prctl() -> None:
    """Load libc's ``prctl`` once in the launcher (a forked child must not import)."""
    if "fn" not in _PRCTL:
        try:
            import ctypes

            _PRCTL["fn"] = ctypes.CDLL(None, use_errno=True).prctl
        except (OSError, AttributeError):
            _PRCTL["fn"] = None


def die_with_parent(parent: Optional[int] = None) -> None:
    """In a forked child before exec: ask Linux to send SIGTERM when the launcher dies, so a
    killed runner (even SIGKILL) leaves no child behind; a child whose launcher ``parent``
    died before that asks itself. A no-op where prctl is missing."""
    prctl = _PRCTL.get("fn")
    if prctl is None:
        return
    prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG = 1
    if parent is not None and os.getppid() != parent:
        os.kill(os.getpid(), signal.SIGTERM)


def read_pid_file(pid_file: Path) -> Dict[str, object]:
    """A run's ``pids.json``: ``format``, ``token``, ``boot_id``, ``launcher``, ``watchdog``
    and ``processes`` (``{name: {"pid", "start_time", "cmdline"}}``). A file of format 1
    (``{name: pid}``, before the run token) gives ``format`` 1, no token and pids only."""
    if not pid_file.is_file():
        raise FileNotFoundError(f"{pid_file} does not exist: no run was started there")
    try:
        data = json.loads(pid_file.read_text())
        if isinstance(data, dict) and "processes" in data:
            procs = {str(k): dict(v) for k, v in data["processes"].items()}
            for record in procs.values():
                int(record["pid"])
            return {"format": int(data.get("format", PIDS_FORMAT)), "token": data.get("token"),
                    "boot_id": str(data.get("boot_id") or ""), "launcher": data.get("launcher"),
                    "watchdog": data.get("watchdog"), "processes": procs}
        return {"format": 1, "token": None, "boot_id": "", "launcher": None, "watchdog": None,
                "processes": {str(k): {"pid": int(v)} for k, v in data.items()}}
    except (ValueError, AttributeError, TypeError, KeyError) as err:
        raise ValueError(f"{pid_file}: not a pids.json written by flower_runner.py ({err})") from None


def recorded_pids(pid_file: Path) -> Dict[str, int]:
    """``{name: pid}`` of the children a ``pids.json`` lists (either format)."""
    return {n: int(r["pid"]) for n, r in read_pid_file(pid_file)["processes"].items()}


def stop_recorded(pid_file: Path, timeout: float = 10.0
                  ) -> Tuple[Dict[int, str], Dict[str, str]]:
    """Stop what the run of ``pid_file`` (its ``pids.json``) left running.

    A launcher that still runs gets SIGTERM first and stops its children itself, as on
    Ctrl-C (it is killed if it has not exited after ``timeout`` + 10 s). Then every process
    of the run (carrying its token; for a ``pids.json`` written before the token, every
    process whose ``FLWR_HOME`` lies in the run's folder) and every recorded child that is
    still the process recorded (:func:`same_process`) gets SIGTERM, and SIGKILL after
    ``timeout`` s (recorded children) or ``min(timeout, ORPHAN_GRACE)`` s (the others). A
    recorded pid that now belongs to another process (the run ended long ago, the machine
    rebooted, the pid was reused) is left alone.

    Returns ``({pid: name} of the processes stopped, {name: why} of the recorded ones left
    alone)``.
    """
    record = read_pid_file(pid_file)
    boot = str(record["boot_id"])
    run_dir = pid_file.parent
    stopped: Dict[int, str] = {}
    left: Dict[str, str] = {}

    def why_not(name: str, ident: Mapping[str, object]) -> Optional[str]:
        pid = int(ident.get("pid") or 0)
        if not _pid_alive(pid):
            return None  # ended: nothing to say
        if boot and boot != boot_id():
            return f"pid {pid} is another process (pids.json was written before a reboot)"
        return (f"pid {pid} is now another process ({' '.join(cmdline(pid) or [])[:80]!r}, "
                "started at another time)")

    finder = RunFinder(str(record["token"])) if record["format"] >= 2 else None
    with signals_ignored():
        if finder is not None:
            finder(keep=False)  # learn the run's sessions while their leaders live
        launcher = record.get("launcher")
        if isinstance(launcher, dict) and same_process(launcher, boot):
            pid = int(launcher["pid"])
            log.info("the run's launcher (pid %d) still runs: stopping it as Ctrl-C would", pid)
            stopped[pid] = "launcher"
            _signal_pid(pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout + 10.0
            while _pid_alive(pid) and time.monotonic() < deadline:
                time.sleep(POLL)
            if _pid_alive(pid):
                log.warning("the launcher (pid %d) did not exit: killing it", pid)
                _signal_pid(pid, signal.SIGKILL)
        recorded: Dict[int, str] = {}
        entries = dict(record["processes"])
        if isinstance(record.get("watchdog"), dict):
            entries["watchdog"] = record["watchdog"]
        if finder is not None:
            for name, ident in entries.items():
                if same_process(ident, boot):
                    recorded[int(ident["pid"])] = name
                elif why_not(name, ident):
                    left[name] = str(why_not(name, ident))

            def find() -> List[int]:
                return finder() + [p for p in recorded if _pid_alive(p)]
        else:
            homes = [run_dir / "flwr_home"]
            if run_dir.name.startswith("site"):
                homes.append(run_dir.parent / "flwr_home")
            ours = set(flwr_home_processes(homes))
            for name, ident in entries.items():
                pid = int(ident["pid"])
                if pid in ours:
                    recorded[pid] = name
                elif _pid_alive(pid):
                    left[name] = (f"pid {pid} ({' '.join(cmdline(pid) or [])[:80]!r}) is not "
                                  f"a process of this run (its FLWR_HOME is not in {run_dir})")

            def find() -> List[int]:
                return flwr_home_processes(homes)
        for name, why in left.items():
            log.warning("left alone: %s, recorded as %s in %s", why, name, pid_file)
        stopped.update(terminate(find, timeout, min(timeout, ORPHAN_GRACE),
                                 patient=lambda p: p in recorded, names=recorded))
    return stopped, left


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def group_members(pgid: int) -> List[int]:
    """Live (non-zombie) processes in process group ``pgid``, read from ``/proc``."""
    return [pid for pid, (_, group) in _proc_table().items() if group == pgid]


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
