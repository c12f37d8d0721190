"""Multiscale tree energy loss: invariants, brute-force equality, gradients, edge cases."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from losses.tree_energy import MultiscaleTreeEnergyLoss, multiscale_tree_energy_loss
from losses.tree_filter import tree_filter

try:
    from test_tree_filter import brute_force_tree_filter
except ImportError:  # test/ imported as a package
    from test.test_tree_filter import brute_force_tree_filter

UNLABELLED = 2


def _case(batch=2, k=2, height=8, width=7, channels=1, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, k, height, width, generator=g, dtype=dtype)
    image = torch.rand(batch, channels, height, width, generator=g, dtype=dtype)
    aux = [
        torch.randn(batch, k, max(height // s, 1), max(width // s, 1), generator=g, dtype=dtype)
        for s in (4, 2, 1)
    ]
    label = torch.randint(0, k + 1, (batch, height, width), generator=g)
    return logits, image, aux, label


def test_equals_brute_force_cascade():
    logits, image, aux, label = _case()
    probs = torch.softmax(logits, 1)
    loss = multiscale_tree_energy_loss(probs, image, aux, label, UNLABELLED, sigma_low=0.05, sigma_high=0.7)

    pseudo = brute_force_tree_filter(probs, image, 0.05)  # the +1 image cost offset changes no tree
    for a in aux:
        pseudo = brute_force_tree_filter(pseudo, F.interpolate(a, size=probs.shape[2:], mode="bilinear", align_corners=False), 0.7)
    mask = label == UNLABELLED
    expected = (probs - pseudo).abs().sum(1)[mask].sum() / mask.sum()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-10)


def test_unnormalised_probs_use_the_general_filter():
    """Inputs off the simplex must not use the channel-sum normaliser."""
    logits, image, aux, label = _case(seed=7)
    probs = 0.5 * torch.softmax(logits, 1)
    loss = multiscale_tree_energy_loss(probs, image, aux[:1], label, UNLABELLED, sigma_low=0.05, sigma_high=0.7)
    pseudo = brute_force_tree_filter(probs, image, 0.05)
    pseudo = brute_force_tree_filter(pseudo, F.interpolate(aux[0], size=probs.shape[2:], mode="bilinear", align_corners=False), 0.7)
    mask = label == UNLABELLED
    assert loss.item() == pytest.approx(((probs - pseudo).abs().sum(1)[mask].sum() / mask.sum()).item(), rel=1e-10)


def test_without_aux_heads_uses_image_tree_only():
    logits, image, _, label = _case(seed=1, channels=3)
    probs = torch.softmax(logits, 1)
    loss = multiscale_tree_energy_loss(probs, image, [], label, UNLABELLED)
    mask = label == UNLABELLED
    expected = (probs - tree_filter(probs, image, 0.02, cost_offset=1.0)).abs().sum(1)[mask].mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-12)


def test_constant_one_hot_prediction_gives_zero():
    _, image, aux, label = _case(seed=2)
    probs = torch.zeros(2, 2, 8, 7, dtype=torch.float64)
    probs[:, 1] = 1.0
    loss = multiscale_tree_energy_loss(probs, image, aux, label, UNLABELLED)
    assert loss.item() == pytest.approx(0.0, abs=1e-12)


def test_gradients_reach_probs_and_aux_heads():
    logits, image, aux, label = _case(seed=3, dtype=torch.float32)
    logits.requires_grad_()
    for a in aux:
        a.requires_grad_()
    loss = multiscale_tree_energy_loss(torch.softmax(logits, 1), image, aux, label, UNLABELLED, sigma_high=1.0)
    loss.backward()
    assert torch.isfinite(loss)
    assert logits.grad is not None and logits.grad.abs().sum() > 0
    for a in aux:
        assert a.grad is not None and a.grad.abs().sum() > 0


def test_no_unlabelled_pixels_gives_zero_not_nan():
    logits, image, aux, _ = _case(seed=4, dtype=torch.float32)
    logits.requires_grad_()
    label = torch.zeros(2, 8, 7, dtype=torch.long)
    loss = multiscale_tree_energy_loss(torch.softmax(logits, 1), image, aux, label, UNLABELLED)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))


def test_module_and_scipy_backend_agree():
    logits, image, aux, label = _case(seed=5, height=12, width=9, dtype=torch.float32)
    probs = torch.softmax(logits, 1)
    module = MultiscaleTreeEnergyLoss(sigma_low=0.02, sigma_high=1.0)
    ref = MultiscaleTreeEnergyLoss(backend="scipy")
    assert module(probs, image, aux, label, UNLABELLED).item() == pytest.approx(
        ref(probs, image, aux, label, UNLABELLED).item(), rel=1e-5
    )
    assert "sigma_low=0.02" in repr(module)


def test_shape_validation():
    logits, image, aux, label = _case(seed=6)
    probs = torch.softmax(logits, 1)
    with pytest.raises(ValueError, match="label"):
        multiscale_tree_energy_loss(probs, image, aux, label[:, None], UNLABELLED)
    with pytest.raises(ValueError, match="image"):
        multiscale_tree_energy_loss(probs, image[:, :, :-1], aux, label, UNLABELLED)
    with pytest.raises(ValueError, match="aux_logits"):
        multiscale_tree_energy_loss(probs, image, [aux[0][:1]], label, UNLABELLED)
    with pytest.raises(ValueError, match="probs"):
        multiscale_tree_energy_loss(probs[0], image, aux, label, UNLABELLED)
