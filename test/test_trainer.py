"""Site trainer: adaptive aggregation, personal state, frozen parameters, resumption."""
import numpy as np
import pytest
import torch
from torch import nn

from clients.ala import AdaptiveAggregator
from clients.trainer import SiteTrainer, poly_lr
from conftest import tiny_run_config

ALL = "encoder,pcs,decoder,out_conv,aux"


def round_config(server_round, include=ALL, exclude=""):
    return {"server-round": server_round, "share-include": include, "share-exclude": exclude}


def perturbed(arrays, seed, scale=0.05):
    rng = np.random.default_rng(seed)
    return {k: (v + scale * rng.standard_normal(v.shape).astype(v.dtype)) if v.dtype.kind == "f" else v
            for k, v in arrays.items()}


@pytest.fixture
def trainer(tiny_federation, tmp_path):
    return SiteTrainer(tiny_run_config(tiny_federation, tmp_path, rounds=4), cid=1)


def test_ala_update_rule_matches_hand_computation():
    torch.manual_seed(0)
    model = nn.Linear(3, 1, bias=False)
    local = model.weight.detach().clone()
    glob = torch.tensor([[1.0, -2.0, 0.5]])
    x, y = torch.randn(4, 3), torch.randn(4, 1)

    def loss_fn(m, batch):
        return ((m(batch["x"]) - batch["y"]) ** 2).mean()

    ala = AdaptiveAggregator(eta=0.3, max_epochs=1)
    ala.blend(model, {"weight": glob}, loss_fn, lambda epoch: [{"x": x, "y": y}])
    # theta = G at W = 1; dL/dtheta; W <- clip(1 - eta * g * (G - L), 0, 1)
    theta = glob.clone().requires_grad_(True)
    ((x @ theta.T - y) ** 2).mean().backward()
    w = torch.clamp(1 - 0.3 * theta.grad * (glob - local), 0, 1)
    torch.testing.assert_close(ala.weights["weight"], w)
    torch.testing.assert_close(model.weight.detach(), local + (glob - local) * w)
    assert not ala.start_phase


def test_w_is_one_before_first_blend_and_blend_with_w_one_returns_global(trainer):
    trainer.cfg.params.ala_eta = 0.0  # W never moves from 1
    trainer.rule.ala.eta = 0.0
    assert trainer.rule.ala.weights is None
    keys = trainer.keys(ALL.split(","))
    trainer.train(trainer.state_of(keys), round_config(1))
    assert trainer.rule.ala.weights is None  # round 1 copies the global model, no blend
    glob = perturbed(trainer.state_of(keys), seed=1)
    trainer.rule.receive(trainer, glob, keys, server_round=2)
    weights = trainer.rule.ala.weights
    assert weights and all(torch.all(w == 1) for w in weights.values())
    now = trainer.state_of(keys)
    params = set(dict(trainer.model.named_parameters()))
    encoder = set(trainer.keys(["encoder", "pcs"]))
    for k in keys:
        if k in params or k in encoder:  # decoder buffers (BN statistics) stay local
            np.testing.assert_allclose(now[k], glob[k], rtol=0, atol=1e-6, err_msg=k)


def test_w_stays_in_unit_interval_and_persists(trainer):
    trainer.rule.ala.eta = 50.0
    keys = trainer.keys(ALL.split(","))
    arrays, _ = trainer.train(trainer.state_of(keys), round_config(1))
    trainer.train(perturbed(arrays, seed=2, scale=0.5), round_config(2))
    after_two = {k: w.clone() for k, w in trainer.rule.ala.weights.items()}
    values = torch.cat([w.flatten() for w in after_two.values()])
    assert values.min() >= 0 and values.max() <= 1
    assert (values < 1).any(), "a large eta must move some weights"
    decoder_params = set(trainer.keys(["decoder", "out_conv", "aux"])) & set(dict(trainer.model.named_parameters()))
    assert set(after_two) == decoder_params
    trainer.train(perturbed(arrays, seed=3, scale=0.5), round_config(3))
    # W continues from round 2 instead of being reset to 1 (reference defect 3)
    moved_back_to_one = all(torch.all(w == 1) for w in trainer.rule.ala.weights.values())
    assert not moved_back_to_one
    assert trainer.state_dict()["rule"]["ala"]["weights"] is not None


@pytest.mark.parametrize("strategy, exclude, group", [("FedRep", "out_conv", "out_conv"), ("FedBN", "bn", "bn")])
def test_personal_parameters_never_leave_the_site(tiny_federation, tmp_path, strategy, exclude, group):
    t = SiteTrainer(tiny_run_config(tiny_federation, tmp_path, strategy=strategy), cid=0)
    shared = t.keys(ALL.split(","), [exclude])
    arrays, metrics = t.train(t.state_of(shared), round_config(1, exclude=exclude))
    personal = set(t.keys([group]))
    assert personal and not personal & set(arrays)
    assert set(arrays) == set(shared)
    assert metrics["num-examples"] == len(t.train_set)


def test_frozen_parameters_get_no_decay_or_momentum(trainer):
    head = set(trainer.keys(["out_conv"]))
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.run_iterations(2, lambda name: name in head)
    for name, p in trainer.model.named_parameters():
        changed = not torch.equal(before[name], p.detach())
        assert changed == (name in head), name
    state_params = {id(p) for p in trainer.optimizer.state}
    named = dict(trainer.model.named_parameters())
    assert {n for n in named if id(named[n]) in state_params} == head


