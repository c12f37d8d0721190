"""Objective: procedure names, weighting of the terms, term selection."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import networks
from losses import (
    ObjectiveConfig,
    WeakObjective,
    gated_crf_loss,
    partial_cross_entropy,
    procedure_names,
    site_contrastive_loss,
)

NUM_CLASSES = 2  # label value 2 = unlabelled


def _setup(name="unet_lc_multihead", num_sites=3, site=1, size=32):
    torch.manual_seed(0)
    opts = dict(base_channels=4, dropout=None)
    if "multihead" in name:
        opts["aux_channels"] = 8
    if "_lc" in name:
        opts.update(num_sites=num_sites, site=site, pcs_reduction=4)
    model = networks.build(name, 1, NUM_CLASSES, **opts)
    g = torch.Generator().manual_seed(1)
    image = torch.rand(2, 1, size, size, generator=g)
    label = torch.randint(0, NUM_CLASSES + 1, (2, size, size), generator=g)
    return model, model(image), image, label


def _weighted_sum(result):
    return sum(result.weights[k] * v for k, v in result.terms.items())


def test_terms_sum_to_total_with_weights():
    model, out, image, label = _setup(site=2)
    cfg = ObjectiveConfig(
        "pce_gatedcrf_mstree", lambda_tree=0.0, lambda_crf=0.3, alpha=0.7, crf_radius=2,
        sc_grad=True,
    )
    result = WeakObjective(cfg)(model, out, image, label, site=2, num_sites=3)
    assert set(result.terms) == {"pce", "crf", "sc"}
    assert result.weights == {"pce": 1.0, "crf": 0.3, "sc": 0.7}
    assert result.total.item() == pytest.approx(_weighted_sum(result), rel=1e-5)
    probs = out.logits.softmax(1)
    assert result.terms["pce"] == pytest.approx(
        partial_cross_entropy(out.logits, label, NUM_CLASSES).item(), rel=1e-6
    )
    assert result.terms["crf"] == pytest.approx(gated_crf_loss(probs, image, radius=2).item(), rel=1e-5)
    assert result.terms["sc"] == pytest.approx(
        site_contrastive_loss(model, out, 2, 3).item(), rel=1e-5
    )
    result.total.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if n.startswith("pcs."))


def test_full_objective_with_tree_term():
    pytest.importorskip("losses.tree_energy")
    model, out, image, label = _setup()
    cfg = ObjectiveConfig("pce_gatedcrf_mstree", sc_grad=True)
    result = WeakObjective(cfg)(model, out, image, label, site=1, num_sites=3)
    assert set(result.terms) == {"pce", "tree", "crf", "sc"}
    assert result.weights == {"pce": 1.0, "tree": 0.1, "crf": 0.1, "sc": 1.0}
    assert result.total.item() == pytest.approx(_weighted_sum(result), rel=1e-5)
    result.total.backward()
    for head in model.aux_heads:
        assert head[0].weight.grad is not None


def test_procedure_alias_and_names():
    cfg = ObjectiveConfig("flower_pCE_2D_GateCRFMsacleTreeEnergyLoss_Ours")
    assert cfg.procedure == "pce_gatedcrf_mstree"
    assert ObjectiveConfig("flower_pCE_2D").procedure == "pce"
    assert {"pce", "pce_gatedcrf_mstree", "ce_full"} <= set(procedure_names())


def test_unknown_procedure_lists_valid_names():
    with pytest.raises(ValueError, match="pce_gatedcrf_mstree"):
        ObjectiveConfig("pce_magic")
    with pytest.raises(ValueError, match="unknown objective procedure"):
        WeakObjective("nope")


def test_pce_procedure_is_pce_only_even_with_gates():
    model, out, image, label = _setup()
    result = WeakObjective("pce")(model, out, image, label, site=1, num_sites=3)
    assert set(result.terms) == {"pce"}
    assert torch.allclose(result.total, partial_cross_entropy(out.logits, label, NUM_CLASSES))


def test_pce_sc_procedure():
    model, out, image, label = _setup()
    result = WeakObjective(ObjectiveConfig("pce_sc", alpha=0.5))(model, out, image, label, 1, 3)
    assert set(result.terms) == {"pce", "sc"}
    assert result.total.item() == pytest.approx(_weighted_sum(result), rel=1e-5)


def test_site_term_skipped_without_gates():
    model, out, image, label = _setup("unet_multihead")
    cfg = ObjectiveConfig("pce_gatedcrf_mstree", lambda_tree=0.0, crf_radius=1)
    result = WeakObjective(cfg)(model, out, image, label, site=0, num_sites=3)
    assert set(result.terms) == {"pce", "crf"}


def test_tree_term_needs_aux_heads():
    model, out, image, label = _setup("unet_lc")
    with pytest.raises(ValueError, match="auxiliary heads"):
        WeakObjective("pce_gatedcrf_mstree")(model, out, image, label, site=1, num_sites=3)


def test_ce_full_is_cross_entropy_on_full_mask():
    model, out, image, _ = _setup("unet")
    mask = torch.randint(0, NUM_CLASSES, (2, 32, 32))
    result = WeakObjective("ce_full")(model, out, image, mask, site=0, num_sites=1)
    assert set(result.terms) == {"ce"}
    assert torch.allclose(result.total, F.cross_entropy(out.logits, mask))
