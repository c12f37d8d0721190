"""FedICRA-ref: the reference FedICRA code's round, replayed independently and compared.

The replay below restates the reference's ``MyModel.set_weights`` (``code/flower_common.py``) and
its server loop: every call loads the whole global model; it returns there when the first
parameter of the old local model equals the global one (which happens after every evaluation,
since evaluation calls the same function) or while ``iter_global <= 50``; otherwise it blends
the decoder side with W restarting at all ones, written with global and local swapped
(``theta = G + (L - G) W``). Evaluation runs every ``eval_iters = 20`` iterations after the fit
and scores the freshly blended model. Our rule is written the other way round (W kept,
``theta = L + (G - L) W``, reset and validation as keys), so agreement is a real check.
"""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from clients.rules.base import head_split_train
from clients.rules.ala import resets_after
from clients.trainer import SiteTrainer
from configs import RunConfig
from losses.pce import partial_cross_entropy
from configs.layers import method_layer
from methods.registry import get_method

from conftest import tiny_run_config

ITERS, EVAL_ITERS, WARMUP, ROUNDS = 10, 20, 50, 8


def ref_config(root, out, **extra):
    name, defaults = method_layer("FedICRA-ref")
    defaults.update(dict(strategy=name, rounds=ROUNDS, iters=ITERS, rep_iters=3, eval_every=EVAL_ITERS // ITERS,
                         ala_max_epochs=3, procedure="pce_gatedcrf_mstree", crf_radius=2,
                         model="unet_lc_multihead", tb_images_every=100, prefetch=0))
    defaults.update(extra)
    return tiny_run_config(root, out, **defaults)


class ReferenceSite:
    """The reference's client model and its ``set_weights``, on a trainer for data and steps."""

    def __init__(self, trainer: SiteTrainer):
        self.t = trainer
        self.start_phase = True
        names = {n for n, _ in trainer.model.named_parameters()}  # the reference's local_keys
        self.blended = [k for k in trainer.keys(["decoder", "out_conv"]) if k in names]

    def set_weights(self, global_state, iter_global: int, seed_round: int):
        model = self.t.model
        old_local = copy.deepcopy(model)
        model.load_state_dict(global_state)
        first_old, first_new = next(old_local.parameters()), next(model.parameters())
        if torch.sum(first_old - first_new) == 0 or iter_global <= WARMUP:
            return
        params = dict(model.named_parameters())
        local = dict(old_local.named_parameters())
        temp = copy.deepcopy(model)
        temp_params = dict(temp.named_parameters())
        for name, p in temp_params.items():
            p.requires_grad_(name in self.blended)
        weights = {n: torch.ones_like(params[n]) for n in self.blended}  # reset every call

        def mix():
            with torch.no_grad():
                for n in self.blended:
                    temp_params[n].copy_(params[n] + (local[n] - params[n]) * weights[n])

        mix()
        temp.train()
        seed = self.t.cfg.seed * 7919 + self.t.cid * 131 + seed_round
        losses = []
        while True:
            for batch in self.t.sample_batches(self.t.cfg.params.ala_rand_percent, seed):
                temp.zero_grad(set_to_none=True)
                logits = temp(batch["image"], site=self.t.cid).logits
                loss = partial_cross_entropy(logits, batch["label"], ignore_index=self.t.task.unlabelled)
                loss.backward()
                with torch.no_grad():
                    for n in self.blended:
                        if temp_params[n].grad is not None:
                            weights[n] = torch.clamp(
                                weights[n] - 1.0 * temp_params[n].grad * (local[n] - params[n]), 0, 1)
                mix()
            losses.append(loss.item())
            if not self.start_phase:
                break
            if len(losses) > 10 and np.std(losses[-10:]) < 0.1:
                break
            if len(losses) >= self.t.cfg.params.ala_max_epochs:  # the test's cost cap, ours too
                break
        self.start_phase = False
        with torch.no_grad():
            for n in self.blended:
                params[n].copy_(temp_params[n])


def aggregate(state, server_round: int):
    """A stand-in for the server: the site's model averaged with a drifting other site."""
    gen = torch.Generator().manual_seed(100 + server_round)
    return {k: (v + 0.025 * torch.randn(v.shape, generator=gen)) if v.is_floating_point() else v
            for k, v in state.items()}


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same(ours, theirs, what, exact=False):
    assert ours.keys() == theirs.keys()
    for k in ours:
        if exact:
            assert torch.equal(ours[k], theirs[k]), f"{what}: {k}"
        else:
            assert torch.allclose(ours[k].float(), theirs[k].float(), atol=1e-6, rtol=1e-5), f"{what}: {k}"


