"""FedAvg (McMahan et al., AISTATS 2017): every parameter shared, sample-weighted mean."""
from .base import PersonalizedStrategy
from .registry import register_strategy


@register_strategy("FedAvg")
class FedAvg(PersonalizedStrategy):
    """All groups shared; the base class's sample-weighted mean. Deploys the global model."""

    deploys = "global"
