"""FedICRA (Lin et al., MICCAI 2023), and ``FedICRA-ref``: the same method as the published
reference code runs its round.

Server: sample-weighted mean of every shared group (encoder, PCS, decoder, head, auxiliary
heads); sites are weighted by their number of training samples, not of batches.

Site: adaptive aggregation of the decoder side (:class:`clients.rules.ala.ALARule`: the
encoder and the site-conditioned channel selection come from the global model, the decoder
side is blended element-wise with the site's own), then a FedRep-style round of ``iters``
steps: ``iters - rep_iters`` on the head alone, the last ``rep_iters`` on everything else, with
the weakly supervised objective (pCE + tree energy + gated CRF + site-contrastive term).

``FedICRA-ref`` changes only defaults (docs/federated.md, "FedICRA-ref"): W restarts at every
blend, the round after every ``ala_reset_every_iters`` local iterations (the reference's
evaluation period) starts from the whole global model, validation scores the freshly blended
model, and the blend follows the reference (W from the local model, the decoder's up blocks
and head, the global BatchNorm statistics, the whole training set, no pass cap).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Tuple

from clients.rules.ala import ALAParams, ALARule
from clients.rules.base import head_split_train

from .fedala import ALAServer, refuses_aux_blend
from .registry import Method, register_method


@dataclass
class FedICRAParams(ALAParams):
    rep_iters: int = 3  # of the iters, how many train the body (the rest the head)
    ala_warmup_iters: int = 50  # the reference's iter_global <= 50

    def checks(self, cfg) -> Iterable[Tuple[bool, str]]:
        return [*super().checks(cfg),
                (0 <= self.rep_iters <= cfg.iters,
                 f"rep_iters = {self.rep_iters} must lie in [0, iters = {cfg.iters}]")]


@dataclass
class FedICRARefParams(FedICRAParams):
    ala_reset_weights: bool = True
    ala_reset_every_iters: int = 20
    ala_validate_blend: bool = True
    ala_w_init: float = 0.0
    ala_groups: str = "decoder,out_conv"
    ala_global_buffers: bool = True
    ala_rand_percent: float = 1.0
    ala_max_epochs: int = 0


class FedICRAServer(ALAServer):
    """All groups shared, sample-weighted mean."""


class FedICRASite(ALARule):
    def local_train(self, trainer, server_round: int):
        return head_split_train(trainer, self.cfg.iters, self.params.rep_iters)


FEDICRA = register_method(Method(
    name="FedICRA", server=FedICRAServer, site=FedICRASite, params=FedICRAParams,
    model="unet_lc_multihead", procedure="pce_gatedcrf_mstree", refuses=refuses_aux_blend,
    summary="adaptive aggregation of the decoder, site-contrastive weak objective"))

FEDICRA_REF = register_method(Method(
    name="FedICRA-ref", server=FedICRAServer, site=FedICRASite, params=FedICRARefParams,
    model="unet_lc_multihead", procedure="pce_gatedcrf_mstree", refuses=refuses_aux_blend,
    summary="FedICRA as the published reference code runs its round"))
