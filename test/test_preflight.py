"""A bad run configuration fails before any process starts: exit 2, one line naming the flag
or key, nothing written (bad learning rates, GPU ids this machine lacks, a busy port, a corrupt
case file included). A folder that holds a run is refused unless --overwrite."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import flower_runner
from conftest import SEED_TRAIN, free_base

REPO = Path(__file__).resolve().parents[1]


def tiny_flags(data: Path, out_root: Path, *extra: str):
    return ["--img_class", "synthetic_faz", "--root_path", str(data), "--out_root", str(out_root),
            "--num_clients", "3", "--rounds", "1", "--iters", "2", "--rep_iters", "1", "--batch_size", "2",
            "--mode", "simulation", "--exp", "pre", *extra]


@pytest.mark.parametrize("extra, culprit", [
    (["--strategy", "FedNope"], "--strategy: unknown strategy 'FedNope'; expected one of"),
    (["--model", "resnet"], "--model: unknown network 'resnet'"),
    (["--procedure", "dice"], "--procedure: unknown objective procedure 'dice'"),
    (["--num_clients", "6"], "--num_clients: 6 clients but task 'synthetic_faz' has 5 sites"),
    (["--strategy", "FedAvg", "--procedure", "pce_mstree"], "needs a network with auxiliary heads"),
    (["--model", "unet", "--procedure", "pce_sc"], "needs a network with site gates"),
    (["--strategy", "FedAvg", "--model", "efficient_unet", "--img_size", "48"], "--img_size: 48 px"),
    (["--gpus", "-1"], "--gpus: GPU ids must be >= 0"),
    (["--set", "ala_groups=decoder,head"], "ala_groups = 'decoder,head'"),
    (["--set", "no_such_key=1"], "no_such_key"),
    # non-finite or non-positive learning rates (issue 19, finding 6)
    (["--base_lr", "nan"], "base_lr = nan: every number must be finite"),
    (["--base_lr", "-1"], "base_lr = -1.0 must be > 0"),
    (["--base-lr", "0"], "base_lr = 0.0 must be > 0"),
    (["--strategy", "FT", "--set", "ft_lr=nan"], "ft_lr = nan: every number must be finite"),
    (["--strategy", "FT", "--set", "ft_lr=inf"], "ft_lr = inf: every number must be finite"),
    # a GPU id this machine does not have: refused (on a CPU-only machine, every id)
    (["--gpus", str(torch.cuda.device_count())],
     f"--gpus: GPU ids [{torch.cuda.device_count()}] do not exist"),
])
def test_misuse_exits_2_naming_the_culprit_and_writes_nothing(tiny_federation, tmp_path, capsys,
                                                               extra, culprit):
    out_root = tmp_path / "model"
    assert flower_runner.main(tiny_flags(tiny_federation, out_root, *extra)) == 2
    lines = [line for line in capsys.readouterr().out.splitlines() if "error" in line]
    assert len(lines) == 1 and culprit in lines[0], lines
    assert not out_root.exists()


def test_missing_data_names_root_path_and_the_site_folder(tiny_federation, tmp_path, capsys):
    out_root = tmp_path / "model"
    assert flower_runner.main(tiny_flags(tmp_path / "nowhere", out_root)) == 2
    assert "--root_path: data root" in capsys.readouterr().out
    partial = tmp_path / "partial"
    (partial / "Domain1" / "train").mkdir(parents=True)
    assert flower_runner.main(tiny_flags(partial, out_root)) == 2
    assert "Domain1/train holds no .h5 cases" in capsys.readouterr().out
    assert not out_root.exists()


def test_the_seed_command_on_a_fresh_clone_fails_fast_with_exit_2(tmp_path):
    """No data imported yet: the seed README's train command says so before starting anything."""
    res = subprocess.run([sys.executable, "flower_runner.py", *SEED_TRAIN, "--root_path",
                          str(tmp_path / "data" / "faz_h5"), "--out_root", str(tmp_path / "model")],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2, res.stdout + res.stderr
    assert "--root_path" in res.stdout and "Traceback" not in res.stdout + res.stderr
    assert not (tmp_path / "model").exists()


def test_a_second_run_into_the_same_folder_is_refused_unless_overwrite(tiny_federation, tmp_path,
                                                                       capsys):
    import preflight
    from deployment.run_folder import write_marker

    out = tmp_path / "model" / "pre"
    for name in ("client0", "tb/client0", "test", "global"):
        (out / name).mkdir(parents=True)
    (out / "metrics.csv").write_text("round\n1\n")
    (out / "notes.txt").write_text("the user's own file")
    write_marker(out, "pre")  # a run made this folder
    with pytest.raises(ValueError, match="already holds a run.*--overwrite"):
        preflight.claim_output(out, overwrite=False)
    assert (out / "metrics.csv").is_file()
    preflight.claim_output(out, overwrite=True).release()
    assert sorted(p.name for p in out.iterdir()) == [".fedicra-lock", ".fedicra-run", "notes.txt"]
    (out / "config.toml").write_text("")
    assert flower_runner.main(tiny_flags(tiny_federation, tmp_path / "model")) == 2
    assert "already holds a run" in capsys.readouterr().out


def test_a_busy_port_is_found_before_anything_is_written(tiny_federation, tmp_path, capsys):
    """Issue 19, finding 6: the runner used to write config.toml before finding the busy port,
    so the same command was then refused as a used folder."""
    import socket

    out_root = tmp_path / "model"
    base = free_base(8)
    # deployment: the worker port of client 1 (base + 4); simulation: the SuperLink's
    for mode, taken in (("deployment", base + 4), ("simulation", base)):
        with socket.socket() as busy:
            busy.bind(("127.0.0.1", taken))
            busy.listen()
            code = flower_runner.main(tiny_flags(tiny_federation, out_root, "--mode", mode,
                                                 "--port", str(base)))
        lines = [line for line in capsys.readouterr().out.splitlines() if "error" in line]
        assert code == 2 and len(lines) == 1, lines
        assert f"port {taken} on 127.0.0.1" in lines[0] and "already in use" in lines[0]
        assert not out_root.exists(), "nothing may be written before the port check"


def test_a_corrupt_case_file_is_named_before_anything_is_written(tiny_federation, tmp_path,
                                                                 capsys, monkeypatch):
    """Issue 19, finding 6: pre-flight opens every case's HDF5 header and names a bad file;
    a large site gets a progress line first."""
    import shutil

    import preflight

    data = tmp_path / "data"
    shutil.copytree(tiny_federation, data)
    out_root = tmp_path / "model"
    monkeypatch.setattr(preflight, "PROGRESS_CASES", 5, raising=False)  # every site is "large"
    bad = sorted((data / "Domain2" / "train").glob("*.h5"))[1]
    bad.write_bytes(bad.read_bytes()[:100])  # truncated: an interrupted copy
    assert flower_runner.main(tiny_flags(data, out_root)) == 2
    text = capsys.readouterr().out
    lines = [line for line in text.splitlines() if "error" in line]
    assert len(lines) == 1 and "--root_path: site 1 (train)" in lines[0], lines
    assert f"{bad}: not a readable HDF5 file" in lines[0]
    assert "checking the 8 case files of site 0" in text
    assert not out_root.exists()
    shutil.copy(sorted((data / "Domain1" / "test").glob("*.h5"))[0], bad)  # a test case: no weak label
    assert flower_runner.main(tiny_flags(data, out_root)) == 2
    line = [line for line in capsys.readouterr().out.splitlines() if "error" in line][0]
    assert str(bad) in line and "missing" in line
    assert not out_root.exists()


def test_dashes_and_underscores_are_both_accepted():
    args = flower_runner.parse_args(["--base-lr", "0.5", "--img-class", "faz", "--num_clients", "3",
                                     "--poll_interval", "0.2", "--stop-timeout", "3"])
    assert (args.base_lr, args.img_class, args.num_clients) == (0.5, "faz", 3)
    assert (args.poll_interval, args.stop_timeout) == (0.2, 3.0)


def test_help_lists_the_valid_names_of_every_registry(capsys):
    with pytest.raises(SystemExit):
        flower_runner.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for name in ("FedICRA", "FedAvg", "unet_lc_multihead", "pce_gatedcrf_mstree", "synthetic_faz"):
        assert name in text