def test_fedicra_ref_replays_the_reference_round_over_8_rounds(tiny_federation, tmp_path):
    cfg = ref_config(tiny_federation, tmp_path)
    ours = SiteTrainer(cfg, cid=1)
    ref = ReferenceSite(SiteTrainer(ref_config(tiny_federation, tmp_path / "replay"), cid=1))
    ref.t.model.load_state_dict(ours.model.state_dict())
    shared = ours.keys(["all"])

    seen = {"start": {}, "trained": {}, "validated": {}}
    local_train = ours.rule.local_train

    def recording_train(trainer, server_round):
        seen["start"][server_round] = snapshot(trainer.model)
        out = local_train(trainer, server_round)
        seen["trained"][server_round] = snapshot(trainer.model)
        return out

    ours.rule.local_train = recording_train
    validate = ours.validate_and_checkpoint

    def recording_validate(server_round, log_images, model=None):
        seen["validated"][server_round] = snapshot(model if model is not None else ours.model)
        return validate(server_round, log_images, model=model)

    ours.validate_and_checkpoint = recording_validate

    global_state = snapshot(ours.model)  # round 1 carries the common initial model
    ref_validated = {}
    blends = []
    for r in range(1, ROUNDS + 1):
        arrays = {k: v.numpy() for k, v in global_state.items()}
        config = {"server-round": r, "share-include": "all", "share-exclude": ""}
        ours.train(arrays, config)

        ref.t.seed_round(r)
        if r > 1 and ((r - 1) * ITERS) % EVAL_ITERS == 0:  # the evaluation after round r - 1
            ref.set_weights(global_state, (r - 1) * ITERS, seed_round=r)
            ref_validated[r - 1] = snapshot(ref.t.model)
        before = snapshot(ref.t.model)
        ref.set_weights(global_state, r * ITERS, seed_round=r)
        blends.append(any(not torch.equal(before[k], v) and not torch.equal(global_state[k], v)
                          for k, v in snapshot(ref.t.model).items()))
        assert_same(seen["start"][r], snapshot(ref.t.model), f"round {r} start of training")
        # the two blends are written differently (G + (L - G) W' against L + (G - L) W), so
        # they agree to rounding only; AdamW's first steps would magnify that, so the replay
        # trains from our start and must then agree exactly
        ref.t.model.load_state_dict(seen["start"][r])
        ref.t.optimizer = ref.t.new_optimizer()
        head_split_train(ref.t, ITERS, cfg.params.rep_iters)
        assert_same(seen["trained"][r], snapshot(ref.t.model), f"round {r} after training", exact=True)
        global_state = aggregate(snapshot(ours.model), r)

    metrics = ours.evaluate({k: v.numpy() for k, v in global_state.items()},
                            {"server-round": ROUNDS, "share-include": "all", "share-exclude": ""})
    ref.t.seed_round(ROUNDS + 1)
    ref.set_weights(global_state, ROUNDS * ITERS, seed_round=ROUNDS + 1)
    ref_validated[ROUNDS] = snapshot(ref.t.model)
    assert sorted(seen["validated"]) == sorted(ref_validated) == [2, 4, 6, 8]
    for r in ref_validated:
        assert_same(seen["validated"][r], ref_validated[r], f"model validated for round {r}")
    assert 0.0 <= metrics["val_dice"] <= 1.0
    # the schedule the reference produces: whole global model through iteration 50, then a
    # blend only in the rounds that do not follow an evaluation (60 and 80, not 70)
    assert blends == [False] * 5 + [True, False, True]


def test_resets_after_counts_local_iterations():
    assert [resets_after(r, 10, 20) for r in range(1, 7)] == [False, True, False, True, False, True]
    assert [resets_after(r, 15, 20) for r in range(1, 5)] == [False, True, True, True]
    assert not any(resets_after(r, 10, 0) for r in range(1, 5))


def test_warmup_is_counted_in_iterations(tiny_federation, tmp_path):
    """Blending starts after ala_warmup_iters local iterations, whatever iters is."""
    for iters, first_blend in ((2, 4), (3, 3)):
        cfg = tiny_run_config(tiny_federation, tmp_path / str(iters), rounds=5, iters=iters,
                              rep_iters=1, ala_warmup_iters=6, ala_max_epochs=1)
        t = SiteTrainer(cfg, cid=0)
        blended_rounds = []
        for r in range(1, 6):
            arrays = aggregate(snapshot(t.model), r)
            t.rule.last_losses = []
            t.train({k: v.numpy() for k, v in arrays.items()},
                    {"server-round": r, "share-include": "all", "share-exclude": ""})
            if t.rule.last_losses:
                blended_rounds.append(r)
        assert blended_rounds[0] == first_blend, (iters, blended_rounds)


def test_fedicra_warms_up_for_the_references_50_iterations():
    assert get_method("FedICRA").params().ala_warmup_iters == 50
    assert get_method("FedICRA-ref").params().ala_warmup_iters == 50
    ref = get_method("FedICRA-ref").params()
    assert ref.ala_reset_weights and ref.ala_validate_blend and ref.ala_reset_every_iters == 20


def test_reset_weights_key_restarts_w_at_every_call():
    from clients.ala import AdaptiveAggregator

    net = torch.nn.Linear(3, 1)
    target = {"weight": torch.zeros(1, 3), "bias": torch.zeros(1)}
    batches = [{"x": torch.ones(4, 3), "y": torch.full((4, 1), 5.0)}]

    def loss(model, batch):
        return ((model(batch["x"]) - batch["y"]) ** 2).mean()

    for reset, expect_same_start in ((True, True), (False, False)):
        ala = AdaptiveAggregator(eta=0.1, max_epochs=1, w_init=1.0, reset=reset)
        ala.start_phase = False
        ala.blend(copy.deepcopy(net), target, loss, lambda e: batches)
        first = {k: v.clone() for k, v in ala.weights.items()}
        assert any(not torch.all(v == 1) for v in first.values())
        seen = []
        probe = copy.deepcopy(net)
        orig = ala._apply

        def spy(probe_params, local, delta):
            seen.append({k: v.clone() for k, v in ala.weights.items()})
            return orig(probe_params, local, delta)

        ala._apply = spy
        ala.blend(probe, target, loss, lambda e: batches)
        started_at_one = all(torch.all(v == 1) for v in seen[0].values())
        assert started_at_one == expect_same_start


def test_renamed_warmup_key_is_refused_with_its_replacement():
    with pytest.raises(ValueError, match="ala_warmup_rounds.*ala_warmup_iters"):
        RunConfig.from_mapping({"ala_warmup_rounds": 5}, "old.toml")
