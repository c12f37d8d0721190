"""FedALA (Zhang et al., AAAI 2023): FedAvg on the server; each site blends the received
model into its own with learned element-wise weights before training (adaptive local
aggregation of the top ``ala_layer_idx`` parameter tensors; the site half is the framework's
:class:`clients.rules.ala.ALARule`, which FedICRA shares)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

from clients.rules.ala import ALAParams, ALARule, blends_in_round
from networks.registry import network_info
from strategies.base import PersonalizedStrategy

from .registry import Method, register_method


@dataclass
class FedALAParams(ALAParams):
    ala_layer_idx: int = 2  # FedALA's layer_idx: the head's weight and bias


def refuses_aux_blend(cfg) -> Optional[Tuple[str, str]]:
    """Blending the top N parameter tensors (``ala_layer_idx = N > 0``) of a network whose
    last tensors are an auxiliary head would learn weights that the blending loss (pCE of the
    main output) never reaches."""
    if cfg.params.ala_layer_idx > 0 and network_info(cfg.model).aux_heads:
        return "ala_layer_idx", (
            f"{cfg.params.ala_layer_idx}: the last parameter tensors of {cfg.model!r} belong to "
            "an auxiliary head, which the blending loss does not reach; use ala_layer_idx = 0 "
            "(the decoder side) or a network without auxiliary heads")
    return None


class ALAServer(PersonalizedStrategy):
    """Every group averaged. With ``ala_validate_blend`` the sites validate their model blended
    with the last aggregate, so the final evaluate message carries it."""

    def sends_final_aggregate(self) -> bool:
        return super().sends_final_aggregate() or bool(self.params.ala_validate_blend)

    def deadline_kind(self, server_round: int) -> str:
        # learning the blending weights passes over most of a site's training cases (the first
        # time until a stopping rule): up to tens of plain rounds' work, so a blending round's
        # automatic deadline is not taken from the warm-up's copy-and-train rounds
        return "blend" if blends_in_round(server_round, self.cfg, self.params) else "train"


FEDALA = register_method(Method(
    name="FedALA", server=ALAServer, site=ALARule, params=FedALAParams, refuses=refuses_aux_blend,
    summary="FedAvg; sites blend the received head into theirs with learned weights"))