def test_saved_state_resumes_identically(tiny_federation, tmp_path):
    cfg = tiny_run_config(tiny_federation, tmp_path, rounds=4, procedure="pce_gatedcrf", lambda_crf=0.1)
    a = SiteTrainer(cfg, cid=2)
    keys = a.keys(ALL.split(","))
    glob = a.state_of(keys)
    a.train(glob, round_config(1))
    a.save(tmp_path / "resume.pt")
    b = SiteTrainer(cfg, cid=2)
    b.load(tmp_path / "resume.pt")
    glob2 = perturbed(glob, seed=5)
    out_a, m_a = a.train(glob2, round_config(2))
    out_b, m_b = b.train(glob2, round_config(2))
    for k in out_a:
        np.testing.assert_array_equal(out_a[k], out_b[k], err_msg=k)
    for k in m_a:
        if k != "seconds":
            assert m_a[k] == m_b[k], k


def test_poly_lr():
    assert poly_lr(0.01, 0, 100) == pytest.approx(0.01)
    assert poly_lr(0.01, 50, 100) == pytest.approx(0.01 * 0.5 ** 0.9)
    assert poly_lr(0.01, 100, 100) == 0.0 and poly_lr(0.01, 150, 100) == 0.0


def test_client_id_out_of_range(tiny_federation, tmp_path):
    with pytest.raises(ValueError, match="client id 3"):
        SiteTrainer(tiny_run_config(tiny_federation, tmp_path), cid=3)


@pytest.mark.parametrize("method", ["FedAvg", "FedProx", "FedBN", "FedRep", "FedALA", "FedICRA", "Local"])
def test_every_method_runs_two_rounds_with_its_server_sharing(tiny_federation, tmp_path, method):
    from networks.factory import build_for_run

    # ala_layer_idx = 0: the decoder-side blend on this multihead network (FedALA's own
    # layer_idx = 2 would pick the last two parameters, of an auxiliary head)
    cfg = tiny_run_config(tiny_federation, tmp_path, strategy=method, rounds=3, prox_mu=0.5,
                          ala_layer_idx=0)
    strategy = cfg.method.server(cfg)
    glob = strategy.initial_arrays(build_for_run(cfg))
    config = {"share-include": ",".join(strategy.share_include),
              "share-exclude": ",".join(strategy.share_exclude)}
    t = SiteTrainer(cfg, cid=0)
    for server_round in (1, 2):
        arrays, metrics = t.train(glob, dict(config, **{"server-round": server_round}))
        assert set(arrays) == set(glob)
        assert np.isfinite(metrics["total"])
        glob = perturbed(arrays, seed=server_round) if arrays else {}
    assert ("extra" in metrics) == (method == "FedProx")
    if method == "Local":
        assert arrays == {}


def test_fundus_task_trains_with_the_full_objective(tmp_path):
    """Three channels, three classes (cup, disc rim), cup and disc scored separately."""
    from dataloaders.synthetic import generate_federation

    root = tmp_path / "odoc"
    generate_federation("odoc", root, size=32, train_per_site=5, test_per_site=1, seed=4)
    cfg = tiny_run_config(root, tmp_path / "out", img_class="synthetic_odoc",
                          procedure="pce_gatedcrf_mstree", crf_radius=2, crf_sigma_xy=2.0)
    t = SiteTrainer(cfg, cid=2)  # box labels turned into ellipse scribbles for fundus
    keys = t.keys(ALL.split(","))
    _, metrics = t.train(t.state_of(keys), round_config(1))
    for term in ("pce", "tree", "crf", "sc", "total"):
        assert np.isfinite(metrics[term]), term
    scores = t.evaluate()
    assert {"val_dice_cup", "val_dice_disc"} <= set(scores)
    assert scores["val_dice"] == pytest.approx((scores["val_dice_cup"] + scores["val_dice_disc"]) / 2)


def test_a_diverged_round_is_rejected_and_the_last_good_state_kept(tiny_federation, tmp_path):
    """With an absurd learning rate the loss turns NaN: the site sends nothing, says why, keeps
    the model it had before the round and never writes a non-finite best.pt."""
    import copy

    from clients.trainer import SiteTrainer

    cfg = tiny_run_config(tiny_federation, tmp_path, strategy="FedAvg", model="unet",
                          base_lr=1e30, eval_every=1, reset_optimizer=False)
    trainer = SiteTrainer(cfg, cid=0)
    keys = trainer.keys(["all"])
    sent = trainer.state_of(keys)
    config = {"server-round": 1, "share-include": "all", "share-exclude": ""}
    arrays, metrics = trainer.train(sent, config)
    if not metrics.get("diverged"):  # the first round may survive; the second cannot
        before = copy.deepcopy(trainer.state_dict())
        arrays, metrics = trainer.train(arrays, dict(config, **{"server-round": 2}))
    else:
        before = None
    assert metrics["diverged"] == 1.0 and arrays == {} and metrics["num-examples"] == 0.0
    for name, value in trainer.model.state_dict().items():
        assert torch.isfinite(value.float()).all(), name
    if before is not None:
        for name, value in trainer.model.state_dict().items():
            assert torch.equal(value, before["model"][name]), name
    best = trainer.client_dir / "best.pt"
    if best.is_file():
        state = torch.load(best, weights_only=True)
        assert all(torch.isfinite(v.float()).all() for v in state["model"].values())
