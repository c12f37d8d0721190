"""FedAvg / FedBN local rule: plain local training on the received shared parameters.

FedBN differs only on the server, which leaves the ``bn`` group out of the shared set; the
client loads and returns exactly the arrays the round's config names.
"""
from ..registry import register_rule
from .base import LocalRule


@register_rule("FedAvg")
class FedAvgRule(LocalRule):
    """McMahan et al., AISTATS 2017."""


@register_rule("FedBN")
class FedBNRule(LocalRule):
    """Li et al., ICLR 2021: BatchNorm layers stay local (server side excludes them)."""
