"""FedLC / LC-Fed: the calibration head, what travels, gradients, pre-flight refusals.

The calibration head changes the deployed prediction (validation, ``best.pt``, test_client.py);
its parameters and head snapshot never appear in a message, while every site's segmentation
head is broadcast to every site and never averaged; the calibration loss trains nothing but
the calibration head; the disagreement map is the spread of the heads' predictions around the
own one; the site-contrastive term has gradient; unsupported networks are refused naming the
key.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import flower_runner
import preflight
from conftest import (InProcessGrid, score_personal_models, task_identity,  # noqa: F401
                      tiny_run_config)
from networks import build
from networks.calibration import HEAD_KEYS, CalibratedUNet, head_key, parse_head_key
from networks.groups import select_keys


def tiny_net(name: str = "unet_lc_calib", sites: int = 3, site: int = 1) -> CalibratedUNet:
    torch.manual_seed(0)
    return build(name, 1, 2, base_channels=4, aux_channels=8, num_sites=sites, site=site)


def distinct_heads(model: CalibratedUNet, scale: float = 0.5):
    g = torch.Generator().manual_seed(1)
    w, b = model.head_state()
    weights = [w + scale * torch.randn(w.shape, generator=g) for _ in range(model.num_sites)]
    biases = [b + scale * torch.randn(b.shape, generator=g) for _ in range(model.num_sites)]
    return weights, biases


def fedlc_config(root, out, **overrides):
    from methods.registry import get_method

    entry = get_method("FedLC")  # its paper's network, objective and run-wide defaults
    values = {"model": entry.model, "procedure": entry.procedure, **entry.defaults,
              "strategy": "FedLC"}
    values.update(overrides)
    return tiny_run_config(root, out, **values)


# ---------------------------------------------------------------------- the calibration head
def test_calibration_changes_the_prediction_and_inference_uses_it(tiny_federation):
    from clients.evaluation import predict, target_maps, validate
    from dataloaders.dataset import SiteDataset

    model = tiny_net().eval()
    x = torch.rand(2, 1, 32, 32)
    before = model(x).logits
    assert not model.calibration_ready
    assert torch.equal(before, model(x, calibrated=False).logits), "no snapshot: plain prediction"
    model.set_peer_heads(*distinct_heads(model))
    plain = model(x, calibrated=False).logits
    calibrated = model(x).logits
    assert torch.equal(plain, before)
    assert not torch.allclose(plain, calibrated, atol=1e-3)
    assert torch.allclose(calibrated, model.calibrate(model(x, calibrated=False)), atol=1e-6)
    # training mode: the network's own prediction (what the objective trains)
    model.train()
    torch.manual_seed(5)
    trained = model(x).logits
    torch.manual_seed(5)
    assert torch.equal(trained, model(x, calibrated=False).logits)
    model.eval()

    # the deployed prediction is the calibrated one: make the two disagree everywhere
    with torch.no_grad():
        model.out_conv.bias.copy_(torch.tensor([20.0, -20.0]))  # plain: background
        model.calib.fuse.weight.zero_()
        model.calib.fuse.bias.copy_(torch.tensor([-5.0, 5.0]))  # calibrated: foreground
    assert (model(x, calibrated=False).logits.argmax(1) == 0).all()
    assert (predict(model, x, site=1) == 1).all()
    data = SiteDataset(tiny_federation, "synthetic_faz", 1, "val", val_fraction=0.2, seed=7)
    score, _ = validate(model, data, 1, torch.device("cpu"))
    expected = []
    for i in range(len(data)):
        sample = data.sample(i)
        truth = (sample["mask"] if "mask" in sample else sample["label"]).numpy()
        for gt in target_maps(truth, data.task.eval_targets).values():
            expected.append(2 * gt.sum() / (gt.sum() + gt.size))
    assert score == pytest.approx(float(np.mean(expected)))


def test_calibration_loss_gives_no_gradient_to_the_segmentation_network():
    from methods.fedlc import CalibratedObjective
    from losses.dice import partial_dice_loss
    from losses.objective import ObjectiveConfig, WeakObjective

    model = tiny_net().train()
    model.set_peer_heads(*distinct_heads(model))
    x = torch.rand(2, 1, 32, 32)
    label = torch.randint(0, 3, (2, 32, 32))  # 2 = unlabelled
    out = model(x)
    loss = partial_dice_loss(model.calibrate(out), label, ignore_index=2)
    loss.backward()
    calib = set(select_keys(model, ["calib"]))
    for name, p in model.named_parameters():
        if name in calib:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, f"{name} gets gradient from the calibration loss"
    assert not any(b.requires_grad for b in model.calib.buffers()), "the head snapshot is detached"

    # through FedLC's objective: the network's gradient is that of the run's objective alone
    model.zero_grad(set_to_none=True)
    inner = WeakObjective(ObjectiveConfig("pce_sc", sc_grad=True))
    wrapped = CalibratedObjective(inner)
    torch.manual_seed(3)  # the same dropout masks in both passes
    out = model(x)
    result = wrapped(model, out, x, label, 1, 3)
    assert set(result.terms) == {"pce", "sc", "calib"}
    result.total.backward()
    with_calib = {n: p.grad.clone() for n, p in model.named_parameters()
                  if n not in calib and p.grad is not None}
    model.zero_grad(set_to_none=True)
    torch.manual_seed(3)
    inner(model, model(x), x, label, 1, 3).total.backward()
    for n, p in model.named_parameters():
        if n not in calib and p.grad is not None:
            assert torch.allclose(with_calib[n], p.grad, atol=1e-7), n


def test_uncertainty_is_the_per_pixel_spread_of_the_heads_predictions():
    model = tiny_net(sites=4, site=2).eval()
    weights, biases = distinct_heads(model, scale=1.0)
    model.set_peer_heads(weights, biases)
    x = torch.rand(1, 1, 16, 16)
    feature = model(x, calibrated=False).decoder_features
    u = model.calib.uncertainty(feature, 2).numpy()
    probs = [F.conv2d(feature, w, b, padding=1).softmax(1)[0].detach().numpy()
             for w, b in zip(weights, biases)]
    k = len(probs)
    for c in range(2):
        for i in range(16):
            for j in range(16):
                values = [p[c, i, j] for p in probs]
                own = values[2]
                expected = np.sqrt(sum((v - own) ** 2 for v in values) / (k - 1))
                assert u[0, c, i, j] == pytest.approx(expected, rel=1e-4, abs=1e-6)
    # identical heads: no disagreement, no uncertainty attention
    model.set_peer_heads([weights[0]] * k, [biases[0]] * k)
    assert float(model.calib.uncertainty(feature, 2).abs().max()) == 0.0
    att_u, att_p = model.calib.attention(feature, model(x, calibrated=False).logits, 2)
    assert float(att_u.abs().max()) == 0.0
    assert 0.0 <= float(att_p.min()) <= float(att_p.max()) <= 1.0


def test_site_contrastive_term_has_gradient_in_fedlc(tiny_federation, tmp_path):
    from clients.trainer import SiteTrainer
    from losses.site_contrastive import site_contrastive_loss

    cfg, _ = flower_runner.resolve_layers(flower_runner.parse_args(
        ["--strategy", "fedlc", "--img_class", "faz"]))
    assert (cfg.strategy, cfg.model, cfg.procedure, cfg.sc_grad, cfg.alpha) == \
        ("FedLC", "unet_lc_calib", "pce_sc", True, 1.0)
    assert (cfg.params.fedlc_head_fraction, cfg.iters, cfg.params.fedlc_head_steps(cfg.iters)) == \
        (0.2, 10, 2)
    trainer = SiteTrainer(fedlc_config(tiny_federation, tmp_path), cid=1)
    assert trainer.objective.config.sc_grad is True
    batch = trainer.next_batch()
    out = trainer.model(batch["image"])
    result = trainer.objective(trainer.model, out, batch["image"], batch["label"], 1, 3)
    assert "sc" in result.terms
    sc = site_contrastive_loss(trainer.model, out, 1, 3, grad=trainer.objective.config.sc_grad)
    pcs = [p for n, p in trainer.model.named_parameters() if n.startswith("pcs.")]
    grads = torch.autograd.grad(sc, pcs, allow_unused=True)
    assert any(g is not None and g.abs().sum() > 0 for g in grads)


# ---------------------------------------------------------------------- the original's round
@pytest.mark.parametrize("iters, fraction, head", [
    (10, 0.2, 2),  # the original: head_iter = 10 of its 50 steps a round
    (50, 0.2, 10), (10, 0.7, 7), (10, 0.25, 3), (20, 0.2, 4),
    (2, 0.2, 1), (3, 0.9, 2),  # both parts train while 0 < fraction < 1
    (10, 0.0, 0), (10, 1.0, 10), (1, 0.2, 0), (1, 0.5, 1),
])
def test_head_steps_are_the_head_fraction_of_the_round(iters, fraction, head):
    from configs import RunConfig

    cfg = RunConfig.build(strategy="FedLC", iters=iters, fedlc_head_fraction=fraction).validate()
    assert cfg.params.fedlc_head_steps(cfg.iters) == head


def test_head_fraction_outside_zero_one_is_refused_naming_the_key():
    from configs import RunConfig

    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match=r"fedlc_head_fraction = .* must lie in \[0, 1\]"):
            RunConfig.build(strategy="FedLC", fedlc_head_fraction=bad).validate()


@pytest.mark.parametrize("fraction, parts", [(0.4, (2, 3)), (0.8, (4, 1))])
def test_a_round_trains_the_head_first_then_the_body(tiny_federation, tmp_path, fraction, parts):
    """The first fedlc_head_fraction of the iters move the head (and the calibration) only, the
    rest everything but the head; rep_iters is not read."""
    from clients.trainer import SiteTrainer
    from methods.fedlc import FedLC

    cfg = fedlc_config(tiny_federation, tmp_path, iters=5, rounds=1, rep_iters=5,
                       fedlc_head_fraction=fraction)
    trainer = SiteTrainer(cfg, cid=0)
    strategy = FedLC(cfg)
    arrays = strategy.initial_arrays(build("unet_lc_calib", 1, 2, base_channels=4,
                                           aux_channels=8, num_sites=3))
    arrays.update(strategy.head_arrays())
    head = set(select_keys(trainer.model, ["out_conv"]))
    calib = set(select_keys(trainer.model, ["calib"]))
    params = {n for n, _ in trainer.model.named_parameters()}
    encoder = set(select_keys(trainer.model, ["encoder"])) & params
    changes, run = [], trainer.run_iterations

    def spy(n, trainable, *args, **kwargs):
        before = {k: v.detach().clone() for k, v in trainer.model.named_parameters()}
        metrics = run(n, trainable, *args, **kwargs)
        moved = {k for k, v in trainer.model.named_parameters() if not torch.equal(v, before[k])}
        changes.append((n, moved))
        return metrics

    trainer.run_iterations = spy
    config = {"server-round": 1, "share-include": ",".join(strategy.share_include),
              "share-exclude": ",".join(strategy.share_exclude)}
    trainer.train(arrays, config)
    assert [n for n, _ in changes] == list(parts)
    (_, head_part), (_, body_part) = changes
    assert head_part <= head | calib and head & head_part and calib & head_part
    assert not head & body_part, "the body steps move the head"
    assert encoder & body_part and not encoder & head_part
    assert trainer.step == 5


def test_alpha_scales_the_contrastive_term_of_the_fedlc_objective(tiny_federation, tmp_path):
    """FedLC trains with alpha * sc (alpha = 1); alpha = 0 (the original's default) drops it."""
    from methods.fedlc import CalibratedObjective
    from clients.trainer import SiteTrainer

    totals = {}
    for alpha in (0.0, 0.25, 1.0):
        trainer = SiteTrainer(fedlc_config(tiny_federation, tmp_path, alpha=alpha), cid=1)
        trainer.rule._network(trainer)
        assert isinstance(trainer.objective, CalibratedObjective)
        assert trainer.objective.config.alpha == alpha
        batch = trainer.next_batch()
        torch.manual_seed(0)
        out = trainer.model(batch["image"])
        result = trainer.objective(trainer.model, out, batch["image"], batch["label"], 1, 3)
        totals[alpha] = result
    assert "sc" not in totals[0.0].terms
    assert float(totals[0.0].total.detach()) == pytest.approx(totals[0.0].terms["pce"], rel=1e-6)
    for alpha in (0.25, 1.0):
        terms = totals[alpha].terms
        assert terms["sc"] < 0 and totals[alpha].weights["sc"] == alpha
        assert float(totals[alpha].total.detach()) == pytest.approx(
            terms["pce"] + alpha * terms["sc"], rel=1e-5)


def test_every_other_site_weighs_the_same_in_the_contrastive_term():
    """The original divides its running sum by len(hmap) = 5 inside the site loop (weights
    1/5, 1/25, ... by site order, a defect); here the term is minus the plain mean."""
    from losses.site_contrastive import site_contrastive_loss

    model = tiny_net(sites=5, site=2).train()
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():  # site codes that matter (at initialisation the gates agree)
        for p in model.pcs.parameters():
            p.add_(torch.randn(p.shape, generator=g))
    out = model(torch.rand(2, 1, 32, 32))
    with torch.no_grad():
        distances = [float(F.mse_loss(out.gates, model.site_gates(out.features, j)))
                     for j in range(5) if j != 2]
    assert len(set(round(d, 9) for d in distances)) > 1, "distinct distances"
    value = float(site_contrastive_loss(model, out, 2, 5).detach())
    assert value == pytest.approx(-float(np.mean(distances)), rel=1e-5)

    def reference(ds):  # train_multi_lcfed.py: c_loss += mse; c_loss = c_loss / len(hmap)
        c_loss = 0.0
        for d in ds:
            c_loss = (c_loss + d) / 5
        return -c_loss / len(ds)  # / (K - 1)

    assert reference([1.0] * 4) == pytest.approx(-0.0624)  # equal distances: 0.0624 x ours
    assert reference(distances) != pytest.approx(reference(distances[::-1]), rel=1e-3), \
        "the reference's weights depend on the order of the sites"


# ---------------------------------------------------------------------- the federation
def test_heads_travel_to_every_site_and_the_calibration_never_leaves(tiny_federation, tmp_path,
                                                                    task_identity):
    import test_client
    from networks.factory import build_for_run
    from strategies.server_app import run_server

    cfg = fedlc_config(tiny_federation, tmp_path, rounds=2, iters=2, eval_every=1)
    preflight.check_names(cfg)
    grid = InProcessGrid(cfg)
    run_server(grid, cfg)
    initial = build_for_run(cfg, site=0)
    calib = set(select_keys(initial, ["calib"]))
    shared = set(select_keys(initial, ["encoder", "pcs", "decoder", "aux"]))
    personal = set(select_keys(initial, ["out_conv", "calib"]))
    assert calib and shared and personal and not (shared & personal)
    assert shared | personal == set(initial.state_dict())
    all_heads = {head_key(s, k) for s in range(3) for k in HEAD_KEYS}

    ops = [(op, r) for op, r, *_ in grid.traffic]
    assert ops == [("train", 1)] * 3 + [("train", 2)] * 3 + [("evaluate", 2)] * 3
    cid_of = {n: w.trainer.cid for n, w in grid.workers.items()}
    replied = {}
    for op, rnd, node, sent, reply in grid.traffic:
        back = reply.get("arrays", {})
        for name in list(sent) + list(back):
            assert name not in calib and not name.startswith("calib."), name
            assert name not in personal, f"personal array {name} in a message"
        if op == "evaluate":
            assert sent == {}
            continue
        cid = cid_of[node]
        assert set(sent) == shared | all_heads
        assert set(back) == shared | {head_key(cid, k) for k in HEAD_KEYS}
        for k in HEAD_KEYS:  # every site receives every site's head, never averaged
            for s in range(3):
                got = sent[head_key(s, k)]
                if rnd == 1:
                    np.testing.assert_array_equal(got.reshape(initial.state_dict()[k].shape),
                                                  initial.state_dict()[k].numpy())
                else:
                    np.testing.assert_array_equal(got, replied[1, s][head_key(s, k)])
        replied[rnd, cid] = back
    assert not np.allclose(replied[1, 0][head_key(0, "out_conv.weight")],
                           replied[1, 1][head_key(1, "out_conv.weight")])

    for worker in grid.workers.values():
        trainer = worker.trainer
        model = trainer.model
        assert model.calibration_ready
        for s in range(3):  # the snapshot of round 2: the heads every site replied in round 1
            expected = replied[1, s][head_key(s, "out_conv.weight")]
            np.testing.assert_allclose(model.calib.head_weight[s].numpy(),
                                       expected.reshape(model.calib.head_weight[s].shape))
        trained = initial.state_dict()["calib.fuse.weight"]
        assert not torch.equal(model.state_dict()["calib.fuse.weight"], trained)
        best = torch.load(cfg.out_dir / f"client{trainer.cid}" / "best.pt", weights_only=True)
        assert bool(best["model"]["calib.ready"]) and "calib.fuse.weight" in best["model"]

    # test_client.py scores the calibrated prediction of every personal best.pt
    tested, info = test_client.load_tested_model(cfg, 1, "best", torch.device("cpu"))
    assert isinstance(tested, CalibratedUNet) and tested.calibration_ready
    assert info["model"] == "personal" and info["checkpoint"] == "client1/best.pt"
    x = torch.rand(1, 1, 32, 32)
    tested.eval()
    assert not torch.allclose(tested(x).logits, tested(x, calibrated=False).logits)
    score_personal_models(cfg)


def test_head_keys_are_not_model_keys():
    model = tiny_net()
    for s in range(3):
        for k in HEAD_KEYS:
            name = head_key(s, k)
            assert name not in model.state_dict() and parse_head_key(name) == (s, k)
    assert parse_head_key("out_conv.weight") is None


# ---------------------------------------------------------------------- objectives, refusals
@pytest.mark.parametrize("model, procedure", [
    ("unet_lc_calib", "pce"), ("unet_lc_calib", "pce_sc"), ("unet_lc_calib", "pce_gatedcrf"),
    ("unet_lc_calib", "ce_full"), ("unet_lc_multihead_calib", "pce_mstree"),
    ("unet_lc_multihead_calib", "pce_gatedcrf_mstree"),
])
def test_every_objective_trains_a_fedlc_round(tiny_federation, tmp_path, model, procedure):
    from clients.trainer import SiteTrainer
    from methods.fedlc import FedLC

    cfg = fedlc_config(tiny_federation, tmp_path, model=model, procedure=procedure, iters=2,
                       rounds=1, crf_radius=2, crf_sigma_xy=2.0)
    preflight.check_names(cfg)
    trainer = SiteTrainer(cfg, cid=0)
    strategy = FedLC(cfg)
    arrays = strategy.initial_arrays(build(model, 1, 2, base_channels=4, aux_channels=8,
                                           num_sites=3))
    arrays.update(strategy.head_arrays())
    config = {"server-round": 1, "share-include": ",".join(strategy.share_include),
              "share-exclude": ",".join(strategy.share_exclude)}
    reply, metrics = trainer.train(arrays, config)
    assert np.isfinite(metrics["total"]) and "calib" in metrics and 0 <= metrics["val_dice"] <= 1


@pytest.mark.parametrize("model", ["unet", "unet_lc", "unet_lc_multihead", "unet_multihead"])
def test_preflight_refuses_networks_without_calibration_naming_the_key(model):
    from configs import RunConfig

    cfg = RunConfig(strategy="FedLC", model=model, procedure="pce", num_clients=3)
    with pytest.raises(preflight.PreflightError, match=r"^--model: .*unet_lc_calib"):
        preflight.check_names(cfg)


def test_preflight_refuses_calibrated_networks_elsewhere_and_a_lone_site():
    from configs import RunConfig

    with pytest.raises(preflight.PreflightError, match=r"^--model: 'unet_lc_calib'.*FedLC"):
        preflight.check_names(RunConfig(strategy="FedAvg", model="unet_lc_calib", procedure="pce"))
    with pytest.raises(preflight.PreflightError, match=r"^--num_clients: "):
        preflight.check_names(RunConfig(strategy="FedLC", model="unet_lc_calib", procedure="pce",
                                        num_clients=1))
    with pytest.raises(preflight.PreflightError, match=r"^--procedure: "):
        preflight.check_names(RunConfig(strategy="FedLC", model="unet_lc_calib",
                                        procedure="pce_mstree", num_clients=3))
