"""Typed result of every segmentation network's forward pass."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

from torch import Tensor


@dataclass
class SegOutput:
    """What a network returns.

    Attributes
    ----------
    logits:
        Main prediction, shape (B, num_classes, H, W).
    aux_logits:
        Auxiliary head predictions ordered coarse to fine, each (B, num_classes, h, w) at
        1/4, 1/2 and full resolution for the ``*_multihead`` networks; empty otherwise.
    gates:
        Channel-selection gate of the own site, (B, C_bottleneck, 1, 1); ``None`` for networks
        without personalised channel selection.
    features:
        Deepest encoder features *before* channel selection, (B, C_bottleneck, h, w); the
        site-contrastive loss recomputes gates of other site codes from them.
    decoder_features:
        Full-resolution decoder feature map before ``out_conv``, (B, C_first, H, W).
    """

    logits: Tensor
    aux_logits: Tuple[Tensor, ...] = ()
    gates: Optional[Tensor] = None
    features: Optional[Tensor] = None
    decoder_features: Optional[Tensor] = None
