"""FT (FedAvg, then local fine-tuning) and the centralised references CT-weak / CT-full.

FT: only the sites' copies change after the last federated round (the last aggregate is what
every site receives and stays the global model), each site deploys its best fine-tuned model,
and the fine-tuning runs its own learning-rate schedule. CT: the pooled set holds every site's
training cases, CT-full trains on full masks and CT-weak on weak labels only (checked on the
labels the trainer consumes), unet_lc* see each case under its own site's code, and a tiny run
of the runner writes ``global/best.pt``, which ``test_client.py`` then scores.
"""
from __future__ import annotations

import csv
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

import flower_runner
import preflight
from conftest import InProcessGrid, free_base, task_identity, tiny_run_config  # noqa: F401
from methods.ft import FINE_TUNE

REPO = Path(__file__).resolve().parents[1]


def load(path: Path):
    return torch.load(path, map_location="cpu", weights_only=True)


def resolve(*argv: str):
    return flower_runner.resolve_layers(flower_runner.parse_args(list(argv)))[0]


# ---------------------------------------------------------------------- names, defaults, refusals
def test_each_method_resolves_to_its_own_setup_from_its_name():
    from methods.registry import get_method

    ft = resolve("--strategy", "ft", "--img_class", "faz")
    assert (ft.strategy, ft.model, ft.procedure, ft.params.ft_iters, ft.params.ft_lr, ft.exp) == \
        ("FT", "unet", "pce", 200, 0.001, "faz/FT")
    weak = resolve("--strategy", "ct-weak", "--img_class", "faz")
    assert (weak.strategy, weak.model, weak.procedure, weak.label_form, weak.reset_optimizer) == \
        ("CT-weak", "unet", "pce", "", False)
    full = resolve("--strategy", "CT-full", "--img_class", "faz")
    assert (full.procedure, full.label_form) == ("ce_full", "mask")
    assert "ft_iters" not in full.to_dict(), "CT does not fine-tune"
    assert weak.params.ct_batch == full.params.ct_batch == "federation"
    entry = get_method("FT")
    assert entry.deploys == "personal" and entry.fine_tunes and entry.extra_rounds == 1
    assert entry.round_keys == (FINE_TUNE,)
    for name in ("CT-weak", "CT-full"):
        entry = get_method(name)
        assert entry.deploys == "global" and entry.federated is False
    assert get_method("FedAvg").federated


@pytest.mark.parametrize("strategy, values, key", [
    ("FT", {"ft_iters": 0}, "ft_iters"),
    ("FedAvg", {"ft_iters": 5}, "ft_iters"),
    ("CT-weak", {"label_form": "mask"}, "label_form"),
    ("CT-full", {"label_form": "", "procedure": "ce_full"}, "label_form"),
])
def test_preflight_refuses_what_a_method_cannot_do_naming_the_key(strategy, values, key):
    from configs import RunConfig

    cfg = RunConfig.build(**{"strategy": strategy, "model": "unet", "procedure": "pce", **values})
    with pytest.raises(preflight.PreflightError, match=f"^--{key}: "):
        preflight.check_names(cfg)


def test_refusal_exits_2_before_anything_is_written(tiny_federation, tmp_path, capsys):
    code = flower_runner.main(["--strategy", "CT-weak", "--img_class", "synthetic_faz",
                               "--root_path", str(tiny_federation), "--out_root", str(tmp_path),
                               "--num_clients", "3", "--set", 'label_form="mask"'])
    assert code == 2 and "--label_form" in capsys.readouterr().out
    assert not list(tmp_path.iterdir())


def test_centralised_strategies_refuse_to_run_as_a_federation():
    from methods.registry import Method, MethodParams, get_method

    for name in ("CT-weak", "CT-full"):
        entry = get_method(name)
        assert entry.server is None and entry.site is None and entry.train is not None
    with pytest.raises(ValueError, match="a federated method needs a server and a site half"):
        Method(name="CT-nope", server=None, site=None, params=MethodParams)


# ---------------------------------------------------------------------- FT, one site
class Recorder:
    """Stands in for a SummaryWriter: keeps (tag, value, step)."""

    def __init__(self):
        self.scalars = []

    def add_scalar(self, tag, value, step):
        self.scalars.append((tag, float(value), int(step)))

    def add_images(self, *args, **kwargs):
        pass

    def flush(self):
        pass

    def close(self):
        pass


