"""FedBN (Li et al., ICLR 2021): BatchNorm weights, biases and statistics stay on each site."""
from .base import PersonalizedStrategy
from .registry import register_strategy


@register_strategy("FedBN")
class FedBN(PersonalizedStrategy):
    share_exclude = ("bn",)
