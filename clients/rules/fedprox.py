"""FedProx (Li et al., MLSys 2020): local loss + (mu/2) * ||w - w_global||^2."""
from __future__ import annotations

from typing import Dict, List, Mapping

import numpy as np
import torch

from ..registry import register_rule
from .base import LocalRule


@register_rule("FedProx")
class FedProxRule(LocalRule):
    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        self._anchor: Dict[str, torch.Tensor] = {}

    def receive(self, trainer, arrays: Mapping[str, np.ndarray], shared: List[str],
                server_round: int) -> None:
        super().receive(trainer, arrays, shared, server_round)
        params = dict(trainer.model.named_parameters())
        self._anchor = {k: params[k].detach().clone() for k in shared if k in params}

    def local_train(self, trainer, server_round: int) -> Dict[str, float]:
        mu = self.cfg.prox_mu

        def proximal(model) -> torch.Tensor:
            params = dict(model.named_parameters())
            total = sum(((params[k] - w) ** 2).sum() for k, w in self._anchor.items())
            return 0.5 * mu * total

        return trainer.run_iterations(self.cfg.iters, lambda name: True, extra_loss=proximal)
