"""FedALA (Zhang et al., AAAI 2023): FedAvg on the server; each site blends the received
model into its own with learned element-wise weights before training (adaptive local
aggregation of the top ``ala_layer_idx`` parameter tensors; the site half is the framework's
:class:`clients.rules.ala.ALARule`, which FedICRA shares)."""
from __future__ import annotations

from dataclasses import dataclass

from clients.rules.ala import ALAParams, ALARule
from strategies.base import PersonalizedStrategy

from .registry import Method, register_method


@dataclass
class FedALAParams(ALAParams):
    ala_layer_idx: int = 2  # FedALA's layer_idx: the head's weight and bias


class ALAServer(PersonalizedStrategy):
    """Every group averaged. With ``ala_validate_blend`` the sites validate their model blended
    with the last aggregate, so the final evaluate message carries it."""

    def sends_final_aggregate(self) -> bool:
        return super().sends_final_aggregate() or bool(self.params.ala_validate_blend)


FEDALA = register_method(Method(
    name="FedALA", server=ALAServer, site=ALARule, params=FedALAParams,
    summary="FedAvg; sites blend the received head into theirs with learned weights"))
