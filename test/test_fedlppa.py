"""FedLPPA (Lin et al., IEEE TMI 2024): network, loss terms, server aggregation, site round.

The network has the reference's layers and parameter count; the prompt and pseudo-label terms
match brute-force formulas; through the server every array leaves a site, each site's
distribution prompt comes back as that site's own, the auxiliary decoder each site receives is
the prompt-affinity mean computed by hand from the previous round's replies, and the personal
models are scored by ``test_client.py``.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import preflight
from conftest import (InProcessGrid, score_personal_models, task_identity,  # noqa: F401
                      tiny_run_config)
from losses.lppa import prompt_divergence_loss, pseudo_label_dice_loss, squared_dice_loss
from methods.fedlppa import (AUX_PREFIX, DISTRIBUTION_KEY, UNIVERSAL_KEY, aux_sources,
                             prompt_affinity)
from networks import build

# ---------------------------------------------------------------------- network


def test_network_matches_the_reference_size_and_routes_the_prompts():
    net = build("unet_lppa", 1, 2, base_channels=16, img_size=256, num_sites=5, label_form="box")
    # UNet_UniV5 of llmir/FedLPPA at 256 px, five sites (counted from that code)
    assert sum(p.numel() for p in net.parameters()) == 2_897_430
    assert len(net.state_dict()) == 252
    assert net.prompts.distribution.shape == (5, 16, 16) and net.prompts.universal.shape == (1, 16, 16)
    assert net.sparsity_prompt(torch.zeros(1, 4, 4))[:, 0, 0].tolist() == [0.0, 1.0, 0.0]
    for form, expected in (("scribble_noisy", [1, 0, 0]), ("point", [0, 0, 1]), ("mask", [0, 0, 0])):
        small = build("unet_lppa", 1, 2, base_channels=2, img_size=32, num_sites=2, label_form=form)
        assert small.sparsity_prompt(torch.zeros(1, 2, 2))[:, 0, 0].tolist() == expected

    torch.manual_seed(0)
    net = build("unet_lppa", 1, 2, base_channels=4, img_size=32, num_sites=3, site=1).eval()
    with torch.no_grad():
        for m in net.modules():  # attention on, so every branch reaches the output
            if hasattr(m, "gamma"):
                m.gamma.fill_(0.5)
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        before = net(x).logits.clone()
        net.prompts.distribution[0] += 1.0  # another site's prompt: no effect in eval
        assert torch.equal(net(x).logits, before)
        assert not torch.equal(net(x, site=0).logits, before)
        net.prompts.distribution[1] += 1.0  # the own prompt changes the prediction
        assert not torch.allclose(net(x).logits, before)
    out = net.train().forward_train(x)
    assert len(out.fused) == 3 and out.aux_logits.shape == out.seg.logits.shape == (2, 2, 32, 32)
    with pytest.raises(ValueError, match="built for 32x32"):
        net(torch.randn(1, 1, 48, 48))
    with pytest.raises(ValueError, match="img_size"):
        build("unet_lppa", 1, 2, img_size=40)


# ---------------------------------------------------------------------- loss terms
def test_prompt_divergence_matches_brute_force_and_gives_others_no_gradient():
    torch.manual_seed(1)
    fused = [torch.randn(2, 5, 3, 3, requires_grad=True) for _ in range(3)]
    got = prompt_divergence_loss(fused, 1)
    want = 0.0
    for k in (0, 2):
        p = F.softmax(fused[1], 1)
        q = F.softmax(fused[k], 1)
        want = want + (p * (p.log() - q.log())).sum(1).mean()
    torch.testing.assert_close(got, -want / 2)
    got.backward()
    assert fused[0].grad is None and fused[2].grad is None and fused[1].grad.abs().sum() > 0

    ref = prompt_divergence_loss([f.detach() for f in fused], 1, "reference")
    want = 0.0
    for k in (0, 2):
        t, x = fused[k].detach(), fused[1].detach()
        elem = torch.where(t > 0, t * (t.clamp_min(1e-30).log() - x), torch.zeros_like(t))
        want += elem.mean()
        # what torch.nn.KLDivLoss computed before it returned NaN for negative targets
        pos = t > 0
        torch.testing.assert_close(elem[pos].sum() / t.numel(),
                                   F.kl_div(x[pos], t[pos], reduction="sum") / t.numel())
    torch.testing.assert_close(ref, -want / 2)
    assert float(prompt_divergence_loss([f.detach() for f in fused[:1]], 0)) == 0.0
    with pytest.raises(ValueError, match="form"):
        prompt_divergence_loss(fused, 0, "mse")


def test_pseudo_label_term_is_the_mean_dice_of_both_decoders_to_the_mixed_argmax():
    torch.manual_seed(2)
    main, aux = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)

    def dice(p, y):
        per_class = []
        for c in range(p.shape[1]):
            pc, yc = p[:, c], (y == c).float()
            per_class.append(1 - (2 * (pc * yc).sum() + 1e-5) / ((pc * pc).sum() + (yc * yc).sum() + 1e-5))
        return sum(per_class) / len(per_class)

    for mix in (0.0, 0.3, 1.0):
        pm, pa = main.softmax(1), aux.softmax(1)
        y = (mix * pm + (1 - mix) * pa).argmax(1)
        want = (dice(pm, y) + dice(pa, y)) / 2
        torch.testing.assert_close(pseudo_label_dice_loss(main, aux, mix), want)
    # a perfect one-hot prediction of the label has no loss
    label = torch.randint(0, 3, (2, 4, 4))
    assert float(squared_dice_loss(F.one_hot(label, 3).permute(0, 3, 1, 2).float(), label)) < 1e-6
    with pytest.raises(ValueError, match="mix"):
        pseudo_label_dice_loss(main, aux, 1.5)


# ---------------------------------------------------------------------- server pieces
def test_affinity_and_the_choice_of_auxiliary_decoders():
    rng = np.random.default_rng(0)
    dist, uni = rng.normal(size=(4, 3, 3)), rng.normal(size=(1, 3, 3))
    c = prompt_affinity(dist, uni)
    for i in range(4):
        for k in range(4):
            a = np.concatenate([dist[i].ravel(), uni.ravel()])
            b = np.concatenate([dist[k].ravel(), uni.ravel()])
            assert c[i, k] == pytest.approx(max(0.0, a @ b / np.linalg.norm(a) / np.linalg.norm(b)))
    assert np.allclose(np.diag(c), 1.0) and (c >= 0).all()
    cids = [0, 1, 3]
    agg = aux_sources(c, cids, "aggregated", rng)
    assert agg[3] == {k: pytest.approx(c[3, k]) for k in cids}
    nearest = aux_sources(c, cids, "nearest", rng)
    assert all(list(nearest[i]) == [max((k for k in cids if k != i), key=lambda k: c[i, k])]
               for i in cids)
    assert aux_sources(c, cids, "adjacent", rng) == {0: {3: 1.0}, 1: {0: 1.0}, 3: {1: 1.0}}
    assert all(list(s)[0] in cids for s in aux_sources(c, cids, "random", rng).values())


# ---------------------------------------------------------------------- the whole server
def lppa_config(root, tmp_path, **overrides):
    values = dict(strategy="FedLPPA", model="unet_lppa", img_size=32, rounds=3, iters=2,
                  eval_every=1, ala_warmup_iters=2)
    values.update(overrides)
    return tiny_run_config(root, tmp_path, **values)


def test_fedlppa_round_trip_owned_prompts_and_per_site_auxiliary_decoders(
        tiny_federation, tmp_path, task_identity):
    from strategies.server_app import run_server

    cfg = lppa_config(tiny_federation, tmp_path, iters=1, ala_warmup_iters=1)
    grid = InProcessGrid(cfg)
    run_server(grid, cfg)
    exp = cfg.out_dir
    cid_of = {node: w.trainer.cid for node, w in grid.workers.items()}
    all_keys = set(next(iter(grid.workers.values())).trainer.keys(["all"]))
    aux = sorted(k for k in all_keys if k.startswith(AUX_PREFIX))
    assert aux and DISTRIBUTION_KEY in all_keys
    train = {r: {cid_of[n]: (sent, reply["arrays"]) for op, rr, n, sent, reply in grid.traffic
                 if op == "train" and rr == r} for r in (1, 2, 3)}
    sizes = {}
    for op, rr, n, sent, reply in grid.traffic:
        if op == "train":
            sizes[cid_of[n]] = reply["metrics"]["num-examples"]
    for r in (1, 2, 3):
        for cid, (sent, reply) in train[r].items():
            # only the model leaves a site (every array of it: FedLPPA shares the whole model)
            assert set(reply) == all_keys and set(sent) == all_keys
    for r in (2, 3):
        replies = {cid: reply for cid, (_, reply) in train[r - 1].items()}
        cids = sorted(replies)
        w = np.array([sizes[c] for c in cids], dtype=np.float64)
        dist = sum(wi * replies[c][DISTRIBUTION_KEY].astype(np.float64) for wi, c in zip(w, cids)) / w.sum()
        for c in cids:  # each site's prompt is its own
            dist[c] = replies[c][DISTRIBUTION_KEY][c]
        uni = sum(wi * replies[c][UNIVERSAL_KEY].astype(np.float64) for wi, c in zip(w, cids)) / w.sum()
        affinity = prompt_affinity(dist, uni)
        payloads = {cid: sent for cid, (sent, _) in train[r].items()}
        for i in cids:
            sent = payloads[i]
            for k in cids:
                np.testing.assert_array_equal(sent[DISTRIBUTION_KEY][k], replies[k][DISTRIBUTION_KEY][k])
            np.testing.assert_allclose(sent[UNIVERSAL_KEY], uni, rtol=1e-5, atol=1e-7)
            for key in aux:
                if key.endswith("num_batches_tracked"):
                    continue
                want = sum(affinity[i, k] * replies[k][key].astype(np.float64) for k in cids)
                np.testing.assert_allclose(sent[key], want / affinity[i, cids].sum(),
                                           rtol=1e-5, atol=1e-6)
            shared = [k for k in all_keys if not k.startswith(AUX_PREFIX) and k != DISTRIBUTION_KEY]
            for key in shared:  # everything else: one aggregate for all
                np.testing.assert_array_equal(sent[key], payloads[cids[0]][key])
        key = next(k for k in aux if k.endswith("weight"))
        assert not np.array_equal(payloads[0][key], payloads[1][key])

    results = score_personal_models(cfg)
    assert all(0.0 <= float(r["dice"]) <= 1.0 for r in results)


def test_site_loss_is_pce_plus_weighted_prompt_and_pseudo_terms(tiny_federation, tmp_path):
    from clients.trainer import SiteTrainer

    cfg = lppa_config(tiny_federation, tmp_path, lppa_alpha=0.3, lppa_beta=0.7)
    trainer = SiteTrainer(cfg, 1)
    batch = trainer.next_batch()
    torch.manual_seed(4)
    loss, terms = trainer.rule.loss_of(trainer, batch)
    assert set(terms) >= {"pce", "prompt", "pseudo", "total"}
    want = terms["pce"] + 0.3 * float(terms["prompt"]) + 0.7 * float(terms["pseudo"])
    assert float(loss) == pytest.approx(want, rel=1e-5)
    assert float(terms["prompt"]) <= 0.0  # a divergence, maximised


def test_defaults_and_refusals_name_the_key(tmp_path):
    import flower_runner
    from configs import RunConfig

    cfg = flower_runner.resolve_layers(flower_runner.parse_args(
        ["--strategy", "FedLPPA", "--img_class", "faz"]))[0]
    p = cfg.params
    assert (cfg.strategy, cfg.model, cfg.procedure) == ("FedLPPA", "unet_lppa", "pce")
    assert (p.lppa_alpha, p.lppa_beta, p.lppa_attention, p.lppa_dual_init, p.lppa_label_prompt,
            p.ala_warmup_iters) == (0.1, 0.5, "dual", "aggregated", True, 50)
    assert cfg.out_dir.parts[-3:] == ("model", "faz", "FedLPPA")
    for values, key in (({"model": "unet"}, "model"),
                        ({"model": "unet_lppa", "lppa_prompt": "onehot"}, "lppa_prompt")):
        bad = RunConfig.build(strategy="FedLPPA", img_size=32, **values)
        with pytest.raises(preflight.PreflightError, match=f"^--{key}: "):
            preflight.check_names(bad)
    for bad in ({"lppa_attention": "multi"}, {"lppa_dual_init": "best"}, {"lppa_alpha": -1.0},
                {"lppa_divergence": "mse"}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            RunConfig.build(strategy="FedLPPA", **bad).validate()


def test_server_aggregation_by_hand_on_toy_arrays():
    from configs import RunConfig
    from methods.fedlppa import FedLPPAServer
    from strategies.base import to_numpy, to_record

    rng = np.random.default_rng(3)
    replies = [{DISTRIBUTION_KEY: rng.random((3, 2, 2)).astype(np.float32),
                UNIVERSAL_KEY: rng.random((1, 2, 2)).astype(np.float32),
                "encoder.w": rng.normal(size=4).astype(np.float32),
                "aux_decoder.w": rng.normal(size=5).astype(np.float32),
                "aux_decoder.n.num_batches_tracked": np.array(7 + j, dtype=np.int64)}
               for j in range(3)]
    cids, weights = [2, 0, 1], np.array([1.0, 2.0, 3.0])
    for owner in (True, False):
        cfg = RunConfig.build(strategy="FedLPPA", model="unet_lppa", img_size=32, num_clients=3,
                              lppa_prompt_owner=owner)
        server = FedLPPAServer(cfg)
        server.last_cids = cids
        mean = server.aggregate_arrays(1, replies, list(weights))

        def wmean(key):
            return sum(w * r[key].astype(np.float64) for w, r in zip(weights, replies)) / weights.sum()

        np.testing.assert_allclose(mean["encoder.w"], wmean("encoder.w"), rtol=1e-6)
        np.testing.assert_allclose(mean[UNIVERSAL_KEY], wmean(UNIVERSAL_KEY), rtol=1e-6)
        rows = wmean(DISTRIBUTION_KEY)
        if owner:  # row c is client c's own, whatever the others sent
            for j, c in enumerate(cids):
                rows[c] = replies[j][DISTRIBUTION_KEY][c]
        np.testing.assert_allclose(mean[DISTRIBUTION_KEY], rows, rtol=1e-6)
        c = prompt_affinity(rows, wmean(UNIVERSAL_KEY))
        aux = {cid: replies[j]["aux_decoder.w"].astype(np.float64) for j, cid in enumerate(cids)}
        for i in range(3):
            want = sum(c[i, k] * aux[k] for k in range(3)) / c[i].sum()
            np.testing.assert_allclose(server.personal[i]["aux_decoder.w"], want, rtol=1e-5)
            assert set(server.personal[i]) == {"aux_decoder.w"}  # counters keep the mean
        server.node_cid = {77: 1}
        sent = to_numpy(server.payload_for(77, to_record(mean)))
        np.testing.assert_allclose(sent["aux_decoder.w"], server.personal[1]["aux_decoder.w"])
        np.testing.assert_array_equal(sent["encoder.w"], mean["encoder.w"])
        unknown = to_numpy(server.payload_for(78, to_record(mean)))
        np.testing.assert_array_equal(unknown["aux_decoder.w"], mean["aux_decoder.w"])
