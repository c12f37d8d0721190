"""Start the parts of a deployment and submit the run.

Three building blocks, usable on one machine together (:func:`run_deployment`) or on many
machines apart (:mod:`deployment.multi_machine`, the ``superlink``, ``site`` and ``launch``
subcommands of ``flower_runner.py``):

- :func:`start_superlink`: the coordinator, ``flower-superlink`` (Fleet, Control and
  ServerAppIo APIs on one HTTP port in Flower 1.42);
- :func:`start_site`: one hospital, a persistent site worker (``python -m deployment.worker``)
  and a SuperNode whose ClientApp (:mod:`deployment.bridge`) forwards to that worker;
- :func:`submit_run`: ``flwr run <repo> <connection> --stream`` with the run's snapshot.

Ports come from one base port (``--port``, see :class:`PortPlan`); every child runs in its own
process group, logs to ``<out_dir>/logs/<name>.log``, and is listed in ``<out_dir>/pids.json``.
``FLWR_HOME`` points into ``<out_dir>/flwr_home`` so the user's Flower configuration is never
read or written.
"""
from __future__ import annotations

import json
import logging
import os
import queue
import re
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from .channel import WorkerUnavailable, read_secret, request, write_secret
from .certs import auth_key_files
from .processes import (ChildFailed, DeploymentError, Interrupted, ProcessGroup,
                        check_ports_free, interrupts_raise)
from .security import UNREACHABLE, register_supernodes, tls_problem
from .supernode import ENV_KEY as NODE_POLL_ENV
from .supervisor import WorkerSupervisor

log = logging.getLogger("fedicra.deploy")

REPO = Path(__file__).resolve().parents[1]
CONNECTION = "fedicra"
#: Exit code when the run itself ended in a state other than completed.
RUN_FAILED = 1
#: SuperExec (the SuperNode's ClientApp launcher) task poll interval, read by Flower itself.
SUPEREXEC_POLL_ENV = "FLWR_SUPEREXEC_TASK_POLL_INTERVAL"


@dataclass(frozen=True)
class PortPlan:
    """Every port of a deployment, derived from one base port.

    ``base``: SuperLink (Fleet, Control and ServerAppIo HTTP APIs); ``base + 1 + 2k``:
    SuperNode ``k``'s own API (``flower-supernode --port``, its ClientAppIo/Runtime API);
    ``base + 2 + 2k``: the site worker of client ``k`` (bridge channel).
    """

    base: int

    @property
    def superlink(self) -> int:
        return self.base

    def node(self, cid: int) -> int:
        return self.base + 1 + 2 * cid

    def worker(self, cid: int) -> int:
        return self.base + 2 + 2 * cid

    def site_ports(self, cid: int) -> Dict[str, int]:
        return {f"SuperNode of client {cid} (--port {self.base} + {1 + 2 * cid})": self.node(cid),
                f"site worker of client {cid} (--port {self.base} + {2 + 2 * cid})": self.worker(cid)}


