"""Loss terms: partial cross-entropy, gated CRF, site-contrastive."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import networks
from losses import gated_crf_loss, partial_cross_entropy, site_contrastive_loss


# ---------------------------------------------------------------- partial cross-entropy


def test_pce_matches_cross_entropy_with_ignore_index():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 4, 7, 5, generator=g, dtype=torch.float64)
    label = torch.randint(0, 5, (3, 7, 5), generator=g)  # 4 = unlabelled
    expected = F.cross_entropy(logits, label, ignore_index=4)
    assert torch.allclose(partial_cross_entropy(logits, label, ignore_index=4), expected)


def test_pce_is_zero_without_labelled_pixels():
    logits = torch.randn(2, 3, 4, 4, requires_grad=True)
    label = torch.full((2, 4, 4), 3, dtype=torch.long)
    loss = partial_cross_entropy(logits, label, ignore_index=3)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))


@pytest.mark.parametrize(
    "logits_shape,label,match",
    [
        ((2, 3, 4, 4), torch.zeros(2, 4, 5, dtype=torch.long), "shape"),
        ((2, 3, 4, 4), torch.zeros(2, 4, 4), "integer"),
        ((2, 3, 4, 4), torch.full((2, 4, 4), 5, dtype=torch.long), "label values"),
        ((2, 3, 4, 4), torch.full((2, 4, 4), -1, dtype=torch.long), "label values"),
        ((3, 4, 4), torch.zeros(3, 4, 4, dtype=torch.long), "logits"),
    ],
)
def test_pce_validates_inputs(logits_shape, label, match):
    with pytest.raises(ValueError, match=match):
        partial_cross_entropy(torch.randn(*logits_shape), label, ignore_index=3)


# ---------------------------------------------------------------- gated CRF


def naive_gated_crf(probs, image, sigma_xy, sigma_rgb, radius, downsample=1):
    """Per-pixel double loop over the formula (float64 reference)."""
    if downsample > 1:
        probs = F.avg_pool2d(probs, downsample)
        image = F.avg_pool2d(image, downsample)
    b, _, h, w = probs.shape
    total = probs.new_zeros(())
    for n in range(b):
        for yi in range(h):
            for xi in range(w):
                for yj in range(max(0, yi - radius), min(h, yi + radius + 1)):
                    for xj in range(max(0, xi - radius), min(w, xi + radius + 1)):
                        if (yi, xi) == (yj, xj):
                            continue
                        dist2 = ((yi - yj) ** 2 + (xi - xj) ** 2) * downsample**2
                        col2 = ((image[n, :, yi, xi] - image[n, :, yj, xj]) ** 2).sum()
                        k = torch.exp(-dist2 / (2 * sigma_xy**2) - col2 / (2 * sigma_rgb**2))
                        total = total + k * (1 - (probs[n, :, yi, xi] * probs[n, :, yj, xj]).sum())
    return total / (b * h * w)


@pytest.mark.parametrize(
    "size,radius,downsample",
    [((5, 6), 2, 1), ((5, 6), 1, 1), ((4, 3), 5, 1), ((6, 8), 1, 2)],
)
def test_gated_crf_matches_naive_double_loop(size, radius, downsample):
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 3, *size, generator=g, dtype=torch.float64)
    image = torch.rand(2, 2, *size, generator=g, dtype=torch.float64)
    probs = logits.softmax(1).requires_grad_(True)
    kwargs = dict(sigma_xy=1.5, sigma_rgb=0.4, radius=radius, downsample=downsample)
    fast = gated_crf_loss(probs, image, **kwargs)
    (grad_fast,) = torch.autograd.grad(fast, probs)
    slow = naive_gated_crf(probs, image, **kwargs)
    (grad_slow,) = torch.autograd.grad(slow, probs)
    assert fast.dtype == torch.float64
    assert torch.allclose(fast, slow, rtol=1e-10, atol=1e-12)
    assert torch.allclose(grad_fast, grad_slow, rtol=1e-10, atol=1e-12)
    with torch.no_grad():
        assert torch.allclose(gated_crf_loss(probs, image, **kwargs), slow)


def test_gated_crf_default_bandwidths_and_float32():
    g = torch.Generator().manual_seed(2)
    probs = torch.randn(2, 2, 5, 6, generator=g, dtype=torch.float64).softmax(1)
    image = torch.rand(2, 1, 5, 6, generator=g, dtype=torch.float64) * 0.2
    expected = naive_gated_crf(probs, image, 6.0, 0.1, 2)
    value = gated_crf_loss(probs.float(), image.float(), radius=2)
    assert value.dtype == torch.float32
    assert math.isclose(value.item(), expected.item(), rel_tol=1e-5)


def test_gated_crf_is_zero_for_constant_one_hot_prediction():
    probs = torch.zeros(1, 2, 8, 8)
    probs[:, 1] = 1
    assert gated_crf_loss(probs, torch.rand(1, 3, 8, 8)).item() == 0.0


@pytest.mark.parametrize(
    "probs_shape,image_shape,kwargs,match",
    [
        ((2, 2, 8, 8), (2, 1, 8, 9), {}, "spatial"),
        ((2, 2, 8, 8), (1, 1, 8, 8), {}, "batch"),
        ((2, 8, 8), (2, 1, 8, 8), {}, "shape"),
        ((2, 2, 8, 8), (2, 1, 8, 8), {"radius": 0}, "radius"),
        ((2, 2, 8, 8), (2, 1, 8, 8), {"downsample": 3}, "divisible"),
        ((2, 2, 8, 8), (2, 1, 8, 8), {"sigma_rgb": 0.0}, "sigma"),
    ],
)
def test_gated_crf_validates_inputs(probs_shape, image_shape, kwargs, match):
    with pytest.raises(ValueError, match=match):
        gated_crf_loss(torch.rand(*probs_shape), torch.rand(*image_shape), **kwargs)


# ---------------------------------------------------------------- site-contrastive


def _lc_model(num_sites=4, site=0):
    torch.manual_seed(0)
    return networks.build(
        "unet_lc", 1, 2, base_channels=4, num_sites=num_sites, site=site, pcs_reduction=4, dropout=None
    )


def _bn_buffers(model):
    return {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}


@pytest.mark.parametrize("site", [0, 2])
def test_site_contrastive_value_and_gradients(site):
    num_sites = 4
    model = _lc_model(num_sites, site)
    x = torch.randn(2, 1, 32, 32)
    out = model(x)
    buffers = _bn_buffers(model)
    loss = site_contrastive_loss(model, out, site, num_sites)
    assert _bn_buffers(model).keys() == buffers.keys()
    for k, v in _bn_buffers(model).items():
        assert torch.equal(v, buffers[k]), f"{k} changed by the loss"

    # Manual value: mean over the OTHER sites of MSE(own gate, detached other gate).
    with torch.no_grad():
        others = [model.pcs.gate(out.features, j) for j in range(num_sites) if j != site]
        own = model.pcs.gate(out.features, site)
    assert torch.allclose(own, out.gates)
    expected = -sum(F.mse_loss(out.gates.detach(), o) for o in others) / (num_sites - 1)
    assert torch.allclose(loss, expected)
    assert loss.item() < 0

    # Gradients equal those of the manual loss with detached targets: other gates carry none.
    params = [p for p in model.parameters()]
    manual = -sum(F.mse_loss(out.gates, o) for o in others) / (num_sites - 1)
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    grads_manual = torch.autograd.grad(manual, params, allow_unused=True)
    for (name, _), ga, gb in zip(model.named_parameters(), grads, grads_manual):
        if gb is None:
            assert ga is None or torch.count_nonzero(ga) == 0, name
        else:
            assert torch.allclose(ga, gb, atol=1e-12), name
    pcs_grads = [g for (n, _), g in zip(model.named_parameters(), grads) if n.startswith("pcs.")]
    assert all(g is not None and g.abs().sum() > 0 for g in pcs_grads)
    enc_grad = dict(zip([n for n, _ in model.named_parameters()], grads))["encoder.in_conv.0.weight"]
    assert enc_grad is not None and enc_grad.abs().sum() > 0
    dec_grad = dict(zip([n for n, _ in model.named_parameters()], grads))["decoder.up1.up.weight"]
    assert dec_grad is None or torch.count_nonzero(dec_grad) == 0


def test_site_contrastive_compares_with_other_sites_only():
    """Regression for the reference bug where site 0 compared its code with itself."""
    model = _lc_model(num_sites=2, site=0)
    out = model(torch.randn(2, 1, 32, 32))
    with torch.no_grad():
        other = model.site_gates(out.features, 1)
    loss = site_contrastive_loss(model, out, 0, 2)
    assert torch.allclose(loss, -F.mse_loss(out.gates, other))
    assert loss.item() < 0


def test_site_contrastive_eval_mode_and_single_site():
    model = _lc_model(num_sites=1, site=0).eval()
    out = model(torch.randn(1, 1, 32, 32))
    loss = site_contrastive_loss(model, out, 0, 1)
    assert loss.item() == 0.0 and loss.requires_grad


def test_site_contrastive_validates_inputs():
    model = _lc_model(num_sites=3, site=1)
    out = model(torch.randn(1, 1, 32, 32))
    for bad in (-1, 3):
        with pytest.raises(ValueError, match="site"):
            site_contrastive_loss(model, out, bad, 3)
    plain = networks.build("unet", 1, 2, base_channels=4)
    with pytest.raises(ValueError, match="gates"):
        site_contrastive_loss(plain, plain(torch.randn(1, 1, 32, 32)), 0, 3)
