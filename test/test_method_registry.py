"""The one registry of methods: entries, keys, the flat configuration and the site half on a
machine without Flower."""
from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from configs import RunConfig
from configs.schema import LOCAL_ONLY_KEYS, SITE_PATH_KEYS
from methods.registry import (Method, MethodParams, NoParams, all_methods, get_method,
                              method_names, register_method)

REPO = Path(__file__).resolve().parents[1]
PAPER_METHODS = {"FedICRA", "FedICRA-ref", "FedAvg", "FT", "FedProx", "FedBN", "FedAP", "FedRep",
                 "MetaFed", "FedALA", "FedLC", "Local", "CT-weak", "CT-full"}


def test_every_compared_method_is_registered_once_and_found_in_any_case():
    assert PAPER_METHODS <= set(method_names())
    for name in PAPER_METHODS:
        assert get_method(name.lower()) is get_method(name.upper()) is get_method(name)
    with pytest.raises(ValueError, match="unknown strategy 'FedNope'.*FedAvg"):
        get_method("FedNope")


def test_a_second_method_under_a_taken_name_is_refused():
    with pytest.raises(ValueError, match="registered twice"):
        register_method(Method(name="fedavg", server=get_method("FedProx").server,
                               site=get_method("FedProx").site))


def test_an_entry_must_be_complete():
    with pytest.raises(ValueError, match="deploys"):
        Method(name="x", server=object, site=object, deploys="both")
    with pytest.raises(ValueError, match="server and a site half"):
        Method(name="x", server=None, site=object)
    with pytest.raises(ValueError, match="train"):
        Method(name="x", server=None, site=None, federated=False)

    class NotAParams:
        pass

    with pytest.raises(ValueError, match="MethodParams"):
        Method(name="x", server=object, site=object, params=NotAParams)


def test_the_run_configuration_holds_no_method_key():
    shared = set(RunConfig.shared_keys())
    for entry in all_methods():
        assert not shared & set(entry.param_keys()), entry.name
    assert set(LOCAL_ONLY_KEYS + SITE_PATH_KEYS) <= shared


def test_a_key_shared_by_methods_has_one_type_everywhere():
    kinds = {}
    for entry in all_methods():
        defaults = entry.params()
        for f in dataclasses.fields(entry.params):
            kinds.setdefault(f.name, set()).add(type(getattr(defaults, f.name)))
    assert all(len(k) == 1 for k in kinds.values()), kinds


def test_the_flat_configuration_round_trips_with_method_keys():
    cfg = RunConfig.build(strategy="fedprox", prox_mu=0.25, rounds=3)
    assert cfg.strategy == "FedProx" and cfg.params.prox_mu == 0.25 and cfg.get("prox_mu") == 0.25
    flat = cfg.to_dict()
    assert flat["prox_mu"] == 0.25 and "params" not in flat and "ala_eta" not in flat
    again = RunConfig.from_mapping(flat)
    assert again == cfg and again.method is get_method("FedProx")


def test_keys_of_other_methods_are_checked_then_ignored():
    cfg = RunConfig.from_mapping({"strategy": "FedAvg", "ala_max_epochs": 3})
    assert cfg.ignored_keys == {"ala_max_epochs": 3}
    assert "ala_max_epochs" not in cfg.to_dict()
    assert cfg.override({"rounds": 4}).ignored_keys == {"ala_max_epochs": 3}
    with pytest.raises(ValueError, match="ala_max_epochs"):
        RunConfig.from_mapping({"strategy": "FedAvg", "ala_max_epochs": "many"})
    with pytest.raises(ValueError, match="unknown configuration key.*no_such_key"):
        RunConfig.from_mapping({"strategy": "FedAvg", "no_such_key": 1})


def test_a_method_checks_its_own_keys():
    with pytest.raises(ValueError, match="rep_iters = 7 must lie in"):
        RunConfig.build(strategy="FedRep", iters=5, rep_iters=7).validate()
    with pytest.raises(ValueError, match="ala_groups"):
        RunConfig.build(strategy="FedICRA", ala_groups="decoder,nope").validate()
    with pytest.raises(ValueError, match="ala_rand_percent = nan"):
        RunConfig.build(strategy="FedALA", ala_rand_percent=float("nan")).validate()


def test_params_of_another_method_are_refused():
    with pytest.raises(ValueError, match="expects FedProxParams"):
        RunConfig(strategy="FedProx", params=NoParams())


def test_every_site_half_imports_and_builds_without_flower():
    """A site-only machine (the GPU benchmarks) has torch but not Flower: every method module
    still imports, and a server half says what is missing."""
    code = ("import sys; sys.modules['flwr'] = None\n"
            "from methods.registry import all_methods\n"
            "from configs import RunConfig\n"
            "names = [m.name for m in all_methods()]\n"
            "cfg = RunConfig.build(strategy='FedICRA', iters=4)\n"
            "rule = cfg.method.site(cfg)\n"
            "try:\n"
            "    cfg.method.server(cfg)\n"
            "except ModuleNotFoundError as err:\n"
            "    print('server:', err)\n"
            "print(len(names), type(rule).__name__)\n")
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "server: FedICRA: the server half of a method needs Flower" in res.stdout
    assert f"{len(all_methods())} FedICRASite" in res.stdout


def test_blending_the_top_tensors_of_a_network_with_auxiliary_heads_is_refused():
    """FedALA's ``ala_layer_idx = 2`` on ``unet_lc_multihead`` would blend an auxiliary head's
    tensors, which the blending loss never reaches (backward fails): refused before a run."""
    fedala = RunConfig.build(strategy="FedALA", model="unet_lc_multihead")
    assert fedala.method.refusal(fedala)[0] == "ala_layer_idx"
    plain = RunConfig.build(strategy="FedALA", model="unet")  # FedALA's own network
    assert plain.method.refusal(plain) is None
    fedicra = RunConfig.build(strategy="FedICRA")  # the decoder side: ala_layer_idx = 0
    assert fedicra.method.refusal(fedicra) is None
    bad = RunConfig.build(strategy="FedICRA", ala_layer_idx=2)
    assert "auxiliary head" in bad.method.refusal(bad)[1]
