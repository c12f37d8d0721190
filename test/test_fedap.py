"""FedAP (Lu et al., IEEE TBD 2022): weights from BatchNorm-input statistics, personal aggregates.

The weight matrix is a convex combination per row with the own weight lambda and more weight on
closer sites; the statistics a site measures are the exact moments of its BatchNorm inputs under
the received pre-trained model in eval mode; through the server, FedAvg rounds come first, then
every node receives exactly its own client's aggregate, BatchNorm never travels after the
pre-training, and the personal models are deployed.
"""
from __future__ import annotations

import csv
import itertools

import numpy as np
import pytest
import torch

import preflight
from conftest import (InProcessGrid, score_personal_models, task_identity,  # noqa: F401
                      tiny_run_config)
from methods.fedap import (COLLECT, FEDAP_PHASE, STATS_PREFIX, bn_distance, fedap_weights,
                           personalised_aggregates, split_stats)


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


# ---------------------------------------------------------------------- weights (pure NumPy)
def brute_distance(a, b):
    total = 0.0
    for layer in a:
        (ma, va), (mb, vb) = a[layer], b[layer]
        s = sum((x - y) ** 2 for x, y in zip(ma, mb))
        s += sum((np.sqrt(x) - np.sqrt(y)) ** 2 for x, y in zip(va, vb))
        total += np.sqrt(s)
    return total


def hand_stats():
    """Four sites, two layers; site 1 is a small shift of site 0, site 3 far from everyone."""
    def site(shift, scale):
        return {"enc.bn": (np.array([0.0, 1.0, 2.0]) + shift, np.array([1.0, 4.0, 9.0]) * scale),
                "dec.bn": (np.array([-1.0, 3.0]) + 2 * shift, np.array([0.25, 2.0]) * scale)}
    return [site(0.0, 1.0), site(0.1, 1.1), site(0.5, 1.5), site(3.0, 6.0)]


@pytest.mark.parametrize("lam", [0.5, 0.2, 1.0])
def test_weights_are_convex_rows_with_lambda_on_the_diagonal_and_favour_closer_sites(lam):
    stats = hand_stats()
    w = fedap_weights(stats, lam)
    assert w.shape == (4, 4) and (w >= 0).all()
    np.testing.assert_allclose(w.sum(axis=1), 1.0, rtol=0, atol=1e-12)
    np.testing.assert_allclose(np.diag(w), lam)
    d = np.array([[brute_distance(a, b) for b in stats] for a in stats])
    for i, j in itertools.product(range(4), repeat=2):
        assert bn_distance(stats[i], stats[j]) == pytest.approx(d[i, j], rel=1e-12)
    for i in range(4):
        others = [j for j in range(4) if j != i]
        expected = (1 - lam) * (1 / d[i, others]) / np.sum(1 / d[i, others])
        np.testing.assert_allclose(w[i, others], expected, rtol=1e-12)
    if lam < 1:
        # site 0: site 1 is nearest, then site 2, then site 3
        assert w[0, 1] > w[0, 2] > w[0, 3] > 0
        assert w[3, 2] > w[3, 1] > w[3, 0]
        assert not np.allclose(w, w.T), "weights are per receiving client"


def test_identical_statistics_share_the_rest_equally_and_bad_input_is_refused():
    stats = hand_stats()
    w = fedap_weights([stats[0], stats[0], stats[3]], 0.5)
    np.testing.assert_allclose(w[0], [0.5, 0.5, 0.0])
    np.testing.assert_allclose(w[2], [0.25, 0.25, 0.5])
    with pytest.raises(ValueError, match="at least 2 clients"):
        fedap_weights(stats[:1], 0.5)
    with pytest.raises(ValueError, match="different BatchNorm layers"):
        bn_distance(stats[0], {"enc.bn": stats[1]["enc.bn"]})


def test_personalised_aggregates_renormalise_a_row_over_the_kept_replies():
    w = np.array([[0.5, 0.3, 0.2], [0.1, 0.5, 0.4], [0.25, 0.25, 0.5]])
    arrays = [{"a": np.full(2, v, np.float32)} for v in (1.0, 10.0, 100.0)]
    full = personalised_aggregates(w, arrays)
    for i in range(3):
        np.testing.assert_allclose(full[i]["a"], w[i] @ np.array([1.0, 10.0, 100.0]), rtol=1e-6)
        assert full[i]["a"].dtype == np.float32
    part = personalised_aggregates(w, [arrays[0], None, arrays[2]])  # client 1 refused
    np.testing.assert_allclose(part[0]["a"], (0.5 * 1 + 0.2 * 100) / 0.7, rtol=1e-6)
    np.testing.assert_allclose(part[1]["a"], (0.1 * 1 + 0.4 * 100) / 0.5, rtol=1e-6)
    alone = personalised_aggregates(np.eye(3), [arrays[0], None, arrays[2]])
    assert alone[1] is None, "no weight left: the server keeps the previous aggregate"


