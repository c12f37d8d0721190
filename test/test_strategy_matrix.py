"""Every method with every objective and the three networks of the issue: each combination
is accepted by the pre-flight checks or refused with a message that names the key at fault.
(That the accepted ones train is tested per method: test_trainer, test_ft_ct, test_fedap,
test_metafed, test_fedlc, test_build_for_run.)"""
from __future__ import annotations

import itertools

import pytest

import preflight
from configs import RunConfig
from losses.objective import PROCEDURES
from configs.layers import method_layer
from methods.registry import method_names

NETWORKS = ("unet", "unet_lc", "unet_lc_multihead")
KEYS = ("--model", "--procedure", "--label_form", "--num_clients", "--rounds", "--ala_layer_idx",
        "--fedap_pretrain_rounds")


def check(strategy: str, model: str, procedure: str, **extra):
    values = dict(method_layer(strategy)[1], **extra)
    values.update(strategy=strategy, model=model, procedure=procedure, img_class="synthetic_faz",
                  num_clients=3, rounds=4, iters=10)
    if strategy == "CT-full":
        values["label_form"] = "mask"
    try:
        preflight.check_names(RunConfig.from_mapping(values).validate())
    except preflight.PreflightError as err:
        return str(err)
    return None


@pytest.mark.parametrize("strategy", method_names())
def test_each_combination_runs_or_is_refused_naming_the_key(strategy):
    accepted = 0
    for model, procedure in itertools.product(NETWORKS, PROCEDURES):
        refusal = check(strategy, model, procedure)
        if refusal is None:
            accepted += 1
            continue
        assert refusal.startswith(KEYS), (strategy, model, procedure, refusal)
        assert len(refusal) > 40, f"{refusal!r} gives no reason"
    if strategy == "FedLC":
        assert accepted == 0, "FedLC needs its calibrated network"
        assert check("FedLC", "unet_lc_calib", "pce_sc") is None
        assert check("FedLC", "unet_lc_multihead_calib", "pce_gatedcrf_mstree") is None
    elif strategy == "FedLPPA":
        assert accepted == 0, "FedLPPA needs its prompted network"
        assert check("FedLPPA", "unet_lppa", "pce") is None
        assert check("FedLPPA", "unet_lppa", "pce_gatedcrf") is None
        assert check("FedLPPA", "unet_lppa", "pce_sc").startswith("--procedure")
    else:
        assert accepted >= 3, f"{strategy} accepts only {accepted} combinations"
        # FedALA blends the top tensors (ala_layer_idx = 2): on a network with auxiliary heads
        # those are an auxiliary head, refused; its decoder-side blend runs there
        extra = {"ala_layer_idx": 0} if strategy == "FedALA" else {}
        assert check(strategy, "unet_lc_multihead", "pce_gatedcrf_mstree" if strategy != "CT-full"
                     else "ce_full", **extra) is None


def test_refusals_say_why():
    assert "auxiliary heads" in check("FedAvg", "unet", "pce_gatedcrf_mstree")
    assert "site gates" in check("FedAvg", "unet", "pce_sc")
    assert check("FedAvg", "unet_lc_calib", "pce").startswith("--model")
