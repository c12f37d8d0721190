"""MetaFed: the ring order of a pass, who teaches whom, copy-or-distil by the validation flag,
the detached feature distillation and the personalisation weight."""
from __future__ import annotations

import copy
import csv
from collections import Counter

import numpy as np
import pytest
import torch

import preflight
from conftest import (InProcessGrid, score_personal_models, task_identity,  # noqa: F401
                      tiny_run_config)


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_arrays(a, b):
    assert set(a) == set(b)
    for k in a:
        np.testing.assert_array_equal(np.asarray(a[k]).reshape(np.shape(b[k])), np.asarray(b[k]))


# ---------------------------------------------------------------------- the whole server
def test_ring_passes_in_client_order_and_personalises_from_the_last_ring_model(
        tiny_federation, tmp_path, task_identity):
    from strategies.server_app import run_server

    cfg = tiny_run_config(tiny_federation, tmp_path, strategy="MetaFed", model="unet",
                          rounds=3, iters=2, eval_every=1, prefetch=0)
    grid = InProcessGrid(cfg)
    run_server(grid, cfg)
    exp = cfg.out_dir
    cid = {node: w.cid for node, w in grid.workers.items()}

    ops = [(op, r) for op, r, *_ in grid.traffic]
    assert ops == [("train", r) for r in (1, 2, 3, 4) for _ in range(3)] + [("evaluate", 4)] * 3
    by_round = {r: [t for t in grid.traffic if t[0] == "train" and t[1] == r] for r in (1, 2, 3, 4)}

    # warm-up: one common initial model for everyone, nothing comes back
    first = by_round[1][0][3]
    for _, _, _, sent, reply in by_round[1]:
        assert_same_arrays(sent, first)
        assert reply["arrays"] == {}
    # ring passes: client-id order, site k learns from site k-1's reply of the same pass,
    # site 0 from the last site's model of the previous pass (nothing in the first pass)
    previous_last = None
    for r in (2, 3):
        steps = by_round[r]
        assert [cid[node] for _, _, node, _, _ in steps] == [0, 1, 2]
        if previous_last is None:
            assert steps[0][3] == {}
        else:
            assert_same_arrays(steps[0][3], previous_last)
        for k in (1, 2):
            assert_same_arrays(steps[k][3], steps[k - 1][4]["arrays"])
        for _, _, _, sent, reply in steps:
            assert set(reply["arrays"]) == set(first), "a ring reply is the whole model"
        previous_last = steps[2][4]["arrays"]
    # personalisation: every site gets the last ring model and sends nothing back
    for _, _, _, sent, reply in by_round[4]:
        assert_same_arrays(sent, previous_last)
        assert reply["arrays"] == {}
    latest = load(exp / "global" / "latest.pt")
    assert latest["round"] == 3
    assert_same_arrays({k: v.numpy() for k, v in latest["arrays"].items()}, previous_last)
    assert not (exp / "global" / "best.pt").exists(), "MetaFed deploys personal models"

    for worker in grid.workers.values():
        trainer = worker.trainer
        assert trainer.step == 4 * 2 and trainer.rounds_done == 4
        assert trainer.total_steps == 4 * 2, "one poly decay over the rounds + 1 rounds"
        assert (exp / f"client{trainer.cid}" / "best.pt").is_file()
    with open(exp / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert Counter(int(r["round"]) for r in rows) == {1: 3, 2: 3, 3: 3, 4: 3}
    assert all(r["val_dice"] for r in rows)

    results = score_personal_models(cfg)


# ---------------------------------------------------------------------- one site
def site(tiny_federation, tmp_path, **overrides):
    from clients.trainer import SiteTrainer

    values = dict(strategy="MetaFed", model="unet", rounds=3, iters=1, prefetch=0)
    values.update(overrides)
    trainer = SiteTrainer(tiny_run_config(tiny_federation, tmp_path, **values), cid=1)
    batch = trainer.next_batch()
    trainer.next_batch = lambda: batch  # the same batch at every step
    keys = trainer.keys(["all"])
    teacher = {k: v + 0.05 if v.dtype.kind == "f" else v
               for k, v in trainer.state_of(keys).items()}
    return trainer, batch, keys, teacher


def float_state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()
            if not k.endswith("num_batches_tracked")}


def assert_states_close(a, b, atol=0.0):
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=atol, msg=k)


