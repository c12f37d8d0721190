"""Every registered network builds from a run config and trains one federated round."""
from __future__ import annotations

import inspect

import numpy as np
import pytest

from clients.trainer import SiteTrainer
from conftest import tiny_run_config
from networks.factory import RUN_OPTION_NAMES, accepted_run_options, build_for_run, run_model_options
from networks.registry import network_names


def _procedure(name: str) -> str:
    """The full FedICRA objective needs auxiliary heads; the others train with pCE alone."""
    return "pce_gatedcrf_mstree" if name.endswith("multihead") else "pce"


@pytest.mark.parametrize("name", network_names())
def test_every_network_builds_for_a_run_and_trains_a_round(tiny_federation, tmp_path, name):
    cfg = tiny_run_config(tiny_federation, tmp_path, model=name, procedure=_procedure(name),
                          strategy="FedAvg", img_size=32, iters=1, rounds=1, crf_radius=2,
                          crf_sigma_xy=2.0)
    options = run_model_options(cfg, site=1)
    assert set(options) == set(accepted_run_options(name)) <= RUN_OPTION_NAMES
    server_model = build_for_run(cfg)
    strategy = cfg.method.server(cfg)
    glob = strategy.initial_arrays(server_model)
    assert glob, "FedAvg shares the whole model"
    trainer = SiteTrainer(cfg, cid=1)
    config = {"server-round": 1, "share-include": ",".join(strategy.share_include),
              "share-exclude": ",".join(strategy.share_exclude)}
    arrays, metrics = trainer.train(glob, config)
    assert set(arrays) == set(glob)
    assert all(arrays[k].shape == glob[k].shape for k in glob)
    assert np.isfinite(metrics["total"]) and 0.0 <= metrics["val_dice"] <= 1.0


def test_network_factories_with_bare_options_must_be_declared(monkeypatch):
    import networks.factory as factory

    monkeypatch.setattr(factory, "RUN_OPTIONS", {})
    with pytest.raises(ValueError, match=r"'unet'.*RUN_OPTIONS of networks/factory.py"):
        accepted_run_options("unet")


def test_declared_options_are_accepted_by_the_constructors():
    """Every declared option is a named constructor argument of the network's class."""
    from networks.efficient_unet import EfficientUNet
    from networks.lppa import LPPAUNet
    from networks.unet import UNet

    for name in network_names():
        cls = {"efficient_unet": EfficientUNet, "unet_lppa": LPPAUNet}.get(name, UNet)
        assert accepted_run_options(name) <= set(inspect.signature(cls).parameters), name
