"""CT-weak and CT-full: one model trained centrally on the pooled data of every site.

The two references of the FedICRA comparison (Lin et al., MLMI 2023): centralised training
on the pooled training sets of all ``num_clients`` sites, with each site's own sparse labels
and pCE (``CT-weak``, what pooling the data would give) or with full masks and cross-entropy
(``CT-full``, the upper bound).

Nothing is federated: the images and labels of every site are pooled in one place and one
model is trained on them by :func:`clients.centralised.run_centralised` (no Flower). The model
is deployed as ``global/best.pt`` and tested on every site.

Same protocol as the federated methods: the same network and objective keys, ``rounds *
iters`` optimiser steps of ``num_clients * batch_size`` cases drawn from the pooled set (a
federated step trains on ``batch_size`` cases at each of the ``num_clients`` sites, so CT sees
as many samples a round as the federation; ``ct_batch = "site"``: ``batch_size`` cases a step,
the reference's ``Unet_pCE.py`` budget), the poly learning-rate decay over those steps,
validation every ``eval_every`` rounds (of ``iters`` steps) on every site's validation split,
and selection by the mean over sites of the validation Dice. One AdamW serves the whole run
(``reset_optimizer = false``, as in centralised training; the federated methods follow the
reference in starting a fresh one each round).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional, Tuple

from clients.centralised import run_centralised

from .registry import Method, MethodParams, register_method


@dataclass
class CentralisedParams(MethodParams):
    ct_batch: str = "federation"  # cases a step: "federation" = num_clients x batch_size (what the sites train on together), "site" = batch_size (the reference's Unet_pCE.py)

    def checks(self, cfg) -> Iterable[Tuple[bool, str]]:
        return [(self.ct_batch in ("federation", "site"),
                 f"ct_batch = {self.ct_batch!r} must be \"federation\" (num_clients x batch_size "
                 "pooled cases a CT step: the samples a federated step trains on at all sites) "
                 "or \"site\" (batch_size cases a step, one site's share, as the reference's "
                 "Unet_pCE.py)")]


def refuses_masks(cfg) -> Optional[Tuple[str, str]]:
    if cfg.label_form == "mask":
        return "label_form", ('"mask": CT-weak trains on each site\'s weak labels; '
                              "full masks are CT-full (--strategy CT-full)")
    return None


def needs_masks(cfg) -> Optional[Tuple[str, str]]:
    if cfg.label_form != "mask":
        return "label_form", (f"{cfg.label_form!r}: CT-full trains on full masks and needs "
                              'label_form = "mask" (weak labels: --strategy CT-weak)')
    return None


CT_WEAK = register_method(Method(
    name="CT-weak", server=None, site=None, params=CentralisedParams, federated=False,
    train=run_centralised, deploys="global", defaults={"reset_optimizer": False},
    refuses=refuses_masks, summary="centralised training on the pooled weak labels"))

CT_FULL = register_method(Method(
    name="CT-full", server=None, site=None, params=CentralisedParams, federated=False,
    train=run_centralised, deploys="global", procedure="ce_full",
    defaults={"reset_optimizer": False, "label_form": "mask"},
    refuses=needs_masks, summary="centralised training on the pooled full masks (upper bound)"))
