"""FedRep (Collins et al., ICML 2021): the body is averaged, the head (``out_conv``) stays local."""
from .base import PersonalizedStrategy
from .registry import register_strategy


@register_strategy("FedRep")
class FedRep(PersonalizedStrategy):
    share_exclude = ("out_conv",)
    defaults = {"model": "unet", "procedure": "pce", "rep_iters": 3}
