"""Training objectives selected by a procedure name.

FedICRA (Lin et al., MLMI 2023):
``L = pCE + lambda_tree * L_tree + lambda_crf * L_gcrf + alpha * L_sc``.

Procedures (term sets):

==========================  ===============================================================
``pce``                     pCE only (the site term is *not* added, even for gated networks)
``pce_sc``                  pCE + alpha * L_sc (FedLC-style representation without the
                            weak-label regularisers)
``pce_gatedcrf``            pCE + lambda_crf * L_gcrf
``pce_mstree``              pCE + lambda_tree * L_tree
``pce_gatedcrf_mstree``     full FedICRA objective: pCE + tree + gated CRF + site term
``ce_full``                 cross-entropy on full masks (CT-full upper bound)
==========================  ===============================================================

Reference-code aliases: ``flower_pCE_2D_GateCRFMsacleTreeEnergyLoss_Ours`` ->
``pce_gatedcrf_mstree``, ``flower_pCE_2D`` -> ``pce``.

A term is computed only when its weight is non-zero; the site term only when the network
returns gates (``out.gates is not None``); the tree term needs auxiliary heads.
The unlabelled label value is the number of classes (``out.logits.shape[1]``).

Reference-fidelity switches (:class:`ObjectiveConfig`): ``tree_gray_as_rgb`` builds the image
tree of 1-channel images as if repeated to 3 channels (the reference's FAZ input);
``sc_grad=False`` (the default) computes the site term under ``torch.no_grad`` as the
reference does (value logged and added to ``total`` as a constant, no gradient).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, FrozenSet, Tuple, Union

import torch
from torch import Tensor, nn

from networks.outputs import SegOutput

from .gated_crf import gated_crf_loss
from .pce import partial_cross_entropy
from .site_contrastive import site_contrastive_loss

PROCEDURES: Dict[str, FrozenSet[str]] = {
    "pce": frozenset({"pce"}),
    "pce_sc": frozenset({"pce", "sc"}),
    "pce_gatedcrf": frozenset({"pce", "crf"}),
    "pce_mstree": frozenset({"pce", "tree"}),
    "pce_gatedcrf_mstree": frozenset({"pce", "tree", "crf", "sc"}),
    "ce_full": frozenset({"ce"}),
}
ALIASES: Dict[str, str] = {
    "flower_pCE_2D_GateCRFMsacleTreeEnergyLoss_Ours": "pce_gatedcrf_mstree",
    "flower_pCE_2D": "pce",
}
TERM_ORDER: Tuple[str, ...] = ("pce", "ce", "tree", "crf", "sc")


def procedure_names() -> Tuple[str, ...]:
    """Canonical procedure names followed by the accepted aliases."""
    return tuple(PROCEDURES) + tuple(ALIASES)


def resolve_procedure(name: str) -> str:
    """Canonical name of procedure ``name`` (an alias or a canonical name)."""
    name = ALIASES.get(name, name)
    if name not in PROCEDURES:
        raise ValueError(
            f"unknown objective procedure {name!r}; expected one of {', '.join(procedure_names())}"
        )
    return name


@dataclass(frozen=True)
class ObjectiveConfig:
    """Procedure name and term weights/hyper-parameters.

    Every field is the run configuration's key of the same name, with the same default
    (``configs.schema.RunConfig``, the reference's values; this package imports no
    configuration, so test/test_objective_config.py keeps the two equal).
    ``procedure`` is stored in canonical form (aliases are resolved).
    """

    procedure: str
    lambda_tree: float = 0.1
    lambda_crf: float = 0.1
    alpha: float = 1.0
    tree_sigma_low: float = 0.02
    tree_sigma_high: float = 1.0
    crf_sigma_xy: float = 6.0
    crf_sigma_rgb: float = 0.1
    crf_radius: int = 5
    crf_downsample: int = 1
    #: Image tree of 1-channel images as if repeated to 3 channels (the reference's FAZ input).
    tree_gray_as_rgb: bool = True
    #: Site term trains the gates (True) or is only computed and logged, as the reference
    #: does under ``torch.no_grad`` (False; its weighted value still enters ``total``).
    sc_grad: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "procedure", resolve_procedure(self.procedure))

    @property
    def terms(self) -> FrozenSet[str]:
        return PROCEDURES[self.procedure]


@dataclass
class ObjectiveResult:
    """Total loss (with graph) and the unweighted terms as floats for logging.

    ``weights[name] * terms[name]`` summed over ``terms`` equals ``total``.
    """

    total: Tensor
    terms: Dict[str, float] = field(default_factory=dict)
    weights: Dict[str, float] = field(default_factory=dict)


class WeakObjective:
    """Callable objective: ``objective(model, out, image, label, site, num_sites)``.

    Parameters
    ----------
    config:
        An :class:`ObjectiveConfig` or a procedure name (default weights).
    """

    def __init__(self, config: Union[ObjectiveConfig, str]) -> None:
        self.config = ObjectiveConfig(config) if isinstance(config, str) else config

    def weights(self) -> Dict[str, float]:
        c = self.config
        all_weights = {"pce": 1.0, "ce": 1.0, "tree": c.lambda_tree, "crf": c.lambda_crf, "sc": c.alpha}
        return {k: float(all_weights[k]) for k in TERM_ORDER if k in c.terms}

    def __call__(
        self,
        model: nn.Module,
        out: SegOutput,
        image: Tensor,
        label: Tensor,
        site: int,
        num_sites: int,
    ) -> ObjectiveResult:
        """Compute the objective.

        Parameters
        ----------
        model:
            The network that produced ``out`` (needed for the site term).
        out:
            Forward output; ``out.logits`` is (B, K, H, W).
        image:
            Input batch (B, C, H, W), guidance of the gated CRF and tree energy.
        label:
            (B, H, W) integer labels, unlabelled pixels = K (sparse label, or full mask for
            ``ce_full``).
        site, num_sites:
            Own site index and number of sites, for the site term.
        """
        c = self.config
        logits = out.logits
        unlabelled = logits.shape[1]
        values: Dict[str, Tensor] = {}
        weights = {k: w for k, w in self.weights().items() if w != 0.0}
        if "pce" in weights:
            values["pce"] = partial_cross_entropy(logits, label, ignore_index=unlabelled)
        if "ce" in weights:
            values["ce"] = partial_cross_entropy(logits, label, ignore_index=unlabelled)
        probs = torch.softmax(logits, dim=1) if ("tree" in weights or "crf" in weights) else None
        if "tree" in weights:
            if not out.aux_logits:
                raise ValueError(
                    f"procedure {c.procedure!r} with lambda_tree != 0 needs a network with "
                    f"auxiliary heads (*_multihead)"
                )
            from .tree_energy import multiscale_tree_energy_loss

            values["tree"] = multiscale_tree_energy_loss(
                probs,
                image,
                list(out.aux_logits),
                label,
                unlabelled,
                sigma_low=c.tree_sigma_low,
                sigma_high=c.tree_sigma_high,
                gray_as_rgb=c.tree_gray_as_rgb,
            )
        if "crf" in weights:
            values["crf"] = gated_crf_loss(
                probs,
                image,
                sigma_xy=c.crf_sigma_xy,
                sigma_rgb=c.crf_sigma_rgb,
                radius=c.crf_radius,
                downsample=c.crf_downsample,
            )
        if "sc" in weights and out.gates is not None:
            values["sc"] = site_contrastive_loss(model, out, site, num_sites, grad=c.sc_grad)
        weights = {k: weights[k] for k in values}
        total = sum(weights[k] * v for k, v in values.items())
        floats = torch.stack([v.detach().float() for v in values.values()]).tolist()
        return ObjectiveResult(total=total, terms=dict(zip(values, floats)), weights=weights)
