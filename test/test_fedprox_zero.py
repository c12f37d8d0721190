"""FedProx with mu = 0 is FedAvg: the same site, the same global arrays, the same round give
the same model to the last bit (the proximal term adds exactly zero loss and zero gradient)."""
from __future__ import annotations

import numpy as np
import torch

from clients.trainer import SiteTrainer
from conftest import tiny_run_config


def one_round(tiny_federation, tmp_path, strategy: str, mu: float):
    from networks.factory import build_for_run

    cfg = tiny_run_config(tiny_federation, tmp_path / strategy, strategy=strategy, model="unet",
                          rounds=2, prox_mu=mu)
    torch.manual_seed(0)
    glob = cfg.method.server(cfg).initial_arrays(build_for_run(cfg))
    glob = {k: v + 0.01 * np.random.default_rng(1).standard_normal(v.shape).astype(v.dtype)
            if v.dtype.kind == "f" else v for k, v in glob.items()}
    trainer = SiteTrainer(cfg, cid=1, device="cpu")
    config = {"server-round": 1, "share-include": "encoder,pcs,decoder,out_conv,aux",
              "share-exclude": ""}
    arrays, metrics = trainer.train(glob, config)
    trainer.close()
    return arrays, metrics


def test_fedprox_with_mu_zero_equals_fedavg(tiny_federation, tmp_path):
    avg, _ = one_round(tiny_federation, tmp_path, "FedAvg", 0.0)
    prox, metrics = one_round(tiny_federation, tmp_path, "FedProx", 0.0)
    assert metrics["extra"] == 0.0
    assert set(avg) == set(prox)
    for key in avg:
        np.testing.assert_array_equal(avg[key], prox[key], err_msg=key)
    moved, _ = one_round(tiny_federation, tmp_path, "FedProx", 10.0)
    assert any(not np.array_equal(avg[k], moved[k]) for k in avg if avg[k].dtype.kind == "f"), \
        "a large mu must change the update (the comparison above could not fail otherwise)"
