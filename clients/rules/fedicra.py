"""FedICRA local rule: adaptive aggregation of the decoder + FedRep-style iteration split.

Receiving the global model, the site keeps the global encoder (and PCS) and blends every
decoder-side parameter with its own through the element-wise weights of FedALA. The round's
``iters`` steps then train ``out_conv`` alone for ``iters - rep_iters`` steps and everything
else for the last ``rep_iters`` steps, with the full weakly supervised objective
(pCE + tree energy + gated CRF + site-contrastive term, chosen by ``procedure``).
"""
from ..registry import register_rule
from .base import head_split_train
from .fedala import FedALARule


@register_rule("FedICRA")
class FedICRARule(FedALARule):
    def local_train(self, trainer, server_round: int):
        return head_split_train(trainer, self.cfg.iters, self.cfg.rep_iters)


@register_rule("FedICRA-ref")
class FedICRARefRule(FedICRARule):
    """The reference code's round: the same rule, its behaviour set by the keys that the
    ``FedICRA-ref`` strategy defaults (``ala_reset_weights``, ``ala_reset_every_iters``,
    ``ala_validate_blend`` and the reference's blend settings; ``clients/rules/fedala.py``)."""