def test_distillation_adds_lambda_times_feature_mse_to_a_frozen_teacher(tiny_federation, tmp_path):
    trainer, batch, keys, teacher_arrays = site(tiny_federation, tmp_path, metafed_lambda=0.7)
    rule = trainer.rule
    rule.flag = True
    student = copy.deepcopy(trainer.model)
    rule.receive(trainer, teacher_arrays, keys, 2)
    assert_states_close(float_state(trainer.model), float_state(student))  # not copied
    teacher = rule.teacher
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())

    # by hand: the student's training forward (same dropout seed) against the eval teacher
    cfg = trainer.cfg
    torch.manual_seed(cfg.seed * 1_000_003 + trainer.cid * 10_007 + trainer.step)
    student.train()
    out = student(batch["image"])
    reference = copy.deepcopy(student)
    reference.load_state_dict({k: torch.as_tensor(v).reshape(reference.state_dict()[k].shape)
                               for k, v in teacher_arrays.items()})
    reference.eval()
    with torch.no_grad():
        target = reference(batch["image"]).decoder_features
    expected = 0.7 * ((out.decoder_features - target) ** 2).mean()
    objective = trainer.objective(student, out, batch["image"], batch["label"], site=1,
                                  num_sites=cfg.num_clients).total

    metrics = rule.local_train(trainer, 2)
    assert metrics["extra"] == pytest.approx(float(expected.detach()), rel=1e-5)
    assert metrics["total"] == pytest.approx(float((objective + expected).detach()), rel=1e-5)
    assert metrics["metafed_lambda"] == 0.7 and metrics["metafed_flag"] == 1.0
    for k, v in teacher.state_dict().items():  # the step left the teacher as received
        np.testing.assert_array_equal(v.numpy(), np.asarray(teacher_arrays[k]).reshape(v.shape))
    assert all(p.grad is None for p in teacher.parameters())


def test_the_distillation_term_sends_no_gradient_to_the_teacher():
    from networks import build

    from methods.metafed import feature_distillation

    torch.manual_seed(0)
    student, teacher = (build("unet", in_chns=1, num_classes=2, base_channels=4) for _ in range(2))
    teacher.train()  # feature_distillation puts it in eval mode itself
    image = torch.rand(2, 1, 32, 32)
    features = student(image).decoder_features
    before = float_state(teacher)
    term = feature_distillation(features, teacher, image, lam=2.0)
    term.backward()
    assert all(p.grad is None for p in teacher.parameters()), "the teacher is detached"
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    assert not teacher.training
    assert_states_close(float_state(teacher), before)  # eval mode: no BN statistics moved


def test_lambda_zero_is_a_plain_step(tiny_federation, tmp_path):
    a, _, keys, teacher = site(tiny_federation, tmp_path, metafed_lambda=0.0)
    b, _, _, _ = site(tiny_federation, tmp_path, metafed_lambda=0.0)
    b.load_state_dict(a.state_dict())
    b.next_batch = a.next_batch
    a.rule.flag = True
    a.rule.receive(a, teacher, keys, 2)
    a.rule.local_train(a, 2)
    b.total_steps = a.total_steps
    b.run_iterations(1, lambda name: True)
    assert_states_close(float_state(a.model), float_state(b.model))


def test_flag_off_copies_the_teacher_then_trains_without_distillation(tiny_federation, tmp_path,
                                                                      monkeypatch):
    import methods.metafed as metafed

    monkeypatch.setattr(metafed, "validate", lambda *args, **kwargs: (0.1, {}))
    a, _, keys, teacher = site(tiny_federation, tmp_path, metafed_lambda=5.0)
    b, _, _, _ = site(tiny_federation, tmp_path)
    b.load_state_dict(a.state_dict())
    b.next_batch = a.next_batch
    assert a.rule.flag is False
    a.rule.receive(a, teacher, keys, 2)
    copied = a.model.state_dict()
    for k, v in teacher.items():
        if not k.endswith("num_batches_tracked"):
            np.testing.assert_array_equal(copied[k].numpy(), np.asarray(v).reshape(copied[k].shape))
    metrics = a.rule.local_train(a, 2)
    assert "extra" not in metrics and metrics["metafed_lambda"] == 0.0
    b.load_arrays(teacher, [k for k in keys if not k.endswith("num_batches_tracked")])
    b.total_steps = a.total_steps
    b.run_iterations(1, lambda name: True)
    assert_states_close(float_state(a.model), float_state(b.model))


