"""Reference-fidelity switches: grey image tree as RGB, rotation augmentation, FedALA's
stopping rule and ``layer_idx``, and the site term without gradient."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import networks
from clients.ala import AdaptiveAggregator
from clients.rules.ala import split_shared
from clients.trainer import SiteTrainer
from conftest import tiny_run_config
from dataloaders import augment
from dataloaders.augment import random_angle, random_augment, rotate
from dataloaders.dataset import SiteDataset
from dataloaders.tasks import get_task
from losses import ObjectiveConfig, WeakObjective, site_contrastive_loss
from losses.tree_energy import low_level_guide, multiscale_tree_energy_loss
from losses.tree_filter import build_tree, tree_edge_weights

UNLABELLED = 2
ALL = "encoder,pcs,decoder,out_conv,aux"


# ---------------------------------------------------------------- 1. grey image tree as RGB

def _tree_case(seed=0, size=12):
    g = torch.Generator().manual_seed(seed)
    probs = torch.softmax(torch.randn(2, 2, size, size, generator=g, dtype=torch.float64), 1)
    image = torch.rand(2, 1, size, size, generator=g, dtype=torch.float64)
    aux = [torch.randn(2, 2, size // s, size // s, generator=g, dtype=torch.float64) for s in (4, 2, 1)]
    label = torch.randint(0, 3, (2, size, size), generator=g)
    return probs, image, aux, label


def test_grey_image_tree_has_the_weights_of_the_image_repeated_to_rgb():
    _, image, _, _ = _tree_case()
    guide = low_level_guide(image, gray_as_rgb=True)
    rgb = image.repeat(1, 3, 1, 1)
    tree, _ = build_tree(guide, 1.0)
    tree_rgb, _ = build_tree(rgb, 1.0)
    assert torch.equal(tree.parent, tree_rgb.parent)
    scaled, _ = tree_edge_weights(guide, tree, 0.02)
    scaled_rgb, _ = tree_edge_weights(rgb, tree_rgb, 0.02)
    assert torch.equal(scaled, scaled_rgb)
    # on the same tree the 1-channel weights are exp(-|dI|^2 / sigma), the RGB ones exp(-3 |dI|^2 / sigma)
    grey, _ = tree_edge_weights(low_level_guide(image, gray_as_rgb=False), tree, 0.02)
    finite = torch.isfinite(scaled)
    torch.testing.assert_close(scaled[finite], 3 * grey[finite])
    assert (scaled[finite] > grey[finite]).any()


def test_grey_image_tree_energy_equals_rgb_repeat_and_differs_without_the_flag():
    probs, image, aux, label = _tree_case(seed=3)
    kwargs = dict(sigma_low=0.05, sigma_high=0.7)
    on = multiscale_tree_energy_loss(probs, image, aux, label, UNLABELLED, gray_as_rgb=True, **kwargs)
    rgb = multiscale_tree_energy_loss(probs, image.repeat(1, 3, 1, 1), aux, label, UNLABELLED, **kwargs)
    off = multiscale_tree_energy_loss(probs, image, aux, label, UNLABELLED, gray_as_rgb=False, **kwargs)
    assert on.item() == rgb.item()
    assert off.item() != pytest.approx(on.item(), rel=1e-6)
    three = torch.rand(2, 3, 12, 12, dtype=torch.float64)  # 3-channel images are used as given
    assert torch.equal(low_level_guide(three, gray_as_rgb=True), three)


def test_objective_builds_the_grey_image_tree_as_rgb_by_default():
    assert ObjectiveConfig("pce_mstree").tree_gray_as_rgb is True
    torch.manual_seed(0)
    model = networks.build("unet_multihead", 1, 2, base_channels=4, aux_channels=8, dropout=None)
    image = torch.rand(2, 1, 16, 16)
    label = torch.randint(0, 3, (2, 16, 16))
    out = model(image)

    def tree_term(cfg, img):
        return WeakObjective(cfg)(model, out, img, label, site=0, num_sites=1).terms["tree"]

    on = tree_term(ObjectiveConfig("pce_mstree", tree_sigma_low=0.05), image)
    rgb = tree_term(ObjectiveConfig("pce_mstree", tree_sigma_low=0.05, tree_gray_as_rgb=False),
                    image.repeat(1, 3, 1, 1))
    off = tree_term(ObjectiveConfig("pce_mstree", tree_sigma_low=0.05, tree_gray_as_rgb=False),
                    image)
    assert on == rgb and on != pytest.approx(off, rel=1e-6)


# ---------------------------------------------------------------- 2. rotation augmentation

def test_task_rotate_fill_is_the_reference_fill():
    assert get_task("faz").rotate_fill == 0.8 and get_task("synthetic_faz").rotate_fill == 0.8
    assert get_task("odoc").rotate_fill == 0.0 and get_task("synthetic_odoc").rotate_fill == 0.0


def test_rotation_angles_are_reference_integers():
    rng = np.random.default_rng(0)
    angles = [random_angle(rng) for _ in range(3000)]
    assert all(isinstance(a, int) for a in angles)
    assert min(angles) == -45 and max(angles) == 44  # np.random.randint(-45, 45)


def test_random_augment_rotates_by_integer_angles(monkeypatch):
    seen = []

    def spy(image, labels, angle, *args, **kwargs):
        seen.append(angle)
        return rotate(image, labels, angle, *args, **kwargs)

    monkeypatch.setattr(augment, "rotate", spy)
    image = np.random.default_rng(1).random((1, 9, 9), dtype=np.float32)
    label = np.zeros((9, 9), np.uint8)
    for seed in range(40):
        random_augment(image, [label], np.random.default_rng(seed), fill_label=2)
    assert len(seen) > 5 and all(isinstance(a, int) and -45 <= a <= 44 for a in seen)


def test_nearest_rotation_keeps_only_input_values_and_the_fill():
    image = np.random.default_rng(2).random((1, 21, 21), dtype=np.float32)
    label = np.zeros((21, 21), np.uint8)
    allowed = set(np.unique(image).tolist()) | {np.float32(0.8).item()}
    rotated = 0
    for seed in range(30):
        out, (lab,) = random_augment(image, [label], np.random.default_rng(seed), fill_label=2,
                                     image_fill=0.8)
        assert set(np.unique(out).tolist()) <= allowed
        rotated += int((lab == 2).any())
    assert rotated > 5
    smooth, _ = rotate(image, [label], 17, fill_label=2, image_order=1, image_fill=0.8)
    assert not set(np.unique(smooth).tolist()) <= allowed  # linear interpolation creates values


def _rotated_samples(ds, seeds):
    for seed in seeds:
        s = ds.sample(0, np.random.default_rng(seed))
        outside = s["label"].numpy() == ds.task.unlabelled  # full mask: only rotated-in pixels
        if outside.any():
            yield s, outside


def test_faz_rotation_fills_rotated_in_corners_with_08(tmp_path, make_h5_site):
    make_h5_site(tmp_path, "faz", site=0, n_train=3, n_test=1, size=24)
    ds = SiteDataset(tmp_path, "faz", 0, "train", label_form="mask", augment=True)
    assert ds.rotate_order == 0 and ds.rotate_fill == pytest.approx(0.8)
    corners = 0
    for s, outside in _rotated_samples(ds, range(40)):
        image = s["image"][0].numpy()
        assert (image[outside] == np.float32(0.8)).all()
        corners += int(outside[0, 0] and outside[-1, -1])
        assert np.isin(image[~outside], ds.arrays(0).image).all()  # nearest: input values only
    assert corners > 3


def test_fundus_fill_and_explicit_fill(tmp_path, make_h5_site):
    make_h5_site(tmp_path, "odoc", site=0, n_train=3, n_test=1, size=24)
    ds = SiteDataset(tmp_path, "odoc", 0, "train", label_form="mask", augment=True)
    assert ds.rotate_fill == 0.0
    samples = list(_rotated_samples(ds, range(20)))
    assert samples and all((s["image"].numpy()[:, outside] == 0).all() for s, outside in samples)
    ds = SiteDataset(tmp_path, "odoc", 0, "train", label_form="mask", augment=True, rotate_fill=0.25)
    samples = list(_rotated_samples(ds, range(20)))
    assert samples and all((s["image"].numpy()[:, outside] == np.float32(0.25)).all()
                           for s, outside in samples)
    with pytest.raises(ValueError, match="rotate_order"):
        SiteDataset(tmp_path, "odoc", 0, "train", rotate_order=7)


def test_seeded_augmentation_is_reproducible(tmp_path, make_h5_site):
    make_h5_site(tmp_path, "faz", site=0, n_train=3, n_test=1, size=24)
    ds = SiteDataset(tmp_path, "faz", 0, "train", augment=True, rotate_order=1)
    for seed in range(8):
        a, b = ds.sample(1, np.random.default_rng(seed)), ds.sample(1, np.random.default_rng(seed))
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])


def test_trainer_passes_rotation_and_objective_switches(tiny_federation, tmp_path):
    t = SiteTrainer(tiny_run_config(tiny_federation, tmp_path), cid=0)
    assert (t.train_set.rotate_order, t.train_set.rotate_fill) == (0, pytest.approx(0.8))
    assert t.objective.config.tree_gray_as_rgb and not t.objective.config.sc_grad  # the reference's
    cfg = tiny_run_config(tiny_federation, tmp_path, rotate_order=1, rotate_fill=0.3,
                          tree_gray_as_rgb=False, sc_grad=True)
    t = SiteTrainer(cfg, cid=0)
    assert (t.train_set.rotate_order, t.train_set.rotate_fill) == (1, pytest.approx(0.3))
    assert not t.objective.config.tree_gray_as_rgb and t.objective.config.sc_grad


# ---------------------------------------------------------------- 3. FedALA's stopping rule

def _linear_problem(n_batches=3):
    torch.manual_seed(0)
    model = nn.Linear(3, 1, bias=False)
    glob = {"weight": torch.tensor([[1.0, -2.0, 0.5]])}
    batches = [{"x": torch.randn(4, 3), "y": torch.randn(4, 1)} for _ in range(n_batches)]
    seen = []

    def loss_fn(m, batch):
        loss = ((m(batch["x"]) - batch["y"]) ** 2).mean()
        seen.append(float(loss.detach()))
        return loss

    return model, glob, batches, seen, loss_fn


def test_ala_records_the_last_batch_loss_of_each_epoch():
    model, glob, batches, seen, loss_fn = _linear_problem()
    ala = AdaptiveAggregator(eta=0.5, threshold=0.0, max_epochs=4)
    losses = ala.blend(model, glob, loss_fn, lambda epoch: batches)
    assert len(losses) == 4 and len(seen) == 12
    assert losses == seen[2::3]
    seen.clear()
    assert len(ala.blend(model, glob, loss_fn, lambda epoch: batches)) == 1  # later calls: one pass
    assert len(seen) == 3


def test_ala_start_phase_stops_on_the_std_of_the_last_epoch_losses():
    model, glob, batches, _, loss_fn = _linear_problem()
    ala = AdaptiveAggregator(eta=0.0, threshold=0.1, num_pre_loss=10, max_epochs=0)
    losses = ala.blend(model, glob, loss_fn, lambda epoch: batches)
    assert len(losses) == 11  # FedALA: more than num_pre_loss losses, std of the last 10 < 0.1
    capped = AdaptiveAggregator(eta=0.0, threshold=0.1, num_pre_loss=10, max_epochs=3)
    assert len(capped.blend(model, glob, loss_fn, lambda epoch: batches)) == 3
    with pytest.raises(ValueError, match="empty pass"):
        AdaptiveAggregator().blend(model, glob, loss_fn, lambda epoch: [])
    with pytest.raises(ValueError, match="max_epochs"):
        AdaptiveAggregator(max_epochs=-1)


# ---------------------------------------------------------------- 4. ala_layer_idx

def test_split_shared_by_layer_idx():
    model = networks.build("unet", 1, 2, base_channels=4)
    names = [n for n, _ in model.named_parameters()]
    shared = list(model.state_dict())
    blended, direct = split_shared(names, shared, 2, decoder=[])
    assert blended == ["out_conv.weight", "out_conv.bias"]
    assert set(direct) == set(names) - set(blended)  # buffers stay local
    decoder = [k for k in shared if k.startswith(("decoder.", "out_conv."))]
    blended, direct = split_shared(names, shared, 0, decoder)
    assert set(blended) == set(decoder) & set(names)
    assert set(direct) == set(shared) - set(decoder)
    # the reference also takes the blended layers' BatchNorm statistics from the global model
    blended_ref, direct_ref = split_shared(names, shared, 0, decoder, global_buffers=True)
    assert blended_ref == blended
    assert set(direct_ref) == set(shared) - set(blended)
    assert any("running_mean" in k for k in set(direct_ref) - set(direct))


def test_ala_groups_choose_what_fedicra_blends(tiny_federation, tmp_path):
    """The reference blends the decoder's up blocks and the head, not the auxiliary heads."""
    cfg = tiny_run_config(tiny_federation, tmp_path, ala_groups="decoder,out_conv", ala_eta=50.0)
    t = SiteTrainer(cfg, cid=1)
    keys = list(t.model.state_dict())
    t.train(t.state_of(keys), {"server-round": 1, "share-include": ALL})
    local = t.state_of(keys)
    glob = {k: v + 0.5 if v.dtype.kind == "f" else v for k, v in local.items()}
    t.rule.receive(t, glob, keys, 2)
    after = t.state_of(keys)
    aux = [k for k in keys if k.startswith("aux_heads.")]
    assert aux and all(np.array_equal(after[k], glob[k]) for k in aux if "running" not in k)
    assert set(t.rule.ala.weights) == {k for k in t.keys(["decoder", "out_conv"])
                                      if k in dict(t.model.named_parameters())}


