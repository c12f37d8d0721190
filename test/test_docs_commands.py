"""The commands of docs/deployment.md work as written (issue 19, finding 7).

The commands are read from the markdown's ``bash`` blocks at test time, so the test follows the
docs when they change. Only what names this machine is adapted (:data:`ADAPTED`): the
SuperLink host and base port, the data and output paths under /tmp, the data root of the
sites, and the run configuration of the walk-through (``configs/faz.toml`` is the real FAZ
schedule, 3,000 rounds at 256 px; it becomes a 2-site, 1-round, 32 px file). Optional parts in
``[...]`` are kept, except a GPU (``[--gpus ...]``, ``[--gpu ...]``), which a CPU-only
machine refuses. ``<k>`` / ``--cid k`` become each site's number. Every command runs in one
scratch folder (so ``certs/``, ``model/`` are relative to it) with the repository on
``PYTHONPATH``; ``superlink`` and ``site`` run until Ctrl-C and get SIGINT at the end.
"""
from __future__ import annotations

import csv
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import pytest

from conftest import free_base

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "deployment.md"
#: What each adapted value stands for (the test's replacement is made per run).
ADAPTED = {
    "coord.example.org": "the SuperLink host: 127.0.0.1",
    "8097": "the base port: a free one",
    "/tmp/dep_data": "the quick start's data: a scratch folder",
    "/tmp/x": "the quick start's output root: a scratch folder",
    "/data/faz_h5": "the sites' data root: the quick start's data",
    "configs/faz.toml": "the walk-through's run configuration: 2 sites, 1 round, 32 px",
}
#: Commands that are checked, not run, with the reason: each flag they use must be accepted.
CHECKED_ONLY = {
    "benchmarks/bench_round_overhead.py": "the round-overhead benchmark runs four deployments "
                                          "for minutes; its flags are checked against --help",
}


def bash_blocks() -> Dict[str, List[str]]:
    """``{section heading: [command, ...]}`` of every ``bash`` block of the doc (continuation
    lines joined, comment lines dropped)."""
    blocks: Dict[str, List[str]] = {}
    heading = ""
    for part in re.split(r"(^## [^\n]*$|^```bash\n.*?^```$)", DOC.read_text(), flags=re.M | re.S):
        if part.startswith("## "):
            heading = part[3:].strip()
        elif part.startswith("```bash"):
            body = part[len("```bash\n"):-3].replace("\\\n", " ")
            blocks.setdefault(heading, []).extend(
                " ".join(line.split()) for line in body.splitlines()
                if line.strip() and not line.strip().startswith("#"))
    return blocks


def adapt(command: str, subs: Dict[str, str], k: Optional[int] = None) -> List[str]:
    """``command`` as argv for this machine (see the module docstring)."""
    command = re.sub(r"\[([^\]]*)\]", lambda m: "" if "--gpu" in m.group(1) else m.group(1),
                     command)
    for old, new in subs.items():
        command = re.sub(rf"(?<![\w.]){re.escape(old)}(?![\w])", new, command)
    if k is not None:
        command = command.replace("--cid k", f"--cid {k}").replace("<k>", str(k))
    assert "<" not in command and "..." not in command, f"not runnable as written: {command}"
    argv = shlex.split(command)
    assert argv[0] == "python", command
    argv[0] = sys.executable
    if argv[1].endswith(".py"):
        argv[1] = str(REPO / argv[1])
    return argv


def env() -> Dict[str, str]:
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))


def run(argv: List[str], cwd: Path, timeout: float = 300) -> str:
    res = subprocess.run(argv, cwd=cwd, env=env(), capture_output=True, text=True,
                         timeout=timeout)
    assert res.returncode == 0, (" ".join(argv), res.stdout[-4000:], res.stderr[-4000:])
    return res.stdout


def rounds_and_clients(run_dir: Path):
    with open(run_dir / "metrics.csv", newline="") as f:
        return {(int(r["round"]), int(r["client"])) for r in csv.DictReader(f)}


def subs_for(tmp: Path, port: int) -> Dict[str, str]:
    return {"coord.example.org": "127.0.0.1", "8097": str(port),
            "/tmp/dep_data": str(tmp / "dep_data"), "/tmp/x": str(tmp / "x"),
            "/data/faz_h5": str(tmp / "dep_data"), "configs/faz.toml": str(tmp / "tiny.toml")}


def test_every_command_of_the_doc_is_covered():
    """A command the doc gains is run by one of the tests below, or listed as checked only."""
    blocks = bash_blocks()
    assert set(ADAPTED) == set(subs_for(Path("/t"), 1))
    assert set(blocks) == {"Quick start (one machine)", "Round overhead", "Many machines",
                           "TLS and SuperNode authentication"}, list(blocks)
    for command in blocks["Round overhead"]:
        script = shlex.split(command)[1]
        assert script in CHECKED_ONLY, command
        text = run([sys.executable, str(REPO / script), "--help"], REPO, timeout=120)
        for flag in re.findall(r"(--[\w-]+)", command):
            assert flag in text, (flag, command)