@pytest.mark.parametrize("model, procedure", [("unet", "pce"), ("unet_lc", "pce_sc"),
                                              ("unet_lc_multihead", "pce_gatedcrf_mstree")])
def test_fine_tuning_round_trains_the_received_global_model_on_its_own_schedule(
        tiny_federation, tmp_path, model, procedure):
    from clients.trainer import SiteTrainer

    cfg = tiny_run_config(tiny_federation, tmp_path, strategy="FT", model=model,
                          procedure=procedure, rounds=1, iters=2, ft_iters=4, ft_lr=0.02,
                          eval_every=1)
    trainer = SiteTrainer(cfg, cid=1)
    keys = trainer.keys(["all"])
    fedavg = {"server-round": 1, "share-include": "all", "share-exclude": "", FINE_TUNE: False}
    arrays, _ = trainer.train(trainer.state_of(keys), fedavg)
    assert set(arrays) == set(keys)
    final_global = {k: v + 0.01 if v.dtype.kind == "f" else v for k, v in arrays.items()}
    trainer._writer = Recorder()
    trainer.best_val = 2.0  # unbeatable: only fine-tuned models may become best.pt
    fine = {"server-round": 2, "share-include": "", "share-exclude": "", FINE_TUNE: True}
    sent, metrics = trainer.train(final_global, fine)

    assert sent == {}, "the fine-tuning sends nothing back"
    assert trainer.step == 2 + 4 and trainer.rounds_done == 2
    lrs = [(step, v) for tag, v, step in trainer._writer.scalars if tag == "lr"]
    assert [s for s, _ in lrs] == [3, 4, 5, 6]
    np.testing.assert_allclose([v for _, v in lrs], [0.02 * (1 - k / 4) ** 0.9 for k in range(4)],
                               rtol=1e-9)
    assert trainer.total_steps == 2 and trainer.cfg is cfg, "the run's schedule is restored"
    # validated after iters * eval_every = 2 fine-tuning steps and at the end
    assert [s for tag, _, s in trainer._writer.scalars if tag == "val/fine_tune_dice"] == [4]
    assert np.isfinite(metrics["total"]) and metrics["best_val_dice"] >= metrics["val_dice"]
    best = load(tmp_path / "tiny" / "client1" / "best.pt")
    assert best["round"] == 2 and best["val_dice"] == pytest.approx(metrics["best_val_dice"])
    assert any(not torch.equal(best["model"][k], torch.as_tensor(final_global[k]))
               for k in keys if final_global[k].dtype.kind == "f")


def test_fine_tuning_needs_the_whole_global_model_and_ends_the_run(tiny_federation, tmp_path):
    from clients.trainer import SiteTrainer

    cfg = tiny_run_config(tiny_federation, tmp_path, strategy="FT", model="unet", rounds=1,
                          ft_iters=2)
    trainer = SiteTrainer(cfg, cid=0)
    arrays = trainer.state_of(trainer.keys(["all"]))
    arrays.pop(next(iter(arrays)))
    fine = {"server-round": 2, "share-include": "", "share-exclude": "", FINE_TUNE: True}
    with pytest.raises(ValueError, match="whole global model"):
        trainer.train(arrays, fine)
    with pytest.raises(ValueError, match="fine-tunes in round 2"):
        trainer.train(arrays, dict(fine, **{"server-round": 3}))