@dataclass
class DeployOptions:
    """How the processes are started (defaults: single machine, loopback, no TLS).

    Parameters
    ----------
    host : str
        Address the SuperLink binds (``0.0.0.0`` to accept sites from other machines).
    poll_interval : float
        Seconds between the polls of SuperNode, SuperExec and ServerApp grid; ``0`` keeps
        Flower's stock timings (3 s / 1 s / 3 s).
    ssl_certfile, ssl_keyfile, ssl_ca_certfile : str
        SuperLink TLS files; when unset the SuperLink runs ``--insecure``.
    root_certificates : str
        CA certificate the SuperNodes and ``flwr run`` use to verify the SuperLink (TLS).
    enable_supernode_auth : bool
        ``flower-superlink --enable-supernode-auth``.
    auth_private_key : str
        ``flower-supernode --auth-supernode-private-key`` (node authentication).
    auth_keys : str
        Folder of SuperNode key pairs ``client<k>.key`` / ``client<k>.pub`` (written by
        ``flower_runner.py certs``): SuperNode ``k`` authenticates with ``client<k>.key``
        (unless ``auth_private_key`` is set) and, with ``enable_supernode_auth``, the
        deployment registers the public keys on its SuperLink (``flwr supernode register``).
    clientapp_exec : str
        ``"persistent"``: SuperNodes run ``--isolation process`` and a long-lived
        :mod:`deployment.appexec` per node runs every ClientApp task in one process;
        ``"subprocess"``: Flower's default, a new ``flwr-clientapp`` process per message.
    pack_arrays : bool
        Send each message's arrays as one packed array (:mod:`deployment.packing`); False
        keeps Flower's one object per array.
    start_timeout, worker_timeout, stop_timeout : float
        Seconds to wait for the Flower services, for a worker to load its data and model, and
        for a child to exit after SIGTERM before SIGKILL.
    resume : bool
        Submit the run with ``resume = true``: the ServerApp continues it after the last round
        of its ``global/latest.pt`` (``flower_runner.py --resume``).
    worker_restarts : int
        How often a site worker that exits is started again (it rejoins the run from its
        ``latest.pt``); after that the run goes on without the site (:class:`WorkerSupervisor`).
    """

    host: str = "127.0.0.1"
    poll_interval: float = 0.1
    ssl_certfile: str = ""
    ssl_keyfile: str = ""
    ssl_ca_certfile: str = ""
    root_certificates: str = ""
    enable_supernode_auth: bool = False
    auth_private_key: str = ""
    auth_keys: str = ""
    clientapp_exec: str = "persistent"
    pack_arrays: bool = True
    start_timeout: float = 120.0
    worker_timeout: float = 600.0
    stop_timeout: float = 10.0
    extra_env: Dict[str, str] = field(default_factory=dict)
    resume: bool = False
    worker_restarts: int = 3

    @property
    def tls(self) -> bool:
        return bool(self.ssl_certfile)


# ---------------------------------------------------------------------- environment
def flower_command(name: str) -> str:
    """The Flower executable ``name`` of this interpreter's environment (else from PATH)."""
    candidate = Path(sys.executable).parent / name
    if candidate.is_file():
        return str(candidate)
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"{name} not found beside {sys.executable} nor on PATH; "
                                "install flwr in this environment")
    return found


def child_env(flwr_home: Path, opts: DeployOptions, gpu: Optional[int] = None,
              pin_device: bool = False, threads: int = 0) -> Dict[str, str]:
    """Environment of a child: own FLWR_HOME, this venv first on PATH, quiet Flower.

    With ``pin_device`` the child sees only GPU ``gpu`` (``CUDA_VISIBLE_DEVICES``), or no GPU
    at all when ``gpu`` is None; ``threads > 0`` caps its OpenMP/BLAS threads (as the
    Simulation Engine does for each client from ``cpus_per_client``).
    """
    env = dict(os.environ)
    env["FLWR_HOME"] = str(flwr_home)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["PYTHONPATH"] = os.pathsep.join(p for p in [str(REPO), env.get("PYTHONPATH", "")] if p)
    env.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    env.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    env["PYTHONUNBUFFERED"] = "1"
    if opts.poll_interval > 0:
        env[SUPEREXEC_POLL_ENV] = str(max(opts.poll_interval, 0.01))
        env[NODE_POLL_ENV] = str(opts.poll_interval)
    else:
        env[NODE_POLL_ENV] = "0"
    if pin_device:
        env["CUDA_VISIBLE_DEVICES"] = "" if gpu is None else str(gpu)
    if threads > 0:
        for key in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            env[key] = str(threads)
    env.update(opts.extra_env)
    return env


