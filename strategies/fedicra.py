"""FedICRA server rule: sample-weighted mean of every shared group (and FedICRA-ref).

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
                "rep_iters": 3, "ala_layer_idx": 0, "ala_warmup_iters": 50}


@register_strategy("FedICRA-ref")
class FedICRARef(FedICRA):
    """FedICRA as the published reference code runs its round: W restarts at every blend,
    the round after every ``ala_reset_every_iters`` local iterations (its evaluation period)
    starts from the whole global model, validation scores the freshly blended model, and the
    blend itself follows the reference (W from the local model, the decoder's up blocks and
    head, the global BatchNorm statistics, the whole training set, no pass cap)."""

    defaults = {**FedICRA.defaults, "ala_reset_weights": True, "ala_reset_every_iters": 20,
                "ala_validate_blend": True, "ala_w_init": 0.0, "ala_groups": "decoder,out_conv",
                "ala_global_buffers": True, "ala_rand_percent": 1.0, "ala_max_epochs": 0}
