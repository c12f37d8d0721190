"""FedProx (Li et al., MLSys 2020): FedAvg on the server; the proximal term
``(prox_mu / 2) * ||w - w_global||^2`` is added by the sites (``clients/rules/fedprox.py``)."""
from .base import PersonalizedStrategy
from .registry import register_strategy


@register_strategy("FedProx")
class FedProx(PersonalizedStrategy):
    """All groups shared. Deploys the global model."""

    deploys = "global"
    defaults = {"model": "unet", "procedure": "pce", "prox_mu": 0.01}
