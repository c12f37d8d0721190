"""A new method is one module: the toy method of docs/federated.md, "Adding a method" (FedAvg
with a coordinate-wise trimmed mean on the server), copied from there into a single file
outside the repository, named in ``$FEDICRA_METHODS``,
trains end to end on the synthetic federation as real Flower processes and is tested by
``test_client.py``, with no other file touched."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import free_base

REPO = Path(__file__).resolve().parents[1]
CLIENTS = 3

def module_from_docs() -> str:
    """The method module that docs/federated.md, "Adding a method", shows."""
    text = (REPO / "docs" / "federated.md").read_text()
    section = text.split("## Adding a method", 1)[1].split("\n## ", 1)[0]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


@pytest.fixture()
def toy_method(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "plugins"
    folder.mkdir()
    (folder / "toy_fedtrim.py").write_text(module_from_docs())
    monkeypatch.setenv("FEDICRA_METHODS", "toy_fedtrim")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(folder), str(REPO)]))
    monkeypatch.syspath_prepend(str(folder))
    return folder


def test_the_registry_finds_a_module_named_in_the_environment(toy_method):
    from configs import RunConfig
    from methods.registry import get_method, method_names

    assert "FedTrim" in method_names()
    entry = get_method("fedtrim")
    assert entry.deploys == "global" and entry.param_keys() == ("trimmed_k",)
    cfg = RunConfig.build(strategy="FedTrim", trimmed_k=2, num_clients=5)
    assert cfg.params.trimmed_k == 2 and cfg.method is entry
    with pytest.raises(ValueError, match="trimmed_k = 2 must leave a site"):
        RunConfig.build(strategy="FedTrim", trimmed_k=2, num_clients=4).validate()
    from benchmarks.compared_methods import select_methods

    assert [(m.label, m.strategy) for m in select_methods("fedtrim")] == [("FedTrim", "FedTrim")]


def test_a_missing_module_is_named(monkeypatch):
    from methods.registry import get_method

    monkeypatch.setenv("FEDICRA_METHODS", "no_such_method_module_xyz")
    with pytest.raises(ValueError, match="no_such_method_module_xyz"):
        get_method("FedAvg")


@pytest.mark.slow
def test_a_one_module_method_runs_end_to_end(tmp_path, toy_method, tiny_federation):
    import torch

    out_root = tmp_path / "model"
    cmd = [sys.executable, "flower_runner.py", "--strategy", "FedTrim", "--mode", "deployment",
           "--img_class", "synthetic_faz", "--root_path", str(tiny_federation),
           "--num_clients", str(CLIENTS), "--rounds", "2", "--iters", "2", "--batch_size", "2",
           "--set", "base_channels=4", "--set", "trimmed_k=1",
           "--port", str(free_base(2 * CLIENTS + 2)), "--out_root", str(out_root),
           "--exp", "toy", "--stop-timeout", "5"]
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    out = out_root / "toy"
    assert "trimmed_k = 1" in (out / "config.toml").read_text()
    # the toy's server half made the aggregate: with k = 1 of three sites, the coordinate-wise
    # median of the three trained site models (not their mean)
    final = torch.load(out / "global" / "latest.pt", weights_only=False)["arrays"]
    sites = [torch.load(out / f"client{k}" / "latest.pt", weights_only=False)["model"]
             for k in range(CLIENTS)]
    floats = [k for k, v in final.items() if np.issubdtype(np.asarray(v).dtype, np.floating)]
    assert floats
    for key in floats:
        stacked = np.stack([site[key].numpy() for site in sites])
        np.testing.assert_array_equal(np.asarray(final[key]), np.median(stacked, axis=0))
    assert not all(np.array_equal(np.asarray(final[k]), np.mean(
        np.stack([s[k].numpy() for s in sites]), axis=0)) for k in floats)
    test = subprocess.run([sys.executable, "test_client.py", "--client", "all", "--exp", "toy",
                           "--out_root", str(out_root), "--no_images"], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert test.returncode == 0, test.stdout[-4000:] + test.stderr[-4000:]
    assert (out / "test" / "mean_std_result.csv").is_file()