def _fedala_trainer(tiny_federation, tmp_path, **overrides):
    cfg = tiny_run_config(tiny_federation, tmp_path, strategy="FedALA", model="unet",
                          ala_layer_idx=2, ala_eta=50.0, ala_max_epochs=3, **overrides)
    return SiteTrainer(cfg, cid=1)


def test_layer_idx_blends_only_the_top_tensors(tiny_federation, tmp_path):
    t = _fedala_trainer(tiny_federation, tmp_path)
    keys = list(t.model.state_dict())
    arrays, _ = t.train(t.state_of(keys), {"server-round": 1, "share-include": ALL})
    local = t.state_of(keys)
    rng = np.random.default_rng(4)
    glob = {k: v + 0.5 * rng.standard_normal(v.shape).astype(v.dtype) if v.dtype.kind == "f" else v
            for k, v in local.items()}
    seeds = []
    original = t.sample_batches

    def recording(fraction, seed):
        seeds.append(seed)
        return original(fraction, seed)

    t.sample_batches = recording
    t.rule.receive(t, glob, keys, server_round=2)
    now = t.state_of(keys)
    params = [n for n, _ in t.model.named_parameters()]
    top = ["out_conv.weight", "out_conv.bias"]
    assert params[-2:] == top and set(t.rule.ala.weights) == set(top)
    for k in keys:
        if k in top:
            w = t.rule.ala.weights[k].cpu().numpy()
            np.testing.assert_allclose(now[k], local[k] + (glob[k] - local[k]) * w, atol=1e-6)
        elif k in params:
            np.testing.assert_array_equal(now[k], glob[k], err_msg=k)
        else:  # BatchNorm statistics stay local, as in FedALA
            np.testing.assert_array_equal(now[k], local[k], err_msg=k)
    w = torch.cat([t.rule.ala.weights[k].flatten() for k in top])
    assert (w < 1).any() and not np.allclose(now[top[0]], glob[top[0]])
    # one fixed subset per call, one loss per epoch
    assert len(set(seeds)) == 1 and len(seeds) == len(t.rule.last_losses) == 3


