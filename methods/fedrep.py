"""FedRep (Collins et al., ICML 2021): shared body, personal head (``out_conv``).

The server leaves ``out_conv`` out of the shared set; each round the site trains the head
with the body frozen for ``iters - rep_iters`` steps, then the body with the head frozen for
``rep_iters`` steps.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Tuple

from clients.rules.base import LocalRule, head_split_train
from strategies.base import PersonalizedStrategy

from .registry import Method, MethodParams, register_method


@dataclass
class HeadSplitParams(MethodParams):
    """A round of ``iters`` steps: the head alone first, then the body for ``rep_iters``."""

    rep_iters: int = 3  # of the iters, how many train the body (the rest the head)

    def checks(self, cfg) -> Iterable[Tuple[bool, str]]:
        return [(0 <= self.rep_iters <= cfg.iters,
                 f"rep_iters = {self.rep_iters} must lie in [0, iters = {cfg.iters}]")]


class FedRepServer(PersonalizedStrategy):
    share_exclude = ("out_conv",)


class FedRepSite(LocalRule):
    def local_train(self, trainer, server_round: int):
        return head_split_train(trainer, self.cfg.iters, self.params.rep_iters)


FEDREP = register_method(Method(
    name="FedRep", server=FedRepServer, site=FedRepSite, params=HeadSplitParams,
    summary="shared body, personal head; head steps, then body steps"))
