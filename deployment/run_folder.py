"""A run owns its folder: the marker that makes a folder a run's, and the lock a live run holds.

**Marker.** ``<out_root>/<exp>/.fedicra-run`` (JSON: the run's random id, experiment, host,
start time, launcher pid and command) is written when a run starts in a folder, before
anything else of the run. Only a folder that holds it is a run folder: ``--overwrite`` clears
such a folder and nothing else, and there it removes only the entries runs write
(:data:`RUN_ENTRIES`); every other file stays. A folder with entries of those names but no
marker (the user's own ``logs/``, ``test/``, ``config.toml``, or a run of a version before the
marker) is refused, with or without ``--overwrite``.

**Lock.** ``<out_root>/<exp>/.fedicra-lock`` is locked with ``fcntl.flock`` (exclusive) by
the process that runs the folder (the one-machine launcher, ``--resume``, ``launch``) for as
long as it lives; the kernel releases it when that process ends, however it ends (SIGKILL
included), so a stale lock cannot remain. The file holds the holder's pid, role, host, start
time and command; a second launch, ``--resume`` or ``--overwrite`` of a locked folder is
refused naming that pid. A multi-machine site (``flower_runner.py site --cid K``) locks
``<out_dir>/site<K>/.fedicra-lock`` instead: a ``launch`` of the prepared snapshot runs beside
live sites, but ``--overwrite`` and the one-machine forms are refused while any site is alive.
The lock's descriptor is not inherited by children (Python opens files non-inheritable and
``subprocess`` closes the rest), so the lock ends with the process that took it.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import socket
import sys
import time
import uuid
from pathlib import Path, PurePath
from typing import Dict, List, Optional

#: The marker file of a run folder.
MARKER = ".fedicra-run"
#: The lock file a live run holds (in the run folder; a site's in ``site<k>/``).
LOCK = ".fedicra-lock"
#: Everything a run writes into its folder: exact names, and ``client<k>`` / ``site<k>``
#: folders (k a number). ``--overwrite`` removes these and only these (and the marker).
RUN_ENTRIES = ("config.toml", "metrics.csv", "timing.csv", "pids.json", "pids.tmp", "tb", "test",
               "global", "logs", "secrets", "flwr_home", "client<k>", "site<k>")


class FolderRefused(ValueError):
    """The run folder cannot be used (a live run holds it, or it is not a run's)."""


# ---------------------------------------------------------------------- the experiment path
def check_exp_inside(exp: str) -> None:
    """``exp`` names a folder strictly inside ``out_root``: relative, without ``..``, not empty.

    Raises ValueError otherwise (``--exp ..`` would make ``out_root``'s parent the run folder,
    an absolute ``--exp`` a folder anywhere).
    """
    path = PurePath(exp)
    if path.is_absolute() or exp.startswith("~"):
        raise ValueError(f"{exp!r} is an absolute path; --exp names a folder inside --out_root "
                         "(e.g. faz/FedICRA); put the folder's parent in --out_root instead")
    if ".." in path.parts:
        raise ValueError(f"{exp!r} climbs out of --out_root with '..'; --exp names a folder "
                         "inside --out_root (e.g. faz/FedICRA)")
    if not path.parts or path.parts == (".",):
        raise ValueError(f"{exp!r} names --out_root itself; a run needs its own folder inside "
                         "it (e.g. --exp faz/FedICRA)")


# ---------------------------------------------------------------------- run entries, marker
def _numbered(name: str, prefix: str) -> bool:
    return name.startswith(prefix) and name[len(prefix):].isdigit()


def run_files(out_dir: Path) -> List[Path]:
    """The entries of ``out_dir`` whose names a run writes (:data:`RUN_ENTRIES`)."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return []
    exact = [e for e in RUN_ENTRIES if "<k>" not in e]
    found = [out_dir / name for name in exact if os.path.lexists(out_dir / name)]
    found += sorted(p for p in out_dir.iterdir() if p.is_dir() and not p.is_symlink()
                    and (_numbered(p.name, "client") or _numbered(p.name, "site")))
    return found


def read_marker(out_dir: Path) -> Optional[Dict[str, object]]:
    """The marker of ``out_dir`` (``{}`` when present but unreadable), None when absent."""
    path = Path(out_dir) / MARKER
    if not path.is_file():
        return None
    try:
        value = json.loads(path.read_text())
        return value if isinstance(value, dict) else {}
    except (OSError, ValueError):
        return {}


def write_marker(out_dir: Path, exp: str) -> Dict[str, object]:
    """Write ``out_dir``'s marker (0600, atomically): the run's identity."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    identity = {"run": uuid.uuid4().hex, "exp": str(exp), "host": socket.gethostname(),
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "pid": os.getpid(),
                "command": [Path(sys.argv[0]).name, *sys.argv[1:]]}
    tmp = out_dir / f"{MARKER}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(identity, f, indent=1)
    os.replace(tmp, out_dir / MARKER)
    return identity