def write_flwr_config(flwr_home: Path, address: str, opts: DeployOptions) -> Path:
    """``$FLWR_HOME/config.toml`` naming the connection :data:`CONNECTION` (the default)."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    lines = ["[superlink]", f'default = "{CONNECTION}"', "", f"[superlink.{CONNECTION}]",
             f'address = "{address}"']
    if opts.root_certificates:
        lines.append(f"root-certificates = {json.dumps(str(Path(opts.root_certificates).resolve()))}")
    else:
        lines.append("insecure = true")
    path = flwr_home / "config.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def gpu_for(cid: int, gpus: Sequence[int]) -> Optional[int]:
    """Round-robin GPU of client ``cid`` (None: CPU)."""
    return gpus[cid % len(gpus)] if gpus else None


def check_out_dir_not_packed(out_dir: Path) -> None:
    """Refuse an output folder that ``flwr run`` would pack into the app bundle (FAB).

    ``flwr run <repo>`` packs the repository's ``.py``/``.toml``/``.md``/... files except what
    ``.gitignore`` excludes; an experiment folder inside the repository (its snapshot, its
    ``flwr_home/apps`` copies of the code) must therefore be ignored, like ``model/``.
    """
    try:
        rel = out_dir.resolve().relative_to(REPO)
    except ValueError:
        return  # outside the repository
    import pathspec  # a dependency of flwr

    ignore = REPO / ".gitignore"
    lines = ignore.read_text().splitlines() if ignore.is_file() else []
    if not pathspec.PathSpec.from_lines("gitwildmatch", lines).match_file(f"{rel.as_posix()}/config.toml"):
        raise DeploymentError(
            f"the output folder {out_dir} lies inside {REPO} and is not ignored by .gitignore, "
            "so flwr run would pack it into the app bundle; choose an --out_root outside the "
            "repository or an ignored one (model/, runs/)")


def planned_ports(cfg) -> Dict[str, int]:
    """Every port run ``cfg`` binds on this machine, by what uses it: the SuperLink's, and in
    deployment mode each site's SuperNode and worker (:class:`PortPlan`)."""
    plan = PortPlan(int(cfg.port))
    ports = {f"SuperLink (--port {plan.base})": plan.superlink}
    if cfg.mode != "simulation":
        for cid in range(cfg.num_clients):
            ports.update(plan.site_ports(cid))
    return ports


def _toml_string(value: str) -> str:
    return f"'{value}'" if "'" not in value else json.dumps(value)


# ---------------------------------------------------------------------- the parts
def start_superlink(group: ProcessGroup, port: int, flwr_home: Path, opts: DeployOptions,
                    name: str = "superlink", simulation: bool = False) -> None:
    """Start ``flower-superlink`` on ``opts.host:port`` and wait until it accepts connections;
    with ``simulation`` it runs the sites itself in Flower's Simulation Engine."""
    if opts.enable_supernode_auth and not opts.tls:
        raise DeploymentError("SuperNode authentication needs TLS: give the SuperLink its "
                              "certificate (--tls DIR, or --ssl-certfile/--ssl-keyfile/"
                              "--ssl-ca-certfile)")
    missing = [f for f in (opts.ssl_certfile, opts.ssl_keyfile, opts.ssl_ca_certfile)
               if f and not Path(f).is_file()]
    if opts.tls and (missing or not (opts.ssl_keyfile and opts.ssl_ca_certfile)):
        raise DeploymentError("TLS needs the SuperLink's certificate, its key and the CA "
                              f"certificate as files (--ssl-certfile, --ssl-keyfile, "
                              f"--ssl-ca-certfile){'; not found: ' + ', '.join(missing) if missing else ''}")
    argv = [flower_command("flower-superlink"), "--host", opts.host, "--port", str(port),
            "--disable-runtime-dependency-installation"]
    if simulation:
        argv.append("--simulation")
    if opts.tls:
        argv += ["--ssl-certfile", opts.ssl_certfile, "--ssl-keyfile", opts.ssl_keyfile]
        if opts.ssl_ca_certfile:
            argv += ["--ssl-ca-certfile", opts.ssl_ca_certfile]
    else:
        argv.append("--insecure")
    if opts.enable_supernode_auth:
        argv.append("--enable-supernode-auth")
    group.start(name, argv, env=child_env(flwr_home, opts), cwd=REPO)
    probe = "127.0.0.1" if opts.host in ("0.0.0.0", "", "::") else opts.host
    group.wait_port(name, probe, port, opts.start_timeout)
    log.info("SuperLink listening on %s:%d (log: %s)", opts.host, port,
             group.children[name].log_path)


@dataclass
class Site:
    """What :func:`start_site` started for client ``cid``."""

    cid: int
    worker: str
    supernode: str
    worker_address: str
    secret_file: Path
    gpu: Optional[int]
    env: Dict[str, str]
    exec_secret: Optional[Path] = None
    appexec: Optional[str] = None
    superlink: str = ""
    node_log_offset: int = 0

    @property
    def names(self) -> List[str]:
        return [n for n in (self.worker, self.supernode, self.appexec) if n]


