"""Loss terms and the training objective.

``multiscale_tree_energy_loss`` (from ``losses.tree_energy``) is imported on first access;
the tree filter lives in the submodule ``losses.tree_filter`` (its function shares the
module's name, so it is not re-exported here).
"""
from .gated_crf import gated_crf_loss
from .objective import (
    ObjectiveConfig,
    ObjectiveResult,
    WeakObjective,
    procedure_names,
    resolve_procedure,
)
from .pce import partial_cross_entropy
from .site_contrastive import site_contrastive_loss

_LAZY = {
    "multiscale_tree_energy_loss": "tree_energy",
}

__all__ = [
    "ObjectiveConfig",
    "ObjectiveResult",
    "WeakObjective",
    "gated_crf_loss",
    "partial_cross_entropy",
    "procedure_names",
    "resolve_procedure",
    "site_contrastive_loss",
]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        module = importlib.import_module(f".{_LAZY[name]}", __name__)
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