def remove_run_files(out_dir: Path) -> List[str]:
    """Delete the entries of an earlier run (:func:`run_files`) and its marker; nothing else."""
    removed = []
    for path in run_files(out_dir) + [Path(out_dir) / MARKER]:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif os.path.lexists(path):
            os.remove(path)
        else:
            continue
        removed.append(path.name)
    return removed


# ---------------------------------------------------------------------- the lock
def describe_holder(holder: Dict[str, object]) -> str:
    what = {"run": "a run", "launch": "a launch (flower_runner.py launch)",
            "site": "a site (flower_runner.py site)"}.get(str(holder.get("role")), "a run")
    command = " ".join(str(a) for a in holder.get("command", []) or [])
    return (f"{what} with pid {holder.get('pid', '?')} on {holder.get('host', '?')}, started "
            f"{holder.get('started', '?')}{f' ({command})' if command else ''}")


def _read_holder(fd: int) -> Dict[str, object]:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        text = os.read(fd, 65536).decode(errors="replace")
        value = json.loads(text) if text.strip() else {}
        return value if isinstance(value, dict) else {}
    except (OSError, ValueError):
        return {}


def lock_holder(folder: Path) -> Optional[Dict[str, object]]:
    """Who holds ``folder/.fedicra-lock`` now (its recorded pid, role, ...), or None if nobody.

    Writes nothing (a missing lock file means no live holder)."""
    path = Path(folder) / LOCK
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            return _read_holder(fd) or {"pid": "?"}
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def live_holders(out_dir: Path, sites: bool = True, run: bool = True) -> List[Dict[str, object]]:
    """Live holders of ``out_dir``'s run lock (with ``run``) and of its sites' locks (with
    ``sites``)."""
    out_dir = Path(out_dir)
    folders = [out_dir] if run else []
    if sites and out_dir.is_dir():
        folders += sorted(p for p in out_dir.iterdir() if _numbered(p.name, "site"))
    return [h for h in (lock_holder(f) for f in folders) if h is not None]


