"""FedProx (Li et al., MLSys 2020): FedAvg on the server; each site adds the proximal term
``(prox_mu / 2) * ||w - w_global||^2`` to its local loss. The global model is deployed."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterable, List, Mapping, Tuple

import numpy as np
import torch

from clients.rules.base import LocalRule
from strategies.base import PersonalizedStrategy

from .registry import Method, MethodParams, register_method


@dataclass
class FedProxParams(MethodParams):
    prox_mu: float = 0.01  # weight of the proximal term (the paper's mu)

    def checks(self, cfg) -> Iterable[Tuple[bool, str]]:
        return [(self.prox_mu >= 0.0, f"prox_mu = {self.prox_mu!r} must be >= 0")]


class FedProxServer(PersonalizedStrategy):
    """Sample-weighted mean of every group, as FedAvg."""


class FedProxSite(LocalRule):
    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        self._anchor: Dict[str, torch.Tensor] = {}

    def receive(self, trainer, arrays: Mapping[str, np.ndarray], shared: List[str],
                server_round: int) -> None:
        super().receive(trainer, arrays, shared, server_round)
        params = dict(trainer.model.named_parameters())
        self._anchor = {k: params[k].detach().clone() for k in shared if k in params}

    def local_train(self, trainer, server_round: int) -> Dict[str, float]:
        mu = self.params.prox_mu

        def proximal(model) -> torch.Tensor:
            params = dict(model.named_parameters())
            total = sum(((params[k] - w) ** 2).sum() for k, w in self._anchor.items())
            return 0.5 * mu * total

        return trainer.run_iterations(self.cfg.iters, lambda name: True, extra_loss=proximal)


FEDPROX = register_method(Method(
    name="FedProx", server=FedProxServer, site=FedProxSite, params=FedProxParams,
    deploys="global", summary="FedAvg with a proximal term on the sites"))
