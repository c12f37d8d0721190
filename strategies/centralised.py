"""CT-weak and CT-full: one model trained centrally on the pooled data of every site.

The two references of the FedICRA comparison (Lin et al., MLMI 2023): centralised training
on the pooled training sets of all ``num_clients`` sites, with each site's own sparse labels
and pCE (``CT-weak``, the lower reference of what pooling the data would give) or with full
masks and cross-entropy (``CT-full``, the upper bound).

What is shared and what stays local
-----------------------------------
Nothing stays local and nothing is federated: the images and labels of every site are pooled
in one place and one model is trained on them (``clients/centralised.py``). These classes only
register the names (so ``--strategy CT-weak`` resolves, their defaults apply and the pre-flight
checks see them) and declare ``federated = False``, on which ``flower_runner.py`` runs the
centralised trainer instead of starting Flower. The model is deployed as ``global/best.pt``
and tested on every site (``deploys = "global"``).

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

from typing import Optional, Tuple

from .base import PersonalizedStrategy
from .registry import register_strategy


class Centralised(PersonalizedStrategy):
    """Base of the centralised references: not a Flower strategy (see the module docstring)."""

    deploys = "global"
    #: False: ``flower_runner.py`` trains with :func:`clients.centralised.run_centralised`.
    federated = False
    defaults = {"model": "unet", "procedure": "pce", "reset_optimizer": False,
                "ct_batch": "federation"}

    @classmethod
    def refuses(cls, cfg) -> Optional[Tuple[str, str]]:
        """``(key, reason)`` when ``cfg`` cannot run this method (pre-flight), else None."""
        return None

    def start(self, *args, **kwargs):
        raise ValueError(f"{self.name} is centralised training, not a federation: run it with "
                         f"`python flower_runner.py --strategy {self.name} ...` (no SuperLink, "
                         "no sites)")


@register_strategy("CT-weak")
class CentralisedWeak(Centralised):
    """Pooled training sets, each site's own weak label form, pCE."""

    defaults = {"model": "unet", "procedure": "pce", "reset_optimizer": False,
                "ct_batch": "federation"}

    @classmethod
    def refuses(cls, cfg) -> Optional[Tuple[str, str]]:
        if cfg.label_form == "mask":
            return "label_form", ('"mask": CT-weak trains on each site\'s weak labels; '
                                  "full masks are CT-full (--strategy CT-full)")
        return None


@register_strategy("CT-full")
class CentralisedFull(Centralised):
    """Pooled training sets with full masks, cross-entropy."""

    defaults = {"model": "unet", "procedure": "ce_full", "label_form": "mask",
                "reset_optimizer": False, "ct_batch": "federation"}

    @classmethod
    def refuses(cls, cfg) -> Optional[Tuple[str, str]]:
        if cfg.label_form != "mask":
            return "label_form", (f"{cfg.label_form!r}: CT-full trains on full masks and needs "
                                  'label_form = "mask" (weak labels: --strategy CT-weak)')
        return None