# ---------------------------------------------------------------------- FT, the whole server
def test_ft_changes_only_local_copies_after_the_last_round(tiny_federation, tmp_path,
                                                           task_identity):
    import test_client
    from strategies.server_app import run_server

    cfg = tiny_run_config(tiny_federation, tmp_path, strategy="FT", model="unet", rounds=2,
                          iters=2, ft_iters=3, ft_lr=0.005, eval_every=1)
    grid = InProcessGrid(cfg)
    run_server(grid, cfg)
    exp = cfg.out_dir

    ops = [(op, r) for op, r, *_ in grid.traffic]
    assert ops == [("train", 1)] * 3 + [("train", 2)] * 3 + [("train", 3)] * 3 + [("evaluate", 3)] * 3
    latest = load(exp / "global" / "latest.pt")
    assert latest["round"] == 2, "the fine-tuning round writes no global model"
    fine = [t for t in grid.traffic if t[0] == "train" and t[1] == 3]
    for _, _, node, sent, reply in fine:
        assert set(sent) == set(latest["arrays"])
        for k, v in sent.items():  # every site fine-tunes the last aggregate itself
            np.testing.assert_array_equal(v.reshape(latest["arrays"][k].shape),
                                          latest["arrays"][k].numpy())
        assert reply["arrays"] == {}, "nothing comes back to aggregate"
    assert not (exp / "global" / "best.pt").exists(), "FT deploys personal models"
    for node, worker in grid.workers.items():
        trainer = worker.trainer
        assert trainer.step == 2 * 2 + 3 and trainer.rounds_done == 3
        best = load(exp / f"client{trainer.cid}" / "best.pt")
        assert best["round"] == 3
        changed = [k for k, v in latest["arrays"].items()
                   if v.is_floating_point() and not torch.equal(best["model"][k], v)]
        assert changed, f"client {trainer.cid}: best.pt equals the global model"

    with open(exp / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted((int(r["round"]), int(r["client"])) for r in rows) == \
        [(r, c) for r in (1, 2, 3) for c in range(3)]
    for r in rows:
        if r["round"] == "3":
            assert float(r["lr"]) == pytest.approx(0.005 * (1 / 3) ** 0.9)
            assert 0 <= float(r["val_dice"]) <= float(r["best_val_dice"]) <= 1

    from configs import save_config

    save_config(cfg, exp / "config.toml")  # as the runner does before a run
    assert test_client.main(["--client", "all", "--exp", cfg.exp, "--out_root", cfg.out_root,
                             "--no_images"]) == 0
    with open(exp / "test" / "result.csv") as f:
        results = list(csv.DictReader(f))
    assert {(r["model"], r["checkpoint"], r["round"]) for r in results} == \
        {("personal", f"client{k}/best.pt", "3") for k in range(3)}


# ---------------------------------------------------------------------- CT
def _central(tiny_federation, tmp_path, strategy, **overrides):
    from clients.centralised import CentralTrainer

    values = dict(strategy=strategy, model="unet", reset_optimizer=False, rounds=1, iters=3,
                  batch_size=4)
    if strategy == "CT-full":
        values.update(procedure="ce_full", label_form="mask")
    values.update(overrides)
    cfg = tiny_run_config(tiny_federation, tmp_path, **values)
    preflight.check_names(cfg)
    return CentralTrainer(cfg, device="cpu")


def test_pooled_set_holds_every_site_training_cases_and_nothing_else(tiny_federation, tmp_path):
    from dataloaders.dataset import SiteDataset

    trainer = _central(tiny_federation, tmp_path, "CT-weak")
    expected, held_out = [], []
    for site in range(3):  # num_clients = 3 of the federation's 5 sites
        common = dict(task="synthetic_faz", site=site, val_fraction=trainer.cfg.val_fraction,
                      seed=trainer.cfg.seed)
        expected += [(site, c) for c in SiteDataset(tiny_federation, split="train", **common).cases]
        held_out += [(site, c) for c in SiteDataset(tiny_federation, split="val", **common).cases]
    assert trainer.pooled.cases == expected and len(trainer.pooled) == len(set(expected))
    assert not set(held_out) & set(trainer.pooled.cases)
    assert [v.split for v in trainer.val_sets] == ["val"] * 3


@pytest.mark.parametrize("strategy", ["CT-weak", "CT-full"])
def test_the_trainer_consumes_full_masks_in_ct_full_and_weak_labels_in_ct_weak(
        tiny_federation, tmp_path, strategy):
    from dataloaders.dataset import SiteDataset
    from dataloaders.tasks import get_task

    task = get_task("synthetic_faz")
    trainer = _central(tiny_federation, tmp_path, strategy, batch_size=2)  # 6 cases a step
    for data in trainer.train_sets:
        data.augment = False  # compare what is consumed with what is stored
    consumed, seen = [], []
    next_batch, objective = trainer.next_batch, trainer.objective

    def spy_batch():
        batch = next_batch()
        consumed.append(batch)
        return batch

    def spy_objective(model, out, image, label, site, num_sites):
        seen.append(label.clone())
        return objective(model, out, image, label, site, num_sites)

    trainer.next_batch, trainer.objective = spy_batch, spy_objective
    metrics = trainer.train_round(1)
    assert np.isfinite(metrics["total"]) and len(consumed) == 3 == len(seen)
    stored = {}
    for site in range(3):
        common = dict(task=task, site=site, val_fraction=trainer.cfg.val_fraction,
                      seed=trainer.cfg.seed)
        masks = SiteDataset(tiny_federation, split="train", label_form="mask", **common)
        weak = SiteDataset(tiny_federation, split="train", **common)
        assert weak.label_form == task.site(site).weak_form != "mask"
        for i, case in enumerate(masks.cases):
            stored[site, case] = (masks.arrays(i).label, weak.arrays(i).label)
    sites = Counter()
    for batch, label in zip(consumed, seen):
        assert torch.equal(label, batch["label"])
        for site, case, got in zip(batch["site"], batch["case"], batch["label"].numpy()):
            mask, weak = stored[site, case]
            sites[site] += 1
            if strategy == "CT-full":
                np.testing.assert_array_equal(got, mask)
                assert (got < task.num_classes).all(), "a full mask labels every pixel"
            else:
                np.testing.assert_array_equal(got, weak)
                assert (got == task.unlabelled).any() and not np.array_equal(got, mask)
    assert len(sites) > 1, "the batches mix sites"


@pytest.mark.parametrize("strategy", ["CT-weak", "CT-full"])
def test_a_ct_step_trains_on_as_many_cases_as_a_federated_step_at_all_sites(
        tiny_federation, tmp_path, strategy):
    """num_clients (3) x batch_size (4) = 12 pooled cases reach the objective in every step,
    for the same rounds * iters steps; a step of batch_size cases would fail."""
    trainer = _central(tiny_federation, tmp_path, strategy)
    assert trainer.cfg.params.ct_batch == "federation" and trainer.step_cases == 12
    assert len(trainer.pooled) < 12 * 3, "the stream runs across epochs of the pool"
    consumed, seen = [], []
    next_batch, objective = trainer.next_batch, trainer.objective

    def spy_batch():
        consumed.append(next_batch())
        return consumed[-1]

    def spy_objective(model, out, image, label, site, num_sites):
        seen.append((image.shape[0], label.shape[0], out.logits.shape[0]))
        return objective(model, out, image, label, site, num_sites)

    trainer.next_batch, trainer.objective = spy_batch, spy_objective
    trainer.train_round(1)
    assert trainer.step == 3 == len(consumed) == len(seen)
    assert [len(b["case"]) for b in consumed] == [12] * 3
    assert seen == [(12, 12, 12)] * 3


def test_ct_batch_site_restores_the_reference_budget_and_stream(tiny_federation, tmp_path):
    """ct_batch = "site": batch_size cases a step, the very stream CT drew before."""
    from clients.centralised import CENTRAL_ID
    from dataloaders.dataset import InfiniteBatches

    trainer = _central(tiny_federation, tmp_path, "CT-weak", ct_batch="site")
    assert trainer.step_cases == 4
    earlier = InfiniteBatches(trainer.pooled, 4, seed=trainer.cfg.seed * 1000 + CENTRAL_ID)
    for _ in range(3):
        expected = [trainer.pooled.cases[i] for i in earlier.draw()[0]]
        batch = trainer.next_batch()
        assert list(zip(batch["site"], batch["case"])) == expected
        assert batch["image"].shape[0] == batch["label"].shape[0] == 4


def test_ct_batch_must_name_a_budget():
    from configs import RunConfig

    with pytest.raises(ValueError, match=r'ct_batch = .pooled. must be "federation" .* or "site"'):
        RunConfig.build(strategy="CT-weak", ct_batch="pooled").validate()


@pytest.mark.parametrize("model, procedure, strategy", [
    ("unet_lc", "pce_sc", "CT-weak"),
    ("unet_lc_multihead", "pce_gatedcrf_mstree", "CT-weak"),
    ("unet_lc_multihead", "ce_full", "CT-full"),
])
def test_site_coded_networks_see_each_case_under_its_own_site(tiny_federation, tmp_path, model,
                                                               procedure, strategy):
    trainer = _central(tiny_federation, tmp_path, strategy, model=model, procedure=procedure,
                       iters=2, batch_size=2)  # 6 pooled cases a step
    assert trainer.site_coded
    calls, batches = [], []
    forward, next_batch = trainer.model.forward, trainer.next_batch

    def spy_forward(x, site=None):
        calls.append((site, x.shape[0]))
        return forward(x, site=site)

    def spy_batch():
        batches.append(next_batch())
        return batches[-1]

    trainer.model.forward, trainer.next_batch = spy_forward, spy_batch
    metrics = trainer.train_round(1)
    assert all(np.isfinite(v) for v in metrics.values())
    expected = [(site, n) for b in batches for site, n in sorted(Counter(b["site"]).items())]
    assert calls == expected
    assert set(trainer.validate()) == {0, 1, 2}


@pytest.mark.parametrize("strategy", ["CT-weak", "CT-full"])
def test_tiny_centralised_run_writes_global_best_which_test_client_scores(
        tiny_federation, tmp_path, strategy):
    import test_client
    from configs import load_config
    from networks.checkpoint import run_meta

    out_root = tmp_path / "model"
    code = flower_runner.main([
        "--strategy", strategy, "--img_class", "synthetic_faz", "--root_path", str(tiny_federation),
        "--out_root", str(out_root), "--exp", "ct", "--num_clients", "3", "--rounds", "2",
        "--iters", "2", "--batch_size", "2", "--img_size", "32", "--eval_every", "1",
        "--set", "base_channels=4"])
    assert code == 0
    exp = out_root / "ct"
    cfg = load_config(exp / "config.toml")
    assert cfg.strategy == strategy and cfg.rounds == 2
    best = load(exp / "global" / "best.pt")
    assert set(best) == {"round", "arrays", "val_dice", "meta"}
    assert best["meta"] == run_meta(cfg, None) and best["round"] in (1, 2)
    assert load(exp / "global" / "latest.pt")["round"] == 2
    assert list((exp / "tb" / "server").glob("events.out.tfevents.*"))
    with open(exp / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted((int(r["round"]), int(r["client"])) for r in rows) == \
        [(r, c) for r in (1, 2) for c in (-1, 0, 1, 2)]
    means = {int(r["round"]): np.mean([float(x["val_dice"]) for x in rows
                                       if x["round"] == r["round"] and x["client"] != "-1"])
             for r in rows}
    assert best["val_dice"] == pytest.approx(max(means.values()))
    assert all(float(r["total"]) >= 0 for r in rows if r["client"] == "-1")

    assert test_client.main(["--client", "all", "--exp", "ct", "--out_root", str(out_root),
                             "--no_images"]) == 0
    with open(exp / "test" / "result.csv") as f:
        results = list(csv.DictReader(f))
    assert sorted({int(r["client"]) for r in results}) == [0, 1, 2]
    assert {(r["model"], r["checkpoint"]) for r in results} == {("global", "global/best.pt")}


# ---------------------------------------------------------------------- FT through Flower
@pytest.mark.slow
def test_ft_in_flowers_simulation_fine_tunes_after_the_last_round(tiny_federation, tmp_path):
    out_root = tmp_path / "model"
    run = subprocess.run(
        [sys.executable, "flower_runner.py", "--strategy", "FT", "--img_class", "synthetic_faz",
         "--root_path", str(tiny_federation), "--out_root", str(out_root), "--exp", "ft",
         "--num_clients", "3", "--rounds", "2", "--iters", "2", "--batch_size", "2",
         "--eval_every", "1", "--mode", "simulation", "--port", str(free_base(1)),
         "--set", "base_channels=4", "--set", "ft_iters=3"],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "fine-tuning (round 3) | clients 3/3" in run.stdout
    exp = out_root / "ft"
    assert load(exp / "global" / "latest.pt")["round"] == 2
    for k in range(3):
        assert load(exp / f"client{k}" / "best.pt")["round"] == 3
    with open(exp / "metrics.csv") as f:
        rounds = Counter(int(r["round"]) for r in csv.DictReader(f))
    assert rounds == {1: 3, 2: 3, 3: 3}
    test = subprocess.run([sys.executable, "test_client.py", "--client", "all", "--exp", "ft",
                           "--out_root", str(out_root), "--no_images"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert test.returncode == 0, test.stdout[-3000:] + test.stderr[-3000:]
    assert "its personalised model client0/best.pt (round 3" in test.stdout
