"""FedALA (Zhang et al., AAAI 2023): FedAvg on the server; sites blend the decoder side with
learned element-wise weights before training."""
from .base import PersonalizedStrategy
from .registry import register_strategy


@register_strategy("FedALA")
class FedALA(PersonalizedStrategy):
    """All groups shared; adaptive local aggregation of the top ``ala_layer_idx`` parameter
    tensors happens on the sites (FedALA's default: 2, the head's weight and bias)."""

    defaults = {"model": "unet", "procedure": "pce", "ala_layer_idx": 2}