def start_worker(group: ProcessGroup, cid: int, snapshot: Path, address: str, secret_file: Path,
                 env: Dict[str, str], overrides: Optional[Dict[str, str]] = None) -> str:
    """Start the persistent site worker of client ``cid`` (does not wait for it)."""
    name = f"worker{cid}"
    argv = [sys.executable, "-m", "deployment.worker", "--cid", str(cid), "--config",
            str(snapshot), "--address", address, "--secret-file", str(secret_file)]
    for key, value in (overrides or {}).items():
        argv += [f"--{key}", str(value)]
    group.start(name, argv, env=env, cwd=REPO)
    return name


def wait_worker(group: ProcessGroup, name: str, cid: int, address: str, secret_file: Path,
                timeout: float) -> None:
    """Wait until worker ``name`` answers an authenticated ping as client ``cid``."""
    secret = read_secret(secret_file)

    def ready() -> bool:
        try:
            reply = request(address, secret, {"op": "ping"}, who=f"site worker of client {cid}")
        except WorkerUnavailable:
            return False
        got = int(reply["metrics"]["cid"])
        if got != cid:
            raise ChildFailed(f"the worker at {address} serves client {got}, not {cid}")
        return True

    group.wait_until(ready, f"site worker of client {cid} at {address}", timeout, watch=[name])


def start_supernode(group: ProcessGroup, cid: int, superlink: str, node_port: int,
                    worker_address: str, secret_file: Path, env: Dict[str, str],
                    opts: DeployOptions, exec_secret: Optional[Path] = None) -> str:
    """Start the SuperNode of client ``cid`` (its ClientApp bridges to the worker).

    With ``exec_secret`` the node runs ``--isolation process`` and only an executor holding
    that secret may take its tasks (see :func:`start_appexec`).
    """
    name = f"supernode{cid}"
    node_config = (f"cid={cid} worker-address={_toml_string(worker_address)} "
                   f"worker-secret-file={_toml_string(str(secret_file))}")
    argv = [sys.executable, "-m", "deployment.supernode", "--superlink", superlink,
            "--port", str(node_port), "--node-config", node_config]
    if exec_secret is not None:
        argv += ["--isolation", "process", "--superexec-auth-secret-file", str(exec_secret)]
    if opts.root_certificates:
        argv += ["--root-certificates", opts.root_certificates]
    else:
        argv.append("--insecure")
    key = opts.auth_private_key or (str(auth_key_files(opts.auth_keys, cid)["private"])
                                    if opts.auth_keys else "")
    if key:
        argv += ["--auth-supernode-private-key", key]
    group.start(name, argv, env=env, cwd=REPO)
    return name


def start_appexec(group: ProcessGroup, cid: int, node_port: int, exec_secret: Path,
                  env: Dict[str, str], opts: DeployOptions) -> str:
    """Start the long-lived ClientApp executor of SuperNode ``cid`` (:mod:`deployment.appexec`)."""
    name = f"appexec{cid}"
    argv = [sys.executable, "-m", "deployment.appexec", "--runtime-api-address",
            f"127.0.0.1:{node_port}", "--insecure", "--superexec-auth-secret-file",
            str(exec_secret), "--poll-interval", str(opts.poll_interval or 1.0)]
    group.start(name, argv, env=env, cwd=REPO)
    return name


def start_site(group: ProcessGroup, cid: int, snapshot: Path, superlink: str, out_dir: Path,
               plan: PortPlan, gpu: Optional[int], opts: DeployOptions, threads: int = 1,
               overrides: Optional[Dict[str, str]] = None, wait: bool = True) -> Site:
    """Start client ``cid``'s worker and SuperNode (both pinned to ``gpu``, CPU if None).

    ``threads``: CPU threads of the worker (``cpus_per_client``).
    """
    secret_file = fresh_secret(out_dir / "secrets" / f"client{cid}.key")
    os.chmod(secret_file.parent, 0o700)
    address = f"127.0.0.1:{plan.worker(cid)}"
    flwr_home = out_dir / "flwr_home" / f"supernode{cid}"
    worker = start_worker(group, cid, snapshot, address, secret_file,
                          child_env(flwr_home, opts, gpu, pin_device=True, threads=threads),
                          overrides)
    exec_secret = None
    if opts.clientapp_exec == "persistent":
        exec_secret = fresh_secret(out_dir / "secrets" / f"superexec{cid}.key")
    elif opts.clientapp_exec != "subprocess":
        raise ValueError(f"clientapp_exec must be persistent or subprocess, got "
                         f"{opts.clientapp_exec!r}")
    env = child_env(flwr_home, opts, gpu, pin_device=True)
    node_log = group.log_dir / f"supernode{cid}.log"  # appended to: read only what is new
    offset = node_log.stat().st_size if node_log.is_file() else 0
    node = start_supernode(group, cid, superlink, plan.node(cid), address, secret_file, env,
                           opts, exec_secret)
    site = Site(cid, worker, node, address, secret_file, gpu, env, exec_secret,
                superlink=superlink, node_log_offset=offset)
    if wait:
        wait_site(group, site, plan, opts)
    return site


