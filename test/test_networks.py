"""Networks: shapes, input-size checks, PCS registration and gates, parameter groups."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import networks
from networks import SegOutput, parameter_groups, select_keys

NAMES = ("unet", "unet_multihead", "unet_lc", "unet_lc_multihead", "efficient_unet")
PARTITION = ("encoder", "pcs", "decoder", "out_conv", "aux")


def tiny(name: str, in_chns: int = 1, num_classes: int = 2, **extra) -> nn.Module:
    torch.manual_seed(0)
    if name == "efficient_unet":
        opts = dict(encoder_name="efficientnet-b0", decoder_channels=(16, 8, 8, 4, 4))
    else:
        opts = dict(base_channels=4, aux_channels=8, num_sites=3, site=1, pcs_reduction=4)
    opts.update(extra)
    return networks.build(name, in_chns, num_classes, **opts)


def test_registry_lists_every_network():
    assert set(NAMES) <= set(networks.network_names())
    with pytest.raises(ValueError, match="unknown network"):
        networks.build("no_such_net", 1, 2)


@pytest.mark.parametrize("name", NAMES)
def test_output_shapes(name):
    model = tiny(name, in_chns=3, num_classes=2)
    out = model(torch.randn(2, 3, 32, 32))
    assert isinstance(out, SegOutput)
    assert out.logits.shape == (2, 2, 32, 32)
    assert out.decoder_features is not None and out.decoder_features.shape[-2:] == (32, 32)
    if name.endswith("multihead"):
        assert [a.shape for a in out.aux_logits] == [(2, 2, 8, 8), (2, 2, 16, 16), (2, 2, 32, 32)]
    else:
        assert out.aux_logits == ()
    if name.startswith("unet"):
        assert out.features.shape == (2, 64, 2, 2)
    if name.startswith("unet_lc"):
        assert out.gates.shape == (2, 64, 1, 1)
        assert bool(((out.gates > 0) & (out.gates < 1)).all())
    else:
        assert out.gates is None


@pytest.mark.parametrize("name,size,multiple", [("unet", 40, 16), ("unet_lc", 24, 16), ("efficient_unet", 48, 32)])
def test_sizes_not_divisible_are_rejected(name, size, multiple):
    model = tiny(name)
    with pytest.raises(ValueError, match=rf"{size}x{size}.*divisible by {multiple}"):
        model(torch.randn(1, 1, size, size))


def test_non_square_input():
    out = tiny("unet_lc_multihead")(torch.randn(1, 1, 32, 48))
    assert out.logits.shape == (1, 2, 32, 48)
    assert out.aux_logits[0].shape == (1, 2, 8, 12)


def test_pcs_is_registered_and_trains():
    model = tiny("unet_lc_multihead")
    pcs_keys = [k for k in model.state_dict() if k.startswith("pcs.")]
    assert pcs_keys, "PCS parameters must be in the state_dict"
    pcs_params = [p for n, p in model.named_parameters() if n.startswith("pcs.")]
    assert len(pcs_params) == len(pcs_keys) == 4
    out = model(torch.randn(2, 1, 32, 32))
    out.logits.square().mean().backward()
    for p in pcs_params:
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_gates_depend_on_site_code_and_site_is_mutable():
    # Train mode (batch statistics) keeps features O(1) at initialisation; no dropout.
    model = tiny("unet_lc", num_sites=3, site=0, dropout=None)
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        out0 = model(x)
        gates = [model.site_gates(out0.features, s) for s in range(3)]
        assert torch.allclose(gates[0], out0.gates)
        assert not torch.allclose(gates[0], gates[1])
        assert not torch.allclose(gates[1], gates[2])
        model.site = 2
        out2 = model(x)
        assert torch.allclose(out2.gates, gates[2])
        assert torch.allclose(out2.features, out0.features)
        assert not torch.allclose(out2.logits, out0.logits)
        assert torch.allclose(model(x, site=0).logits, out0.logits)
    with pytest.raises(ValueError, match="site"):
        model.site = 3
    with pytest.raises(ValueError, match="site"):
        model.site_gates(out0.features, -1)
    with pytest.raises(ValueError, match="site"):
        tiny("unet_lc", num_sites=2, site=2)


def test_site_gates_needs_pcs():
    with pytest.raises(ValueError, match="channel selection"):
        tiny("unet").site_gates(torch.randn(1, 64, 2, 2), 0)


def test_dropout_can_be_disabled():
    model = tiny("unet", dropout=None)
    assert all(m.p == 0 for m in model.modules() if isinstance(m, nn.Dropout))
    default = tiny("unet")
    ps = [m.p for m in default.encoder.modules() if isinstance(m, nn.Dropout)]
    assert ps == [0.05, 0.1, 0.2, 0.3, 0.5]
    assert all(m.p == 0 for m in default.decoder.modules() if isinstance(m, nn.Dropout))
    with pytest.raises(ValueError, match="dropout"):
        tiny("unet", dropout=(0.1, 0.2))


def _bn_keys_reference(model: nn.Module):
    keys = []
    for key in model.state_dict():
        owner = model.get_submodule(key.rsplit(".", 1)[0])
        if isinstance(owner, nn.BatchNorm2d):
            keys.append(key)
    return keys


@pytest.mark.parametrize("name", NAMES)
def test_parameter_groups_partition_state_dict(name):
    model = tiny(name)
    keys = list(model.state_dict())
    groups = parameter_groups(model)
    assert set(groups) == set(PARTITION) | {"bn"}
    seen = [k for g in PARTITION for k in groups[g]]
    assert sorted(seen) == sorted(keys), "every key in exactly one partition group"
    assert len(seen) == len(set(seen))
    assert bool(groups["pcs"]) == name.startswith("unet_lc")
    assert bool(groups["aux"]) == name.endswith("multihead")
    assert groups["encoder"] and groups["decoder"] and groups["out_conv"]
    assert groups["out_conv"] == ["out_conv.weight", "out_conv.bias"]
    assert groups["bn"] == _bn_keys_reference(model)
    assert any(k.endswith("num_batches_tracked") for k in groups["bn"])
    assert parameter_groups(model) == groups  # pure function


def test_select_keys():
    model = tiny("unet_lc_multihead")
    keys = list(model.state_dict())
    groups = parameter_groups(model)
    not_bn = select_keys(model, ["all"], ["bn"])
    assert not_bn == [k for k in keys if k not in set(groups["bn"])]
    enc_dec = select_keys(model, ["decoder", "encoder"], [])
    assert enc_dec == [k for k in keys if k.startswith(("encoder.", "decoder."))]
    assert select_keys(model, ["pcs"], None) == groups["pcs"]
    with pytest.raises(ValueError, match="unknown parameter groups"):
        select_keys(model, ["head"], [])


def test_efficient_unet_loads_local_weights(tmp_path):
    from efficientnet_pytorch import EfficientNet

    torch.manual_seed(1)
    reference = EfficientNet.from_name("efficientnet-b0", in_channels=3)
    path = tmp_path / "b0.pth"
    torch.save(reference.state_dict(), path)
    model = tiny("efficient_unet", in_chns=1, weights_path=str(path))
    stem = reference.state_dict()["_conv_stem.weight"].sum(1, keepdim=True)
    assert torch.equal(model.state_dict()["encoder._conv_stem.weight"], stem)
    assert torch.equal(
        model.state_dict()["encoder._blocks.3._bn1.running_var"],
        reference.state_dict()["_blocks.3._bn1.running_var"],
    )
    assert not any(k.startswith(("encoder._fc", "encoder._conv_head")) for k in model.state_dict())
    with pytest.raises(FileNotFoundError):
        tiny("efficient_unet", weights_path=str(tmp_path / "missing.pth"))
