"""Every network declares at its registration what it offers (``NetworkInfo``), and the
declaration matches the built network: PCS gates, auxiliary heads, calibration head, the input
size multiple and the uncalibrated counterpart. Pre-flight reads the declarations, not names."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch import nn

import networks
import preflight
from configs import RunConfig
from networks.calibration import HeadCalibration
from networks.pcs import PersonalisedChannelSelection
from networks.registry import NetworkInfo, network_info, network_names, register_network

NAMES = network_names()
SITES = 3


def tiny(name: str) -> nn.Module:
    """``name`` built small (base 4 channels or EfficientNet-b0), site 1 of 3, eval mode."""
    torch.manual_seed(0)
    if name == "efficient_unet":
        opts = dict(encoder_name="efficientnet-b0", decoder_channels=(16, 8, 8, 4, 4))
    elif network_info(name).site_prompts:
        opts = dict(base_channels=4, img_size=32)
    else:
        opts = dict(base_channels=4, aux_channels=8, pcs_reduction=4)
    opts.update(num_sites=SITES, site=1)
    return networks.build(name, 1, 2, **opts).eval()


def _has(model: nn.Module, kind: type) -> bool:
    return any(isinstance(m, kind) for m in model.modules())


def _accepts(model: nn.Module, size: int) -> bool:
    try:
        with torch.no_grad():
            model(torch.randn(1, 1, size, size))
    except ValueError as err:
        assert "divisible by" in str(err), err
        return False
    return True


def assert_declaration_matches(name: str, info: NetworkInfo) -> None:
    """Fails (AssertionError) unless ``info`` describes the network registered as ``name``."""
    model = tiny(name)
    m = info.size_multiple
    size = m * math.ceil(32 / m)  # the smallest multiple of m from 32 px
    with torch.no_grad():
        out = model(torch.randn(1, 1, size, size))

    # site-conditioned channel selection: the gate module, its gates, a site code that matters
    assert _has(model, PersonalisedChannelSelection) == info.site_gates, "site_gates"
    assert (out.gates is not None) == info.site_gates, "site_gates"
    if info.site_gates:
        torch.manual_seed(1)
        x = torch.randn(1, 1, size, size)
        with torch.no_grad():
            assert not torch.equal(model(x, site=0).logits, model(x, site=2).logits), "site_gates"
    # auxiliary multi-scale heads
    assert (len(out.aux_logits) > 0) == info.aux_heads, "aux_heads"
    # FedLC's calibration head
    assert _has(model, HeadCalibration) == info.calibration_head, "calibration_head"
    assert hasattr(model, "calibrate") == info.calibration_head, "calibration_head"
    # the input size multiple: exactly m (3m is accepted, 3m/2 refused)
    assert getattr(model, "size_multiple", m) == m, "size_multiple"
    # FedLPPA's prompts: one per site, an auxiliary decoder, one input size (32 px here)
    assert (hasattr(model, "forward_train") and hasattr(model, "prompts")) == info.site_prompts, \
        "site_prompts"
    if info.site_prompts:
        assert model.prompts.distribution.shape[0] == SITES, "site_prompts"
        with pytest.raises(ValueError, match="built for 32x32"):
            model(torch.randn(1, 1, 2 * size, 2 * size))
        return
    assert _accepts(model, 3 * m), "size_multiple"
    assert not _accepts(model, 3 * m // 2), "size_multiple"
    # the same network without the calibration head
    if info.uncalibrated:
        assert info.calibration_head, "uncalibrated"
        plain = network_info(info.uncalibrated)
        assert plain == dataclasses.replace(info, calibration_head=False, uncalibrated=""), \
            "uncalibrated"
        keys = {k for k in model.state_dict() if not k.startswith("calib.")}
        assert keys == set(tiny(info.uncalibrated).state_dict()), "uncalibrated"


@pytest.mark.parametrize("name", NAMES)
def test_every_declaration_matches_the_built_network(name):
    assert_declaration_matches(name, network_info(name))


@pytest.mark.parametrize("name, field, value", [
    ("unet_lc_multihead_calib", "site_gates", False),
    ("unet_lc_multihead_calib", "aux_heads", False),
    ("unet_lc_multihead_calib", "calibration_head", False),
    ("unet_lc_multihead_calib", "size_multiple", 8),
    ("unet_lc_multihead_calib", "size_multiple", 32),
    ("unet_lc_multihead_calib", "uncalibrated", "unet_lc"),
    ("unet", "site_gates", True),
    ("unet", "aux_heads", True),
    ("unet", "calibration_head", True),
    ("unet", "uncalibrated", "unet"),
    ("efficient_unet", "size_multiple", 16),
    ("unet_lppa", "site_prompts", False),
    ("unet", "site_prompts", True),
])
def test_a_declaration_wrong_in_any_field_is_caught(name, field, value):
    info = dataclasses.replace(network_info(name), **{field: value})
    with pytest.raises(AssertionError, match=field):
        assert_declaration_matches(name, info)


def test_every_registered_network_declares_and_unknown_names_are_refused():
    assert {"unet", "unet_lc_multihead", "unet_lc_calib", "efficient_unet"} <= set(NAMES)
    assert all(isinstance(network_info(n), NetworkInfo) for n in NAMES)
    assert network_info("unet_lc_multihead") is networks.network_info("unet_lc_multihead")
    with pytest.raises(ValueError, match=r"unknown network 'resnet'; expected one of .*unet"):
        network_info("resnet")
    with pytest.raises(dataclasses.FrozenInstanceError):
        network_info("unet").site_gates = True  # type: ignore[misc]
    with pytest.raises(TypeError):
        register_network("no_info")  # type: ignore[call-arg]
    with pytest.raises(ValueError, match="size_multiple"):
        NetworkInfo(size_multiple=0)


def test_networks_import_no_flower():
    import subprocess
    import sys

    from conftest import REPO

    code = ("import sys, networks; bad = sorted(m for m in sys.modules if m.split('.')[0] == 'flwr');"
            " print(bad); sys.exit(bool(bad))")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


# ---------------------------------------------------------------------- pre-flight
def _cfg(name: str, **values) -> RunConfig:
    info = network_info(name)
    values.setdefault("strategy", "FedLC" if info.calibration_head else "FedAvg")
    values.setdefault("procedure", "pce")
    return RunConfig(model=name, num_clients=3, **values)


@pytest.mark.parametrize("name", NAMES)
def test_preflight_refuses_a_bad_image_size_naming_the_declared_multiple(name):
    m = network_info(name).size_multiple
    preflight.check_names(_cfg(name, img_size=2 * m))  # a multiple: accepted
    with pytest.raises(preflight.PreflightError,
                       match=rf"^--img_size: {3 * m // 2} px: network '{name}' needs a multiple "
                             rf"of {m}$"):
        preflight.check_names(_cfg(name, img_size=3 * m // 2))


def test_preflight_reads_the_declaration_not_the_name(monkeypatch):
    from networks import registry

    declared = dict(registry._INFO)
    # a plain U-Net declared with a coarser size multiple and auxiliary heads
    monkeypatch.setitem(registry._INFO, "unet",
                        dataclasses.replace(declared["unet"], size_multiple=64, aux_heads=True))
    with pytest.raises(preflight.PreflightError, match=r"^--img_size: 96 px: .*multiple of 64$"):
        preflight.check_names(_cfg("unet", img_size=96))
    preflight.check_names(_cfg("unet", img_size=128, procedure="pce_mstree"))
    # a FedICRA network declared without gates and heads
    monkeypatch.setitem(registry._INFO, "unet_lc_multihead",
                        NetworkInfo(size_multiple=16))
    with pytest.raises(preflight.PreflightError, match=r"^--procedure: .*site gates \(unet_lc"):
        preflight.check_names(_cfg("unet_lc_multihead", procedure="pce_sc"))
    with pytest.raises(preflight.PreflightError, match=r"^--procedure: .*auxiliary heads \("):
        preflight.check_names(_cfg("unet_lc_multihead", procedure="pce_mstree"))
    # a calibrated network declared without its head: any method may run it
    monkeypatch.setitem(registry._INFO, "unet_lc_calib",
                        dataclasses.replace(declared["unet_lc_calib"], calibration_head=False))
    preflight.check_names(_cfg("unet_lc_calib", strategy="FedAvg"))


def test_preflight_names_the_networks_that_offer_what_is_missing():
    with pytest.raises(preflight.PreflightError) as err:
        preflight.check_names(_cfg("unet", procedure="pce_mstree"))
    offering = [n for n in NAMES if network_info(n).aux_heads]
    assert f"auxiliary heads ({', '.join(offering)})" in str(err.value)
    with pytest.raises(preflight.PreflightError, match=r"^--model: 'unet_lc_multihead_calib'.*"
                                                       r"or 'unet_lc_multihead' with FedAvg$"):
        preflight.check_names(_cfg("unet_lc_multihead_calib", strategy="FedAvg"))


def test_no_module_guesses_what_a_network_offers_from_its_name():
    """Outside the tests, nothing reads 'multihead', '_lc', '_calib' or 'efficient' off a
    network's name: what a network offers is its declaration."""
    import re

    from conftest import REPO

    guesses = re.compile(
        r"""["'](?:_?lc_?|_?multihead_?|_?calib|efficient_?\w*)["']\s+(?:not\s+)?in\s"""
        r"""|\.(?:endswith|startswith)\(\s*["'](?:_?lc|_?multihead|_calib|unet_lc|efficient)"""
        r"""|model\s*[!=]=\s*["']\w+["']|model\[:-\d+\]""")
    offenders = []
    for path in REPO.rglob("*.py"):
        rel = path.relative_to(REPO)
        if rel.parts[0] in (".venv", "test", "build"):
            continue
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if guesses.search(line):
                offenders.append(f"{rel}:{number}: {line.strip()}")
    assert not offenders, offenders