def fresh_secret(path: Path) -> Path:
    """A new random secret in ``path`` (0600), replacing one of an earlier run."""
    path.unlink(missing_ok=True)
    return write_secret(path)


#: What ``flower-supernode`` logs once the SuperLink has accepted it (Flower 1.42).
JOINED_LINE = "SuperNode ID:"


def wait_joined(group: ProcessGroup, site: Site, opts: DeployOptions) -> None:
    """Wait until SuperNode ``site`` has joined its SuperLink (its log names its node id).

    The TLS set-up is checked as a SuperNode sees it (:func:`deployment.security.tls_problem`):
    at once when a CA is given, after 2 s without joining otherwise (a plain-HTTP SuperNode
    facing a TLS SuperLink retries forever). A mismatch raises :class:`DeploymentError`
    naming the problem; a SuperNode that exits raises :class:`ChildFailed` with its log tail.
    """
    child = group.children[site.supernode]
    deadline = time.monotonic() + opts.start_timeout
    probe_at = time.monotonic() + (0.0 if opts.root_certificates else 2.0)
    probed = False
    while True:
        try:
            with open(child.log_path, "rb") as f:
                f.seek(site.node_log_offset)
                if JOINED_LINE.encode() in f.read():
                    return
        except OSError:
            pass
        if not probed and time.monotonic() >= probe_at and site.superlink:
            problem = tls_problem(site.superlink, opts.root_certificates)
            if problem not in (None, UNREACHABLE):
                raise DeploymentError(f"client {site.cid} cannot join: {problem}")
            probed = problem is None
        try:
            group.check_alive([site.supernode])
        except ChildFailed as err:
            hint = ""
            if "Failed to activate SuperNode" in str(err):
                hint = ("\nthe SuperLink refused this SuperNode's key: register its public key "
                        "there (flower_runner.py superlink --auth-keys DIR, or flwr supernode "
                        "register KEY.pub) before the site starts")
            raise ChildFailed(f"SuperNode of client {site.cid} could not join the SuperLink at "
                              f"{site.superlink}: {err}{hint}") from None
        if time.monotonic() > deadline:
            raise TimeoutError(f"SuperNode of client {site.cid} has not joined the SuperLink at "
                               f"{site.superlink} within {opts.start_timeout:.0f} s; last lines "
                               f"of {child.log_path}:\n{child.log_tail()}")
        time.sleep(0.1)


def wait_site(group: ProcessGroup, site: Site, plan: PortPlan, opts: DeployOptions) -> None:
    """Wait for the SuperNode's port and its joining the SuperLink, start its executor (if
    persistent), ping the worker."""
    group.wait_port(site.supernode, "127.0.0.1", plan.node(site.cid), opts.start_timeout)
    wait_joined(group, site, opts)
    if site.exec_secret is not None:
        site.appexec = start_appexec(group, site.cid, plan.node(site.cid), site.exec_secret,
                                     site.env, opts)
    wait_worker(group, site.worker, site.cid, site.worker_address, site.secret_file,
                opts.worker_timeout)
    log.info("client %d ready: SuperNode on port %d, worker on %s, %s", site.cid,
             plan.node(site.cid), site.worker_address,
             "CPU" if site.gpu is None else f"CUDA_VISIBLE_DEVICES={site.gpu}")


