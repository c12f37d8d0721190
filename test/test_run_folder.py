"""A run owns its folder (issue 19): ``--overwrite`` clears only a folder a run marked, and
only what runs write; a live run's folder is locked against a second launch, ``--resume``,
``--overwrite``, ``launch`` and ``site``, the lock ending with the process that holds it."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Dict

import pytest

import flower_runner
import preflight
from conftest import free_base, tiny_run_config
from deployment import run_folder

REPO = Path(__file__).resolve().parents[1]


def tiny_flags(data: Path, out_root: Path, *extra: str):
    return ["--img_class", "synthetic_faz", "--root_path", str(data), "--out_root", str(out_root),
            "--num_clients", "3", "--rounds", "2", "--iters", "2", "--rep_iters", "1",
            "--batch_size", "2", "--procedure", "pce", "--set", "base_channels=4", "--set",
            "aux_channels=8", "--mode", "deployment", "--exp", "live", *extra]


def tree(folder: Path) -> Dict[str, bytes]:
    """Every file under ``folder`` with its content."""
    return {p.relative_to(folder).as_posix(): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def error_lines(capsys):
    return [line for line in capsys.readouterr().out.splitlines() if "error" in line]


# ---------------------------------------------------------------------- finding 2: --overwrite
def test_overwrite_never_deletes_a_folder_no_run_marked(tiny_federation, tmp_path, capsys):
    """``--out_root X/inner --exp .. --overwrite`` used to remove ``X/logs/`` and ``X/test/``,
    the user's own files, before anything started."""
    x = tmp_path / "X"
    (x / "inner").mkdir(parents=True)
    for name in ("logs/mine.log", "test/result.csv", "tb/notes.txt", "global/keep.txt",
                 "secrets/mine.key", "client1/scan.png", "config.toml"):
        (x / name).parent.mkdir(parents=True, exist_ok=True)
        (x / name).write_text(f"the user's own {name}")
    before = tree(x)
    for out_root, exp, culprit in (
            (x / "inner", "..", "--exp: '..' climbs out of --out_root"),
            (x / "inner", str(x), "is an absolute path"),
            (x / "inner", "a/../..", "climbs out of --out_root"),
            (x, ".", "names --out_root itself"),
            (tmp_path, "X", "but no .fedicra-run marker")):  # a legal path, but no run's folder
        code = flower_runner.main(tiny_flags(tiny_federation, out_root, "--exp", exp,
                                             "--overwrite", "--port", str(free_base(8))))
        lines = error_lines(capsys)
        assert code == 2 and len(lines) == 1 and culprit in lines[0], (exp, lines)
        assert tree(x) == before, f"--exp {exp} --overwrite touched the user's files"
    assert not list((x / "inner").iterdir())

    # a folder a run marked: --overwrite removes what runs write, and nothing else
    run = tmp_path / "model" / "run"
    for name in ("config.toml", "metrics.csv", "pids.json", "logs/worker0.log", "tb/server/ev",
                 "global/latest.pt", "client0/latest.pt", "site2/pids.json", "secrets/c.key",
                 "flwr_home/config.toml", "test/result.csv", "notes.txt", "client_notes/a.txt",
                 "clientA/b.txt"):
        (run / name).parent.mkdir(parents=True, exist_ok=True)
        (run / name).write_text(name)
    marker = run_folder.write_marker(run, "run")
    preflight.claim_output(run, overwrite=True, exp="run").release()
    assert sorted(tree(run)) == sorted([".fedicra-lock", ".fedicra-run", "client_notes/a.txt",
                                        "clientA/b.txt", "notes.txt"])
    assert run_folder.read_marker(run)["run"] != marker["run"], "a new run, a new identity"


# ---------------------------------------------------------------------- finding 4: the lock
HOLD = """
import socket, sys, time
from pathlib import Path
from deployment.run_folder import RunLock
RunLock.acquire(Path(sys.argv[1]), "run")   # what flower_runner.py does for its run
port = socket.socket(); port.bind(("127.0.0.1", int(sys.argv[2]))); port.listen()
print("held", flush=True)
time.sleep(300)
"""


