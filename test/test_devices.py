"""One GPU detection (configs/devices.py): which device a trainer or test takes, which GPU ids
exist, and no other module of the project asks CUDA itself."""
from __future__ import annotations

import logging
import re

import pytest
import torch

import preflight
from configs import devices
from conftest import REPO


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)


@pytest.fixture
def two_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)


def test_an_explicit_device_is_taken_as_is(no_cuda):
    assert devices.pick_device("cpu") == torch.device("cpu")
    assert devices.pick_device("cuda:1", gpus=[0]) == torch.device("cuda:1")
    assert devices.pick_device(torch.device("cpu")) == torch.device("cpu")


def test_without_cuda_everything_runs_on_the_cpu_with_a_warning_for_gpus(no_cuda, caplog):
    logger = logging.getLogger("test.devices")
    assert devices.available_gpus() == []
    assert devices.pick_device() == torch.device("cpu")
    with caplog.at_level(logging.WARNING, logger="test.devices"):
        assert devices.pick_device(gpus=[1], logger=logger) == torch.device("cpu")
        assert devices.usable_gpus([0, 1], logger) == []
    assert [r.getMessage() for r in caplog.records] == [
        "--gpus [1] given but CUDA is not available: training on the CPU",
        "--gpus [0, 1] given but CUDA is not available: training on the CPU"]
    assert devices.usable_gpus([], logger) == []
    with pytest.raises(preflight.PreflightError, match=r"^--gpus: GPU ids \[0\] do not exist: "
                                                       r"this machine has no CUDA GPU"):
        preflight.check_gpus([0])
    preflight.check_gpus([])


def test_with_cuda_the_first_given_gpu_or_the_default_device(two_gpus):
    assert devices.available_gpus() == [0, 1]
    assert devices.pick_device() == torch.device("cuda")
    assert devices.pick_device(gpus=[1, 0]) == torch.device("cuda:1")
    assert devices.usable_gpus([1]) == [1]
    preflight.check_gpus([0, 1])
    with pytest.raises(preflight.PreflightError,
                       match=r"^--gpus: GPU ids \[2\] do not exist: this machine has 2 "
                             r"\(ids 0\.\.1\)$"):
        preflight.check_gpus([1, 2])


def test_the_launcher_pins_gpus_only_where_a_driver_is(monkeypatch, caplog):
    from deployment import launch

    monkeypatch.setattr(devices.shutil, "which", lambda name: None)
    monkeypatch.setattr(devices, "Path", lambda p: type("P", (), {"exists": lambda self: False})())
    assert not devices.nvidia_driver_present()
    with caplog.at_level(logging.WARNING, logger="fedicra.deploy"):
        assert launch._visible_gpus([0, 1]) == []
    monkeypatch.setattr(devices.shutil, "which", lambda name: f"/usr/bin/{name}")
    assert devices.nvidia_driver_present()
    assert launch._visible_gpus([0, 1]) == [0, 1]
    assert launch._visible_gpus([]) == []


def test_no_other_module_asks_cuda_which_devices_exist():
    # (preflight's message quotes "torch.cuda.device_count() = 0": not a call)
    asks = re.compile(r"cuda\.is_available\(|cuda\.device_count\(\)(?! = 0)|nvidia-smi")
    offenders = []
    for path in REPO.rglob("*.py"):
        rel = path.relative_to(REPO)
        if rel.parts[0] in (".venv", "test", "benchmarks", "build") or \
                rel.as_posix() == "configs/devices.py":
            continue
        if asks.search(path.read_text(encoding="utf-8", errors="replace")):
            offenders.append(rel.as_posix())
    assert not offenders, offenders