# ---------------------------------------------------------------- 5. site term without gradient

def _sc_setup():
    torch.manual_seed(0)
    model = networks.build("unet_lc_multihead", 1, 2, base_channels=4, aux_channels=8, dropout=None,
                           num_sites=3, site=1, pcs_reduction=4)
    g = torch.Generator().manual_seed(1)
    image = torch.rand(2, 1, 16, 16, generator=g)
    label = torch.randint(0, 3, (2, 16, 16), generator=g)
    return model, image, label


def _step_grads(model, image, label, cfg):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(5)  # the same dropout masks (auxiliary heads) in every step
    result = WeakObjective(cfg)(model, model(image), image, label, site=1, num_sites=3)
    result.total.backward()
    grads = {n: (None if p.grad is None else p.grad.clone()) for n, p in model.named_parameters()}
    return result, grads


def test_site_term_without_gradient_changes_no_gradient_but_is_logged():
    model, image, label = _sc_setup()
    common = dict(lambda_tree=0.1, lambda_crf=0.1, crf_radius=2, alpha=1.0)
    ref, ref_grads = _step_grads(model, image, label,
                                 ObjectiveConfig("pce_gatedcrf_mstree", sc_grad=False, **common))
    ours, ours_grads = _step_grads(model, image, label,
                                   ObjectiveConfig("pce_gatedcrf_mstree", sc_grad=True, **common))
    _, plain_grads = _step_grads(model, image, label,
                                 ObjectiveConfig("pce_gatedcrf_mstree", **dict(common, alpha=0.0)))
    for name, grad in plain_grads.items():
        if grad is None:
            assert ref_grads[name] is None, name
        else:
            torch.testing.assert_close(ref_grads[name], grad, rtol=0, atol=0, msg=name)
    assert ref.terms["sc"] == pytest.approx(ours.terms["sc"], rel=1e-6) and ref.terms["sc"] < 0
    assert ref.total.item() == pytest.approx(ours.total.item(), rel=1e-6)
    pcs = [n for n in ours_grads if n.startswith("pcs.") and ours_grads[n] is not None]
    assert any(not torch.equal(ours_grads[n], plain_grads[n]) for n in pcs)


