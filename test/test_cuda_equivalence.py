"""CPU and CUDA give the same networks outputs and loss values/gradients (skipped without CUDA)."""
from __future__ import annotations

import copy

import pytest
import torch

import networks
from losses import ObjectiveConfig, WeakObjective, gated_crf_loss, partial_cross_entropy

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available")

CUDA = torch.device("cuda")


@pytest.fixture(autouse=True)
def _exact_cuda_math():
    """TF32 would make CUDA convolutions differ from CPU by ~1e-3; compare full float32."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _tiny(name):
    torch.manual_seed(0)
    if name == "efficient_unet":
        opts = dict(encoder_name="efficientnet-b0", decoder_channels=(16, 8, 8, 4, 4))
    else:
        opts = dict(base_channels=4, aux_channels=8, num_sites=3, site=1, pcs_reduction=4, dropout=None)
    return networks.build(name, 1, 2, **opts)


def _close(a, b, tol=1e-4):
    return torch.allclose(a.detach().cpu(), b.detach().cpu(), rtol=tol, atol=tol)


@pytest.mark.parametrize("name", sorted(networks.network_names()))
@pytest.mark.parametrize("train", [False, True])
def test_network_cpu_cuda(name, train):
    cpu = _tiny(name).train(train)
    if train:  # no random masks in train mode: dropout of the aux heads, drop-connect
        for m in cpu.modules():
            if isinstance(m, torch.nn.Dropout2d):
                m.p = 0.0
        if name == "efficient_unet":
            params = cpu.encoder._global_params
            cpu.encoder._global_params = params._replace(drop_connect_rate=None)
    gpu = copy.deepcopy(cpu).to(CUDA)
    x = torch.randn(2, 1, 32, 64)
    a, b = cpu(x), gpu(x.to(CUDA))
    assert b.logits.device.type == "cuda"
    assert _close(a.logits, b.logits)
    for u, v in zip(a.aux_logits, b.aux_logits):
        assert _close(u, v)
    if a.gates is not None:
        assert _close(a.gates, b.gates)
        assert _close(cpu.site_gates(a.features, 0), gpu.site_gates(b.features, 0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("downsample", [1, 2])
def test_gated_crf_cpu_cuda(dtype, downsample):
    g = torch.Generator().manual_seed(0)
    probs = torch.randn(3, 3, 24, 20, generator=g, dtype=dtype).softmax(1)
    image = torch.rand(3, 3, 24, 20, generator=g, dtype=dtype)
    results = []
    for device in ("cpu", "cuda"):
        p = probs.to(device).requires_grad_(True)
        loss = gated_crf_loss(p, image.to(device), downsample=downsample)
        (grad,) = torch.autograd.grad(loss, p)
        results.append((loss, grad))
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    assert _close(results[0][0], results[1][0], tol)
    assert _close(results[0][1], results[1][1], tol)


def test_pce_cpu_cuda():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 16, 16, generator=g)
    label = torch.randint(0, 4, (2, 16, 16), generator=g)
    a = partial_cross_entropy(logits, label, 3)
    b = partial_cross_entropy(logits.to(CUDA), label.to(CUDA), 3)
    assert _close(a, b, 1e-6)
    empty = torch.full((2, 16, 16), 3, device=CUDA)
    assert partial_cross_entropy(logits.to(CUDA), empty, 3).item() == 0.0


def _objective_terms(model, device, procedure_cfg):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    image = torch.rand(2, 1, 32, 32, generator=g).to(device)
    label = torch.randint(0, 3, (2, 32, 32), generator=g).to(device)
    out = model(image)
    result = WeakObjective(procedure_cfg)(model, out, image, label, site=1, num_sites=3)
    result.total.backward()
    grads = {n: p.grad.detach().cpu() for n, p in model.named_parameters() if p.grad is not None}
    return result, grads


def test_objective_cpu_cuda():
    cfg = ObjectiveConfig("pce_gatedcrf_mstree", lambda_tree=0.0, crf_radius=3, sc_grad=True)
    cpu = _tiny("unet_lc_multihead")
    gpu = copy.deepcopy(cpu).to(CUDA)
    ra, ga = _objective_terms(cpu, "cpu", cfg)
    rb, gb = _objective_terms(gpu, CUDA, cfg)
    assert ra.terms.keys() == rb.terms.keys()
    for k in ra.terms:
        assert ra.terms[k] == pytest.approx(rb.terms[k], rel=1e-4, abs=1e-6), k
    assert ga.keys() == gb.keys()
    for n in ga:
        assert _close(ga[n], gb[n], 1e-3), n


def test_full_objective_cpu_cuda():
    pytest.importorskip("losses.tree_energy")
    cfg = ObjectiveConfig("pce_gatedcrf_mstree", crf_radius=3, sc_grad=True)
    cpu = _tiny("unet_lc_multihead")
    gpu = copy.deepcopy(cpu).to(CUDA)
    ra, _ = _objective_terms(cpu, "cpu", cfg)
    rb, _ = _objective_terms(gpu, CUDA, cfg)
    for k in ra.terms:
        assert ra.terms[k] == pytest.approx(rb.terms[k], rel=1e-4, abs=1e-6), k


def test_tree_filter_cpu_cuda():
    tf = pytest.importorskip("losses.tree_filter")
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 12, 10, generator=g, dtype=torch.float64)
    guide = torch.rand(2, 2, 12, 10, generator=g, dtype=torch.float64)
    a = tf.tree_filter(x, guide, 0.5)
    b = tf.tree_filter(x.to(CUDA), guide.to(CUDA), 0.5)
    assert b.device.type == "cuda"
    assert _close(a, b, 1e-10)