# ---------------------------------------------------------------------- statistics on the site
@pytest.mark.parametrize("model, procedure", [("unet", "pce"), ("unet_lc", "pce_sc"),
                                              ("unet_lc_multihead", "pce_gatedcrf_mstree")])
def test_collected_statistics_are_the_exact_moments_of_the_bn_inputs(tiny_federation, tmp_path,
                                                                      model, procedure):
    from clients.trainer import SiteTrainer
    from networks.factory import build_for_run

    cfg = tiny_run_config(tiny_federation, tmp_path, strategy="FedAP", model=model,
                          procedure=procedure, rounds=4, fedap_pretrain_rounds=2, iters=1,
                          batch_size=2)
    trainer = SiteTrainer(cfg, cid=1)
    keys = trainer.keys(["all"])
    bn = set(trainer.keys(["bn"]))
    rng = np.random.default_rng(0)
    pretrained = {}  # a "pre-trained" model whose running statistics are far from (0, 1)
    for k, v in trainer.state_of(keys).items():
        if k.endswith("running_mean"):
            v = rng.normal(size=v.shape).astype(v.dtype)
        elif k.endswith("running_var"):
            v = rng.uniform(0.5, 2.0, size=v.shape).astype(v.dtype)
        pretrained[k] = v
    config = {"server-round": 3, "share-include": ",".join(("encoder", "pcs", "decoder",
                                                            "out_conv", "aux")),
              "share-exclude": "bn", FEDAP_PHASE: COLLECT}
    trainer.best_val = 2.0  # must be reset: FedAvg-phase models are no candidates
    reply, metrics = trainer.train(pretrained, config)
    assert np.isfinite(metrics["total"]) and trainer.best_val <= 1.0
    model_keys, stats = split_stats(reply)
    assert set(model_keys) == set(keys) - bn, "BatchNorm stays on the site"
    layers = [n for n, m in trainer.model.named_modules()
              if isinstance(m, torch.nn.BatchNorm2d)]
    assert sorted(stats) == sorted(layers)

    # brute force: one forward pass over all training cases at once, inputs kept whole
    direct = build_for_run(cfg, 1)
    direct.load_state_dict({k: torch.as_tensor(v) for k, v in pretrained.items()})
    direct.eval()
    images = torch.from_numpy(np.stack([trainer.train_set.arrays(i).image
                                        for i in range(len(trainer.train_set))]).astype(np.float32))
    assert len(trainer.train_set) % cfg.batch_size, "uneven batches exercise the merging"
    seen = {}
    hooks = [m.register_forward_pre_hook(lambda mod, a, n=n: seen.__setitem__(n, a[0].clone()))
             for n, m in direct.named_modules() if n in layers]
    with torch.no_grad():
        direct(images)
    for h in hooks:
        h.remove()
    for name in layers:
        x = seen[name].double().numpy().transpose(1, 0, 2, 3).reshape(seen[name].shape[1], -1)
        np.testing.assert_allclose(stats[name][0], x.mean(axis=1), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(stats[name][1], x.var(axis=1), rtol=1e-5, atol=1e-6)
    # independent of any hook: the first BatchNorm's input is the first convolution's output
    with torch.no_grad():
        first = direct.encoder.in_conv[0](images).double().numpy()
    for got, want in zip(stats["encoder.in_conv.1"], (first.mean(axis=(0, 2, 3)),
                                                      first.var(axis=(0, 2, 3)))):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------- the whole server
def test_fedap_sends_each_client_only_its_own_aggregate_and_keeps_bn_local(
        tiny_federation, tmp_path, task_identity):
    from strategies.server_app import run_server

    cfg = tiny_run_config(tiny_federation, tmp_path, strategy="FedAP", model="unet", rounds=4,
                          fedap_pretrain_rounds=2, iters=1, eval_every=1)
    grid = InProcessGrid(cfg)
    run_server(grid, cfg)
    exp = cfg.out_dir
    worker = next(iter(grid.workers.values()))
    all_keys = set(worker.trainer.keys(["all"]))
    bn = set(worker.trainer.keys(["bn"]))
    assert bn and bn < all_keys
    cid_of = {node: w.trainer.cid for node, w in grid.workers.items()}
    train = {r: {node: (sent, reply) for op, rr, node, sent, reply in grid.traffic
                 if op == "train" and rr == r} for r in (1, 2, 3, 4)}
    assert [len(train[r]) for r in train] == [3, 3, 3, 3]
    assert [op for op, *_ in grid.traffic].count("evaluate") == 3

    # rounds 1-2: FedAvg, everything shared, one model for all; round 3: the pre-trained model
    for r in (1, 2, 3):
        sent = [s for s, _ in train[r].values()]
        assert all(set(s) == all_keys for s in sent)
        for s in sent[1:]:
            for k in all_keys:
                np.testing.assert_array_equal(s[k], sent[0][k])
    for r in (1, 2):
        assert all(set(reply["arrays"]) == all_keys for _, reply in train[r].values())
    # round 3 replies: non-BN arrays and the statistics; nothing of BatchNorm after that
    replies3 = {cid_of[n]: reply["arrays"] for n, (_, reply) in train[3].items()}
    for arrays in replies3.values():
        model, stats = split_stats(arrays)
        assert set(model) == all_keys - bn and stats
    for _, reply in train[4].values():
        assert set(reply["arrays"]) == all_keys - bn
    for sent, _ in train[4].values():
        assert set(sent) == all_keys - bn

    # round 4: node n holds exactly sum_j W_ij theta_j of round 3 for its own client i
    cids = sorted(replies3)
    split = [split_stats(replies3[c]) for c in cids]
    w = fedap_weights([s for _, s in split], cfg.params.fedap_lambda)
    payloads = {}
    for node, (sent, _) in train[4].items():
        i = cids.index(cid_of[node])
        for k in all_keys - bn:
            expected = sum(w[i, j] * split[j][0][k].astype(np.float64) for j in range(len(cids)))
            np.testing.assert_allclose(sent[k], expected, rtol=1e-5, atol=1e-7)
        payloads[cid_of[node]] = sent
    float_keys = [k for k in all_keys - bn if payloads[0][k].dtype.kind == "f"]
    for a, b in itertools.combinations(cids, 2):
        assert any(not np.array_equal(payloads[a][k], payloads[b][k]) for k in float_keys), \
            f"clients {a} and {b} received the same model"
    # nobody's BN statistics keys leak into a model key, and the global record has no BN
    assert not any(k.startswith(STATS_PREFIX) for k in all_keys)
    latest = load(exp / "global" / "latest.pt")
    assert latest["round"] == 4 and set(latest["arrays"]) == all_keys - bn

    # personal models deployed, chosen in the FedAP phase
    assert not (exp / "global" / "best.pt").exists()
    for k in range(3):
        assert load(exp / f"client{k}" / "best.pt")["round"] in (3, 4)
    with open(exp / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted((int(r["round"]), int(r["client"])) for r in rows) == \
        [(r, c) for r in (1, 2, 3, 4) for c in range(3)]

    results = score_personal_models(cfg)


# ---------------------------------------------------------------------- defaults and refusals
def test_defaults_and_preflight_refusals_name_the_key():
    import flower_runner
    from configs import RunConfig
    from methods.registry import get_method

    cfg = flower_runner.resolve_layers(flower_runner.parse_args(
        ["--strategy", "fedap", "--img_class", "faz"]))[0]
    assert (cfg.strategy, cfg.model, cfg.procedure, cfg.params.fedap_lambda) == \
        ("FedAP", "unet", "pce", 0.5)
    entry = get_method("FedAP")
    assert cfg.params.fedap_pretrain(cfg.rounds) == cfg.rounds // 10
    assert entry.deploys == "personal" and entry.round_keys == (FEDAP_PHASE,)
    ok = RunConfig(strategy="FedAP", model="unet", procedure="pce", rounds=3)
    assert ok.params.fedap_pretrain(ok.rounds) == 1
    preflight.check_names(ok)
    # the automatic choice leaves the statistics round and one personalised round
    smoke = RunConfig(strategy="FedAP", model="unet", procedure="pce", rounds=2)
    assert smoke.params.fedap_pretrain(smoke.rounds) == 0
    preflight.check_names(smoke)
    assert RunConfig(strategy="FedAP").params.fedap_pretrain(30) == 3
    for values, key in (({"rounds": 4, "fedap_pretrain_rounds": 3}, "fedap_pretrain_rounds"),
                        ({"rounds": 4, "fedap_pretrain_rounds": 4}, "fedap_pretrain_rounds"),
                        ({"rounds": 1}, "fedap_pretrain_rounds"),
                        ({"num_clients": 1}, "num_clients")):
        cfg = RunConfig.build(**{"strategy": "FedAP", "model": "unet", "procedure": "pce",
                                 "rounds": 10, **values})
        with pytest.raises(preflight.PreflightError, match=f"^--{key}: "):
            preflight.check_names(cfg)
    for bad in ({"fedap_lambda": 1.5}, {"fedap_pretrain_rounds": -1}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            RunConfig.build(strategy="FedAP", **bad).validate()


def test_a_client_without_statistics_in_the_collection_round_stops_the_run():
    from configs import RunConfig
    from methods.fedap import FedAP

    strategy = FedAP(RunConfig.build(strategy="FedAP", num_clients=3, rounds=5,
                                     fedap_pretrain_rounds=2))
    stats = hand_stats()
    with pytest.raises(RuntimeError, match=r"client\(s\) \[4\] sent none usable"):
        strategy._compute_weights(3, [0, 4, 2], [stats[0], {}, stats[2]], {})
    with pytest.raises(RuntimeError, match=r"client\(s\) \[2\].*diverged"):
        strategy._compute_weights(3, [0, 4, 2], stats[:3], {2: "diverged"})
    strategy._compute_weights(3, [4, 0, 2], stats[:3], {})  # rows ordered by client id
    assert strategy.cids == [0, 2, 4]
    np.testing.assert_allclose(strategy.weights,
                               fedap_weights([stats[1], stats[2], stats[0]], 0.5))