def test_site_contrastive_loss_without_grad_has_the_same_value_and_no_graph():
    model, image, _ = _sc_setup()
    out = model(image)
    with_grad = site_contrastive_loss(model, out, 1, 3)
    without = site_contrastive_loss(model, out, 1, 3, grad=False)
    assert with_grad.requires_grad and not without.requires_grad
    assert without.item() == with_grad.item()
    expected = -sum(F.mse_loss(out.gates, model.site_gates(out.features, j)) for j in (0, 2)) / 2
    assert without.item() == pytest.approx(expected.item(), rel=1e-6)


def test_w_init_zero_is_the_references_swapped_parametrisation():
    """theta = L + (G - L) W with W from 0 follows exactly the reference's
    theta = G + (L - G) W' with W' from 1 (W = 1 - W'), step for step."""
    from clients.ala import AdaptiveAggregator

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    local = {n: p.detach().clone() for n, p in model.named_parameters()}
    glob = {n: v + torch.randn_like(v) for n, v in local.items()}
    batches = [(torch.randn(5, 4), torch.randint(0, 2, (5,))) for _ in range(3)]

    def loss_fn(m, batch):
        return torch.nn.functional.cross_entropy(m(batch[0]), batch[1])

    ala = AdaptiveAggregator(eta=0.5, w_init=0.0, max_epochs=1)
    ala.start_phase = False
    ala.blend(model, glob, loss_fn, lambda epoch: batches)
    # the reference: W' = 1 at the start, theta = G + (L - G) W', W' <- clip(W' - eta g (L - G))
    w_ref = {n: torch.ones_like(v) for n, v in local.items()}
    probe = copy.deepcopy(model)
    params = dict(probe.named_parameters())
    with torch.no_grad():
        for n in params:
            params[n].copy_(glob[n] + (local[n] - glob[n]) * w_ref[n])
    for batch in batches:
        probe.zero_grad()
        loss_fn(probe, batch).backward()
        with torch.no_grad():
            for n in params:
                w_ref[n] = torch.clamp(w_ref[n] - 0.5 * params[n].grad * (local[n] - glob[n]), 0, 1)
                params[n].copy_(glob[n] + (local[n] - glob[n]) * w_ref[n])
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), params[n].detach(), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(ala.weights[n], 1 - w_ref[n], rtol=1e-6, atol=1e-6)