class RunLock:
    """An exclusive ``flock`` on ``folder/.fedicra-lock``, held until :meth:`release` or the
    end of this process. Every lock taken is kept in :data:`HELD` (so it lives as long as the
    run) until :func:`release_all`."""

    def __init__(self, folder: Path, fd: int) -> None:
        self.folder = Path(folder)
        self.fd: Optional[int] = fd

    @classmethod
    def acquire(cls, folder: Path, role: str, attempts: int = 5) -> "RunLock":
        """Lock ``folder`` (created if needed) for ``role`` (``run``, ``launch``, ``site``);
        raises :class:`FolderRefused` naming the live holder's pid."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(folder / LOCK, os.O_RDWR | os.O_CREAT, 0o600)
        for attempt in range(attempts):  # a probe (lock_holder) holds it for a moment
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as err:
                if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    os.close(fd)
                    raise
                if attempt == attempts - 1:
                    holder = _read_holder(fd)
                    os.close(fd)
                    raise FolderRefused(in_use_message(folder, holder or {"pid": "?"}))
                time.sleep(0.05)
        record = {"pid": os.getpid(), "role": role, "host": socket.gethostname(),
                  "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                  "command": [Path(sys.argv[0]).name, *sys.argv[1:]]}
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, json.dumps(record).encode())
        lock = cls(folder, fd)
        HELD.append(lock)
        return lock

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None
        if self in HELD:
            HELD.remove(self)


#: The locks this process holds.
HELD: List[RunLock] = []


def release_all() -> None:
    """Release every lock this process took (the end of ``flower_runner.main``)."""
    for lock in list(HELD):
        lock.release()


def in_use_message(folder: Path, holder: Dict[str, object]) -> str:
    return (f"{folder} is in use by {describe_holder(holder)}, which is still running; wait "
            f"for it to end or stop it (Ctrl-C in its terminal, or kill {holder.get('pid', '?')}"
            "), or choose another --exp")


def refuse_live(out_dir: Path, sites: bool = True, run: bool = True) -> None:
    """Raise :class:`FolderRefused` naming the pid of a live holder of ``out_dir``'s run lock
    (with ``run``) or of a site lock in it (with ``sites``). Writes nothing."""
    holders = live_holders(out_dir, sites, run)
    if holders:
        raise FolderRefused(in_use_message(out_dir, holders[0]))


# ---------------------------------------------------------------------- claiming a folder
def claim(out_dir: Path, exp: str, overwrite: bool, role: str = "run",
          prepared: bool = False) -> RunLock:
    """Make ``out_dir`` this process's run folder; returns the lock (held, in :data:`HELD`).

    Refused (:class:`FolderRefused`, nothing written) when a live run or site holds the
    folder, when it holds entries a run writes but no marker (not a run's folder, even with
    ``overwrite``), and when it holds a run and ``overwrite`` is false. With ``overwrite`` the
    earlier run's entries (:data:`RUN_ENTRIES`) and marker are removed, nothing else; then a
    new marker is written. ``prepared`` (``launch`` of the snapshot a ``launch --dry-run``
    wrote into this folder): the run's files stay and live sites are expected.
    """
    out_dir = Path(out_dir)
    refuse_live(out_dir, sites=not prepared)
    old = run_files(out_dir)
    marker = read_marker(out_dir)
    if old and marker is None:
        raise FolderRefused(
            f"{out_dir} holds {', '.join(p.name for p in old[:4])}{', ...' if len(old) > 4 else ''}"
            f" but no {MARKER} marker, so no run of this project made it (or a version before "
            "the marker did): it is left alone, --overwrite included. Choose another --exp or "
            "--out_root, or move those entries away yourself")
    if old and not overwrite and not prepared:
        raise FolderRefused(
            f"{out_dir} already holds a run ({', '.join(p.name for p in old[:4])}"
            f"{', ...' if len(old) > 4 else ''}); choose another --exp, or pass --overwrite to "
            f"delete that run first (only what a run writes: {', '.join(RUN_ENTRIES)})")
    lock = RunLock.acquire(out_dir, role)
    try:
        if not prepared:
            refuse_live(out_dir, run=False)  # a site that started since the check above
            remove_run_files(out_dir)
        if not prepared or marker is None:
            write_marker(out_dir, exp)
    except BaseException:
        lock.release()
        raise
    return lock


def claim_existing(out_dir: Path, exp: str) -> RunLock:
    """Lock the folder of a run to continue (``--resume``): refused while a run or site holds
    it; writes the marker if a run of an earlier version lacks one."""
    out_dir = Path(out_dir)
    refuse_live(out_dir)
    lock = RunLock.acquire(out_dir, "run")
    return _mark_holding(lock, out_dir, exp, lambda: refuse_live(out_dir, run=False))


def claim_site(out_dir: Path, exp: str, cid: int) -> RunLock:
    """Lock site ``cid``'s part of ``out_dir`` (``flower_runner.py site``).

    Refused when the folder is run by a one-machine run (whose worker secrets a site would
    replace), when site ``cid`` is already live there, and when the folder holds run entries
    but no marker. A fresh folder gets the marker.
    """
    out_dir = Path(out_dir)
    holder = lock_holder(out_dir)
    if holder is not None and holder.get("role") != "launch":
        raise FolderRefused(in_use_message(out_dir, holder))
    site_holder = lock_holder(out_dir / f"site{cid}")
    if site_holder is not None:
        raise FolderRefused(in_use_message(out_dir / f"site{cid}", site_holder))
    old = run_files(out_dir)
    if old and read_marker(out_dir) is None:
        raise FolderRefused(
            f"{out_dir} holds {', '.join(p.name for p in old[:4])} but no {MARKER} marker, so "
            "no run of this project made it; give this site another --out_root")
    lock = RunLock.acquire(out_dir / f"site{cid}", "site")
    return _mark_holding(lock, out_dir, exp)


def _mark_holding(lock: "RunLock", out_dir: Path, exp: str, check=lambda: None) -> "RunLock":
    """Under ``lock``: ``check()``, then the marker where the folder lacks one; the lock is
    released when either fails, else returned."""
    try:
        check()
        if read_marker(out_dir) is None:
            write_marker(out_dir, exp)
    except BaseException:
        lock.release()
        raise
    return lock