@pytest.mark.slow
def test_the_one_machine_commands_run_as_written(tmp_path):
    """Quick start (synthetic data, a deployment run), and TLS with SuperNode authentication
    on the same data, each block exactly as the doc writes it; the two runs go side by side
    (each on its own base port) once the data is there."""
    blocks = bash_blocks()
    quick, tls = blocks["Quick start (one machine)"], blocks["TLS and SuperNode authentication"]
    subs = subs_for(tmp_path, free_base(8))
    run(adapt(quick[0], subs), tmp_path)  # the data, which both runs use
    tls_subs = dict(subs, **{"8097": str(free_base(8))})
    while tls_subs["8097"] == subs["8097"]:
        tls_subs["8097"] = str(free_base(8))
    logs = {"quick": tmp_path / "quick.out", "tls": tmp_path / "tls.out"}
    procs = {}
    try:
        with open(logs["quick"], "w") as f:
            procs["quick"] = [subprocess.Popen(adapt(c, subs), cwd=tmp_path, env=env(), stdout=f,
                                               stderr=subprocess.STDOUT) for c in quick[1:2]][0]
        for command in tls[:-1]:  # the certificates
            run(adapt(command, tls_subs), tmp_path)
        with open(logs["tls"], "w") as f:
            procs["tls"] = subprocess.Popen(adapt(tls[-1], tls_subs), cwd=tmp_path, env=env(),
                                            stdout=f, stderr=subprocess.STDOUT)
        codes = {name: proc.wait(timeout=400) for name, proc in procs.items()}
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
                proc.wait(timeout=60)
    assert len(quick) == 2 and len(tls) == 2, (quick, tls)
    for name, code in codes.items():
        assert code == 0, logs[name].read_text()[-4000:]
        assert "ended: finished:completed" in logs[name].read_text()
    assert "registered 3 SuperNode public key(s)" in logs["tls"].read_text()
    assert (tmp_path / "x" / "e1" / ".fedicra-run").is_file()
    assert rounds_and_clients(tmp_path / "x" / "e1") == {(r, k) for r in (1, 2) for k in range(3)}
    assert rounds_and_clients(tmp_path / "x" / "e1-tls") == {(1, k) for k in range(3)}


def wait_for(path: Path, text: str, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.is_file() and text in path.read_text(errors="replace"):
            return
        assert proc.poll() is None, f"exited with {proc.returncode}:\n{path.read_text()[-4000:]}"
        time.sleep(0.2)
    raise AssertionError(f"no {text!r} in {path} within {timeout} s:\n{path.read_text()[-4000:]}")


@pytest.mark.slow
def test_the_multi_machine_walk_through_runs_as_written(tmp_path):
    """Snapshot and certificates, the coordinator (TLS, SuperNode authentication), every site,
    then ``launch`` of the snapshot: on loopback, with a 2-site, 1-round configuration."""
    blocks = bash_blocks()
    port = free_base(8)
    subs = subs_for(tmp_path, port)
    run(adapt(blocks["Quick start (one machine)"][0], subs), tmp_path)  # the data
    clients = 2
    (tmp_path / "tiny.toml").write_text(
        f'img_class = "synthetic_faz"\nroot_path = "{tmp_path / "dep_data"}"\n'
        f"num_clients = {clients}\nrounds = 1\niters = 2\nrep_iters = 1\nbatch_size = 2\n"
        f'procedure = "pce"\nbase_channels = 4\naux_channels = 8\nport = {port}\n')
    commands = blocks["Many machines"]
    assert [shlex.split(c)[2] for c in commands] == ["launch", "certs", "superlink", "site",
                                                     "launch"], commands
    background: List[subprocess.Popen] = []

    def start(argv: List[str], log: Path) -> subprocess.Popen:
        with open(log, "w") as f:
            background.append(subprocess.Popen(argv, cwd=tmp_path, env=env(), stdout=f,
                                               stderr=subprocess.STDOUT))
        return background[-1]

    try:
        # 0. the snapshot and the certificates (independent: side by side)
        steps = [start(adapt(c, subs), tmp_path / f"step0_{i}.out") for i, c in enumerate(commands[:2])]
        for i, proc in enumerate(steps):
            assert proc.wait(timeout=300) == 0, (tmp_path / f"step0_{i}.out").read_text()[-4000:]
            background.remove(proc)
        link = start(adapt(commands[2], subs), tmp_path / "superlink.out")  # 1. the coordinator
        wait_for(tmp_path / "superlink.out", "sites join with", link)
        sites = [start(adapt(commands[3], subs, k), tmp_path / f"site{k}.out")  # 2. hospitals
                 for k in range(clients)]
        for k, proc in enumerate(sites):
            wait_for(tmp_path / f"site{k}.out", f"client {k} joined", proc)
        out = run(adapt(commands[4], subs), tmp_path)  # 3. submit
        assert "ended: finished:completed" in out, out[-4000:]
    finally:
        for proc in reversed(background):
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
        codes = [proc.wait(timeout=60) for proc in reversed(background)]
    assert codes == [130] * len(background)
    run_dir = tmp_path / "model" / "faz" / "FedICRA"
    assert rounds_and_clients(run_dir) == {(1, k) for k in range(clients)}
    for k in range(clients):
        assert (run_dir / f"client{k}" / "latest.pt").is_file()
    assert (run_dir / ".fedicra-run").is_file()
