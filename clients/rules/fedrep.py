"""FedRep (Collins et al., ICML 2021): shared body, personal head (``out_conv``).

The server leaves ``out_conv`` out of the shared set; each round trains the head with the
body frozen, then the body with the head frozen.
"""
from ..registry import register_rule
from .base import LocalRule, head_split_train


@register_rule("FedRep")
class FedRepRule(LocalRule):
    def local_train(self, trainer, server_round: int):
        return head_split_train(trainer, self.cfg.iters, self.cfg.rep_iters)