def resumable_run(data: Path, tmp_path: Path, port: int):
    """A run folder as an interrupted run leaves it: snapshot, marker, round 1 of 2 done."""
    from configs import save_config
    from networks.checkpoint import run_meta, save_atomic

    cfg = flower_runner.absolute_paths(tiny_run_config(data, tmp_path / "model", exp="live",
                                                       port=port))
    save_config(cfg, cfg.out_dir / "config.toml")
    run_folder.write_marker(cfg.out_dir, cfg.exp_name)
    save_atomic({"round": 1, "strategy": {}, "arrays": {}, "meta": run_meta(cfg, None)},
                cfg.out_dir / "global" / "latest.pt")
    for cid in range(cfg.num_clients):
        save_atomic({"rounds_done": 1, "meta": run_meta(cfg, cid)},
                    cfg.out_dir / f"client{cid}" / "latest.pt")
        (cfg.out_dir / "secrets").mkdir(exist_ok=True)
        (cfg.out_dir / "secrets" / f"client{cid}.key").write_text(f"live secret {cid}")
    return cfg


def test_a_live_run_folder_is_refused_naming_its_pid(tiny_federation, tmp_path, capsys,
                                                     monkeypatch):
    """``--resume DIR`` on a run that was still going took it over (new secrets, the live run
    died). While the run's launcher lives, a second launch, --resume, --overwrite, launch and
    site are refused with exit 2 naming its pid; once it dies (SIGKILL), the folder is free."""
    port = free_base(8)
    cfg = resumable_run(tiny_federation, tmp_path, port)
    out = cfg.out_dir
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out), str(port)], cwd=REPO,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        before = tree(out)
        pid = f"pid {holder.pid}"
        attempts = {
            "--resume": ["--resume", str(out), "--port", str(port)],
            "--resume, another port": ["--resume", str(out), "--port", str(free_base(8))],
            "--overwrite": tiny_flags(tiny_federation, tmp_path / "model", "--overwrite",
                                      "--port", str(free_base(8))),
            "launch": ["launch", "--superlink", f"127.0.0.1:{port}", "--config",
                       str(out / "config.toml")],
            "launch --overwrite": ["launch", "--superlink", f"127.0.0.1:{port}", "--config",
                                   str(out / "config.toml"), "--overwrite"],
            "site": ["site", "--cid", "0", "--superlink", f"127.0.0.1:{port}", "--config",
                     str(out / "config.toml"), "--port", str(free_base(4))],
        }
        for what, argv in attempts.items():
            code = flower_runner.main(argv)
            lines = error_lines(capsys)
            assert code == 2 and len(lines) == 1, (what, lines)
            assert f"{out} is in use by a run with {pid}" in lines[0], (what, lines[0])
            assert tree(out) == before, f"{what} changed the live run's folder"
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    # the kernel released the lock with the process: the folder can be claimed again
    assert run_folder.live_holders(out) == []
    run_folder.claim_existing(out, cfg.exp_name).release()

    # the launcher holds the lock for the whole run, and gives it back when it returns
    seen = {}

    def fake_run(run_cfg, options, **kwargs):
        seen["holder"] = run_folder.lock_holder(Path(run_cfg.out_dir))
        return 0

    monkeypatch.setattr("deployment.launch.run_deployment", fake_run)
    monkeypatch.setattr(flower_runner, "run_deployment", fake_run)  # bound at its import
    assert flower_runner.main(tiny_flags(tiny_federation, tmp_path / "model", "--exp", "fresh",
                                         "--port", str(free_base(8)))) == 0
    assert seen["holder"]["pid"] == os.getpid() and seen["holder"]["role"] == "run"
    assert run_folder.lock_holder(tmp_path / "model" / "fresh") is None
    assert run_folder.read_marker(tmp_path / "model" / "fresh")["exp"] == "fresh"


def test_a_site_lock_keeps_one_machine_forms_out_but_lets_the_launch_in(tmp_path):
    """A live ``site`` (multi-machine) locks ``site<k>/``: --resume and --overwrite of the
    folder are refused, the ``launch`` of the prepared snapshot is not; a second site k is."""
    out = tmp_path / "run"
    (out / "config.toml").parent.mkdir(parents=True)
    (out / "config.toml").write_text("")
    run_folder.write_marker(out, "run")
    site = run_folder.claim_site(out, "run", 1)
    try:
        with pytest.raises(ValueError, match=f"site1 is in use by a site .*pid {os.getpid()}"):
            run_folder.claim_site(out, "run", 1)
        with pytest.raises(ValueError, match="in use by a site"):
            run_folder.claim_existing(out, "run")
        with pytest.raises(ValueError, match="in use by a site"):
            run_folder.claim(out, "run", overwrite=True)
        launch = run_folder.claim(out, "run", overwrite=False, role="launch", prepared=True)
        run_folder.claim_site(out, "run", 0).release()  # a site joins beside a launch
        launch.release()
    finally:
        site.release()
    assert (out / "config.toml").is_file()
