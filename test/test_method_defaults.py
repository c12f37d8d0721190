"""Each method runs as its paper defines it from its name alone; config file and flags win.

Also: the optimiser starts every round fresh by default (the reference builds a new AdamW
each round), and global-model methods validate the received global model.
"""
from __future__ import annotations

import numpy as np
import pytest

import flower_runner
from conftest import tiny_run_config
from networks.factory import build_for_run
from networks.groups import parameter_groups


def resolve(*argv: str):
    return flower_runner.resolve_layers(flower_runner.parse_args(list(argv)))


def test_fedavg_alone_is_the_plain_unet_with_pce_in_its_own_folder():
    cfg, sources = resolve("--strategy", "FedAvg", "--img_class", "faz")
    assert (cfg.model, cfg.procedure, cfg.exp) == ("unet", "pce", "faz/FedAvg")
    assert str(cfg.out_dir).endswith("faz/FedAvg")
    assert sources["model"] == "strategy FedAvg"
    model = build_for_run(cfg, site=0)
    assert not parameter_groups(model)["pcs"], "FedAvg must not build site gates"


def test_fedicra_alone_is_the_reference_setup():
    cfg, _ = resolve("--img_class", "faz")
    assert (cfg.strategy, cfg.model, cfg.procedure, cfg.exp) == \
        ("FedICRA", "unet_lc_multihead", "pce_gatedcrf_mstree", "faz/FedICRA")
    assert cfg.alpha == 1.0 and cfg.params.rep_iters == 3
    assert parameter_groups(build_for_run(cfg, site=0))["pcs"]


def test_fedala_takes_its_layer_idx_and_a_lowercase_name_is_canonical():
    cfg, _ = resolve("--strategy", "fedala", "--img_class", "faz")
    assert cfg.strategy == "FedALA" and cfg.params.ala_layer_idx == 2 and cfg.exp == "faz/FedALA"


def test_config_file_overrides_the_strategy_and_flags_override_the_file(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('img_class = "faz"\nmodel = "unet_lc"\nexp = "cmp/{strategy}"\n')
    cfg, sources = resolve("--config", str(path), "--strategy", "FedAvg")
    assert cfg.model == "unet_lc" and sources["model"] == str(path)
    assert cfg.procedure == "pce" and cfg.exp == "cmp/FedAvg"
    cfg, sources = resolve("--config", str(path), "--strategy", "FedAvg", "--model", "unet")
    assert cfg.model == "unet" and sources["model"] == "command line"


def test_task_files_hold_no_method_settings():
    from configs import config_dir, read_config_values

    method_keys = {"model", "procedure", "strategy", "alpha", "rep_iters", "prox_mu",
                   "ala_layer_idx"}
    for path in sorted(config_dir().glob("*.toml")):
        values = read_config_values(path)
        assert not method_keys & set(values), f"{path.name} sets method keys"
        assert "{strategy}" in values.get("exp", "{strategy}"), f"{path.name}: exp ignores the strategy"


def test_start_up_line_names_network_objective_strategy_and_file(capsys, tmp_path):
    cfg, sources = resolve("--strategy", "FedProx", "--img_class", "faz")
    line = flower_runner.describe(cfg, sources)
    for part in ("strategy FedProx", "network unet", "objective pce", "faz.toml", "256 px"):
        assert part in line, line


# ---------------------------------------------------------------------- trainer behaviour
def _round_config(server_round: int, **extra):
    return {"server-round": server_round, "share-include": "all", "share-exclude": "", **extra}


@pytest.mark.parametrize("reset", [True, False])
def test_optimizer_state_is_fresh_at_each_round_by_default(tiny_federation, tmp_path, reset):
    from clients.trainer import SiteTrainer

    cfg = tiny_run_config(tiny_federation, tmp_path, strategy="FedAvg", model="unet",
                          reset_optimizer=reset)
    trainer = SiteTrainer(cfg, cid=0)
    seen = []
    original = trainer.rule.local_train

    def spy(tr, server_round):
        seen.append(len(tr.optimizer.state))
        return original(tr, server_round)

    trainer.rule.local_train = spy
    arrays = trainer.state_of(trainer.keys(["all"]))
    for r in (1, 2):
        arrays, _ = trainer.train(arrays, _round_config(r))
    assert seen[0] == 0
    assert (seen[1] == 0) == reset


def test_global_model_is_validated_before_local_training(tiny_federation, tmp_path):
    from clients.evaluation import validate
    from clients.trainer import SiteTrainer

    cfg = tiny_run_config(tiny_federation, tmp_path, strategy="FedAvg", model="unet", eval_every=1)
    trainer = SiteTrainer(cfg, cid=1)
    other = build_for_run(cfg.override({"seed": 99}), site=1)
    sent = {k: v.detach().numpy().copy() for k, v in other.state_dict().items()}
    expected, _ = validate(other, trainer.val_set, 1, trainer.device, img_size=cfg.img_size)
    _, metrics = trainer.train(sent, _round_config(1, **{"validate-global": True}))
    assert "val_dice_global" not in metrics  # round 1 receives the common initial model
    _, metrics = trainer.train(sent, _round_config(2, **{"validate-global": True}))
    assert metrics["val_dice_global"] == pytest.approx(expected)
    final = trainer.evaluate(sent, _round_config(3, **{"validate-global": True}))
    assert final["val_dice_global"] == pytest.approx(expected)
    assert "val_dice_global" not in trainer.evaluate(sent, _round_config(3))


def test_site_threads_share_the_cores_unless_pinned(monkeypatch):
    import os

    from configs import RunConfig

    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    assert RunConfig(num_clients=5).site_threads() == 3
    assert RunConfig(num_clients=5).site_threads(sites_here=1) == 16
    assert RunConfig(num_clients=40).site_threads() == 1
    assert RunConfig(num_clients=5, cpus_per_client=2).site_threads() == 2
    with pytest.raises(ValueError, match="cpus_per_client"):
        RunConfig(cpus_per_client=-1).validate()
