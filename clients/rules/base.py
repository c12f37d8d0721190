"""The local rule interface: what a site does with one round."""
from __future__ import annotations

from typing import TYPE_CHECKING, Dict, List, Mapping, Optional

import numpy as np
import torch

if TYPE_CHECKING:  # pragma: no cover
    from ..trainer import SiteTrainer

#: Parameter groups on the decoder side, blended by adaptive aggregation.
DECODER_GROUPS = ("decoder", "out_conv", "aux")
HEAD_GROUP = "out_conv"


class LocalRule:
    """Default behaviour (FedAvg): load every shared array, train all parameters ``iters`` steps.

    Subclasses override :meth:`receive` (how received arrays enter the local model) and
    :meth:`local_train` (what the round's iterations optimise). Personal state that must survive
    across rounds goes through :meth:`state_dict` / :meth:`load_state_dict`.
    """

    #: Whether the trainer validates (and checkpoints) the model it has just trained; a rule
    #: that validates another model does it in :meth:`receive` and :meth:`final_validation`.
    validates_trained_model = True

    def __init__(self, cfg) -> None:
        self.cfg = cfg
        self.params = cfg.params  # the method's hyper-parameters

    @property
    def name(self) -> str:
        return self.cfg.method.name

    def receive(self, trainer: "SiteTrainer", arrays: Mapping[str, np.ndarray],
                shared: List[str], server_round: int) -> Optional[Dict[str, float]]:
        """Bring the received arrays into the local model; may return metrics of the round."""
        trainer.load_arrays(arrays, shared)
        return None

    def final_validation(self, trainer: "SiteTrainer", arrays: Mapping[str, np.ndarray],
                         shared: List[str], server_round: int) -> Optional[Dict[str, float]]:
        """The validation the final evaluate message asks for when this rule scores something
        other than the current model (``None``: the trainer validates its current model)."""
        return None

    def local_train(self, trainer: "SiteTrainer", server_round: int) -> Dict[str, float]:
        return trainer.run_iterations(self.cfg.iters, lambda name: True)

    def extra_reply(self, trainer: "SiteTrainer", server_round: int) -> Dict[str, np.ndarray]:
        """Arrays the site sends with its update beyond the shared model tensors (e.g. FedAP's
        BN statistics); their keys must not be model keys."""
        return {}

    def state_dict(self) -> Dict[str, object]:
        return {}

    def load_state_dict(self, state: Mapping[str, object], device: torch.device) -> None:
        return None


def load_whole_model(trainer: "SiteTrainer", arrays: Mapping[str, np.ndarray], what: str,
                     model: str) -> None:
    """Load every model array from ``arrays`` (a round that hands the site a whole model);
    ``what`` names the round and ``model`` the model in the error when some are missing."""
    keys = trainer.keys(["all"])
    missing = [k for k in keys if k not in arrays]
    if missing:
        raise ValueError(f"{what} must carry the whole {model}; {len(missing)} of {len(keys)} "
                         f"arrays are missing (e.g. {missing[0]!r})")
    trainer.load_arrays(arrays, keys)


def head_split_train(trainer: "SiteTrainer", iters: int, body_iters: int) -> Dict[str, float]:
    """FedRep-style round: ``iters - body_iters`` steps on the head alone, then
    ``body_iters`` steps on everything except the head. Metrics are step-weighted means."""
    head = set(trainer.keys([HEAD_GROUP]))
    parts = []
    if iters - body_iters > 0:
        parts.append((iters - body_iters, trainer.run_iterations(iters - body_iters, lambda n: n in head)))
    if body_iters > 0:
        parts.append((body_iters, trainer.run_iterations(body_iters, lambda n: n not in head)))
    total = sum(n for n, _ in parts)
    merged: Dict[str, float] = {}
    for n, metrics in parts:
        for key, value in metrics.items():
            if key != "lr":
                merged[key] = merged.get(key, 0.0) + value * n / total
    merged["lr"] = parts[-1][1]["lr"]
    return merged
