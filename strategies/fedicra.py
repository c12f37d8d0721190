"""FedICRA server rule: sample-weighted mean of every shared group.

The personalisation happens on the sites (``clients/rules/fedicra.py``): the encoder and the
site-conditioned channel selection are taken from the global model, the decoder side is
blended element-wise with the site's own, and training splits into head and body steps with
the weakly supervised objective. Sites are weighted by their number of training samples, not
by their number of batches.
"""
from .base import PersonalizedStrategy
from .registry import register_strategy


@register_strategy("FedICRA")
class FedICRA(PersonalizedStrategy):
    """All groups (encoder, PCS, decoder, head, auxiliary heads) are shared."""

    defaults = {"model": "unet_lc_multihead", "procedure": "pce_gatedcrf_mstree", "alpha": 1.0,
                "rep_iters": 3, "ala_layer_idx": 0}