def test_the_flag_comes_from_the_validation_split_and_stays_on(tiny_federation, tmp_path,
                                                               monkeypatch):
    import methods.metafed as metafed

    scored = []
    dice = {"value": 0.3}

    def fake_validate(model, dataset, site, device, **kwargs):
        scored.append(dataset.split)
        return dice["value"], {}

    monkeypatch.setattr(metafed, "validate", fake_validate)
    trainer, _, keys, _ = site(tiny_federation, tmp_path, metafed_threshold=0.6)
    warm = {"server-round": 1, "share-include": "", "share-exclude": ""}
    trainer.train(trainer.state_of(keys), warm)
    assert trainer.rule.flag is False and scored == ["val"]
    dice["value"] = 0.61
    trainer.train({}, {"server-round": 2, "share-include": "all", "share-exclude": ""})
    assert trainer.rule.flag is True and scored == ["val", "val"]
    assert trainer.state_dict()["rule"] == {"flag": True}
    dice["value"] = 0.0  # never switched off again, and no more validation needed
    trainer.train({}, {"server-round": 3, "share-include": "all", "share-exclude": ""})
    assert trainer.rule.flag is True and scored == ["val", "val"]


@pytest.mark.parametrize("own, teacher, expected", [
    (0.7, 0.4, 0.0),                      # worse and below the threshold: no teaching
    (0.3, 0.3, 0.0),                      # equal and below the threshold
    (0.6, 0.6, 0.1),                      # equal, above the threshold: lam / 10
    (0.5, 0.7, 1.0),                      # 0.2 better: the full lam
    (0.5, 0.9, 1.0),                      # capped at lam
    (0.6, 0.7, 10 ** 0.5 / 10),
    (0.9, 0.7, 10 ** -1.0 / 10),          # worse but above the threshold: small weight
])
def test_personalisation_weight_follows_the_original_formula(own, teacher, expected):
    from methods.metafed import personal_lambda

    assert personal_lambda(own, teacher, 1.0, 0.5) == pytest.approx(expected)
    assert personal_lambda(own, teacher, 3.0, 0.5) == pytest.approx(3 * expected)


def test_personalisation_scores_site_and_teacher_on_validation(tiny_federation, tmp_path,
                                                               monkeypatch):
    import methods.metafed as metafed

    trainer, _, keys, teacher = site(tiny_federation, tmp_path, metafed_lambda=2.0)
    own_model = trainer.model
    monkeypatch.setattr(metafed, "validate", lambda model, dataset, *a, **k:
                        (0.5 if model is own_model else 0.6, {}))
    trainer.rule.flag = True
    trainer.rule.receive(trainer, teacher, keys, 4)  # rounds + 1
    assert trainer.rule.lam == pytest.approx(2.0 * 10 ** 0.5 / 10)
    metrics = trainer.rule.local_train(trainer, 4)
    assert metrics["metafed_own_val_dice"] == 0.5 and metrics["metafed_teacher_val_dice"] == 0.6
    assert metrics["metafed_lambda"] == pytest.approx(2.0 * 10 ** 0.5 / 10) and metrics["extra"] > 0
    with pytest.raises(ValueError, match="last model of the ring"):
        trainer.rule.receive(trainer, {}, keys, 4)
    with pytest.raises(ValueError, match="personalises in round 4"):
        trainer.rule.receive(trainer, teacher, keys, 5)


@pytest.mark.parametrize("model, procedure", [("unet_lc", "pce_sc"),
                                              ("unet_lc_multihead", "pce_gatedcrf_mstree")])
def test_every_network_distils_its_penultimate_features(tiny_federation, tmp_path, model,
                                                        procedure):
    trainer, _, keys, teacher = site(tiny_federation, tmp_path, model=model, procedure=procedure)
    trainer.rule.flag = True
    trainer.rule.receive(trainer, teacher, keys, 2)
    metrics = trainer.rule.local_train(trainer, 2)
    assert np.isfinite(metrics["total"]) and metrics["extra"] > 0


# ---------------------------------------------------------------------- refusals
@pytest.mark.parametrize("values, key", [
    ({"rounds": 1}, "rounds"),
    ({"num_clients": 1}, "num_clients"),
])
def test_preflight_refuses_what_metafed_cannot_do_naming_the_key(values, key):
    from configs import RunConfig

    cfg = RunConfig(**{"strategy": "MetaFed", "model": "unet", "procedure": "pce", **values})
    with pytest.raises(preflight.PreflightError, match=f"^--{key}: "):
        preflight.check_names(cfg)


@pytest.mark.parametrize("key, value", [("metafed_lambda", -1.0), ("metafed_threshold", 1.5),
                                        ("metafed_teacher_threshold", -0.1)])
def test_config_ranges_name_the_key(key, value):
    from configs import RunConfig

    with pytest.raises(ValueError, match=key):
        RunConfig.build(**{"strategy": "MetaFed", key: value}).validate()