def submit_run(group: ProcessGroup, snapshot: Path, flwr_home: Path, opts: DeployOptions,
               watch: Sequence[str] = (), stop_run: bool = False,
               federation_config: str = "",
               supervise: Optional[WorkerSupervisor] = None) -> int:
    """``flwr run`` the repository with ``snapshot``; stream its log; return 0 if it completed.

    While the log streams, the children named in ``watch`` must stay alive (else
    :class:`ChildFailed`) and ``supervise`` restarts the workers that exit. With ``stop_run`` a
    failure or interrupt here also stops the run on the SuperLink (``flwr stop``), for a
    SuperLink this process does not own.
    """
    grid_poll = opts.poll_interval / 2 if opts.poll_interval > 0 else 3.0
    run_config = (f"config-file={_toml_string(str(snapshot.resolve()))} "
                  f"grid-poll-interval={grid_poll} pack-arrays={str(opts.pack_arrays).lower()}"
                  f"{' resume=true' if opts.resume else ''}")
    argv = [flower_command("flwr"), "run", str(REPO), CONNECTION, "--stream",
            "--run-config", run_config]
    if federation_config:
        argv += ["--federation-config", federation_config]
    log.info("submitting: FLWR_HOME=%s %s", flwr_home,
             " ".join(a if " " not in a else repr(a) for a in argv))
    child = group.start("flwr-run", argv, env=child_env(flwr_home, opts), cwd=REPO,
                        stdout=subprocess.PIPE)
    lines: "queue.Queue[Optional[str]]" = queue.Queue()
    threading.Thread(target=_pump, args=(child.proc.stdout, child.log_path, lines),
                     daemon=True).start()
    run_id = None
    try:
        while True:
            if supervise is not None:
                supervise.check()
            try:
                line = lines.get(timeout=0.5)
            except queue.Empty:
                group.check_alive(watch)
                continue
            if line is None:
                break
            match = re.search(r"Successfully started run (\d+)", line)
            run_id = int(match.group(1)) if match else run_id
            log.info("| %s", line)
    except (ChildFailed, Interrupted):
        if stop_run and run_id is not None:
            log.warning("stopping run %d on the SuperLink", run_id)
            _flwr(["stop", str(run_id), CONNECTION], flwr_home, opts)
        raise
    code = child.proc.wait()
    if run_id is None:
        log.error("flwr run exited with code %d before starting a run; see %s", code,
                  child.log_path)
        return code or RUN_FAILED
    status = run_status(run_id, flwr_home, opts)
    log.info("run %d ended: %s", run_id, status)
    return 0 if status.endswith("completed") else RUN_FAILED


def _pump(stream, log_path: Path, lines: "queue.Queue[Optional[str]]") -> None:
    ansi = re.compile(r"\x1b\[[0-9;]*m")
    with open(log_path, "a") as out:
        for raw in iter(stream.readline, b""):
            text = ansi.sub("", raw.decode(errors="replace")).rstrip()
            out.write(text + "\n")
            out.flush()
            lines.put(text)
    lines.put(None)


def _flwr(args: List[str], flwr_home: Path, opts: DeployOptions) -> subprocess.CompletedProcess:
    return subprocess.run([flower_command("flwr"), *args], env=child_env(flwr_home, opts),
                          cwd=REPO, capture_output=True, text=True, timeout=60)


def run_status(run_id: int, flwr_home: Path, opts: DeployOptions) -> str:
    """``status`` of run ``run_id`` as ``flwr ls`` reports it (e.g. ``finished:completed``)."""
    res = _flwr(["ls", CONNECTION, "--run-id", str(run_id), "--format", "json"], flwr_home, opts)
    try:
        runs = json.loads(res.stdout)["runs"]
        return str(runs[0]["status"])
    except (ValueError, KeyError, IndexError):
        return f"unknown (flwr ls: {res.stdout.strip() or res.stderr.strip()})"


# ---------------------------------------------------------------------- entry points
def process_group(out_dir: Path) -> ProcessGroup:
    group = ProcessGroup(out_dir / "logs", out_dir / "pids.json")
    group.write_pids()
    return group


def stop_children(group: ProcessGroup, opts: DeployOptions) -> None:
    group.stop_all(opts.stop_timeout)
    group.write_pids()
    removed = remove_partial_files(group.pid_file.parent)
    log.info("stopped %d child process group(s); pids in %s%s", len(group.children),
             group.pid_file, f"; removed {removed} partial file(s)" if removed else "")


def remove_partial_files(out_dir: Path) -> int:
    """Delete the temporary files of atomic writes that a stopped child left half-written
    (``<name>.<random>.tmp`` beside checkpoints and the configuration snapshot)."""
    count = 0
    for path in out_dir.rglob("*.tmp"):
        if path.is_file() and "flwr_home" not in path.parts:
            path.unlink(missing_ok=True)
            count += 1
    return count


def interrupted_code(err: Interrupted) -> int:
    log.warning("interrupted by %s: stopping every child process", err)
    return 128 + err.signum


def run_deployment(cfg, options: Optional[DeployOptions] = None,
                   outcome: Optional[Dict[str, object]] = None) -> int:
    """Run ``cfg`` on this machine: SuperLink, one site per client, ``flwr run``; clean up.

    ``cfg.out_dir/config.toml`` must hold the snapshot (``flower_runner.py`` writes it).
    Returns 0 when the run completed, 1 when it (or a child) failed, 128 + signal number when
    interrupted (130 for Ctrl-C, 143 for SIGTERM). Raises :class:`DeploymentError` (busy port,
    output folder inside the app) before starting anything. ``outcome`` (optional) receives
    ``dropped``: ``{client id: why}`` of the sites dropped for the rest of the run (a worker
    that used up its restarts), for the end-of-run summary.
    """
    opts = options or DeployOptions()
    out_dir = Path(cfg.out_dir).resolve()
    check_out_dir_not_packed(out_dir)
    snapshot = out_dir / "config.toml"
    plan = PortPlan(int(cfg.port))
    check_ports_free(planned_ports(cfg))
    flwr_home = out_dir / "flwr_home"
    superlink = f"127.0.0.1:{plan.superlink}"
    write_flwr_config(flwr_home, superlink, opts)
    gpus = _visible_gpus(list(cfg.gpus))
    group = process_group(out_dir)
    started = time.perf_counter()
    try:
        with interrupts_raise():
            start_superlink(group, plan.superlink, flwr_home, opts)
            if opts.enable_supernode_auth and opts.auth_keys:
                register_keys(flwr_home, opts, [auth_key_files(opts.auth_keys, cid)["public"]
                                                for cid in range(cfg.num_clients)])
            threads = cfg.site_threads()
            sites = [start_site(group, cid, snapshot, superlink, out_dir, plan,
                                gpu_for(cid, gpus), opts, threads=threads, wait=False)
                     for cid in range(cfg.num_clients)]
            for site in sites:
                wait_site(group, site, plan, opts)
            log.info("federation up in %.1f s", time.perf_counter() - started)
            # a worker that exits is restarted; the others end the run
            watch = ["superlink"] + [n for s in sites for n in s.names if n != s.worker]
            supervisor = WorkerSupervisor(group, {s.worker: s.cid for s in sites},
                                          opts.worker_restarts)
            if outcome is not None:
                outcome["dropped"] = supervisor.dropped  # filled while the run goes on
            return submit_run(group, snapshot, flwr_home, opts, watch=watch,
                              supervise=supervisor)
    except Interrupted as err:
        return interrupted_code(err)
    except (ChildFailed, TimeoutError) as err:
        log.error("deployment failed: %s", err)
        return RUN_FAILED
    finally:
        stop_children(group, opts)


def register_keys(flwr_home: Path, opts: DeployOptions, keys: Sequence[Path]) -> None:
    """Register SuperNode public keys on the SuperLink that ``flwr_home``'s connection names
    (SuperNode authentication; :func:`deployment.security.register_supernodes`)."""
    started = time.perf_counter()
    try:
        nodes = register_supernodes(keys, flwr_home, child_env(flwr_home, opts),
                                    flower_command("flwr"), CONNECTION, cwd=REPO)
    except (RuntimeError, FileNotFoundError) as err:
        raise DeploymentError(str(err)) from None
    log.info("registered %d SuperNode public key(s) in %.1f s: %s", len(nodes),
             time.perf_counter() - started, ", ".join(Path(k).name for k in nodes))


def _visible_gpus(gpus: List[int]) -> List[int]:
    """``gpus`` if CUDA is usable here, else ``[]`` (CPU) with a warning."""
    if not gpus:
        return []
    from configs.devices import nvidia_driver_present

    if not nvidia_driver_present():
        log.warning("--gpus %s given but no NVIDIA driver found: clients train on the CPU", gpus)
        return []
    return gpus
