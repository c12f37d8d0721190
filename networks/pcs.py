"""Personalised channel selection (PCS) of FedLC / FedICRA.

Wang et al., "Personalizing Federated Medical Image Segmentation via Local Calibration",
ECCV 2022; reused by Lin et al., "Unifying and Personalizing Weakly-supervised Federated
Medical Image Segmentation via Adaptive Representation and Aggregation" (FedICRA), MLMI 2023.
"""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class PersonalisedChannelSelection(nn.Module):
    """Site-conditioned channel attention on a feature map.

    For features ``f`` (B, C, h, w) and a site code ``e = one_hot(site)`` in R^K::

        emb = conv1x1(K -> C) -> ReLU -> conv1x1(C -> C)              (site embedding)
        h   = sigmoid(g([avgpool(f); emb]) + g([maxpool(f); emb]))    (gate, (B, C, 1, 1))
        g   = conv1x1(2C -> C/r) -> ReLU -> conv1x1(C/r -> C)         (shared by both branches)
        out = f * h + f

    The module has no normalisation layer and no dropout, so computing gates for other site
    codes (site-contrastive loss) never changes BatchNorm statistics or draws random numbers.

    Parameters
    ----------
    channels:
        C, channels of the features it gates.
    num_sites:
        K, number of sites (length of the one-hot site code).
    reduction:
        r, hidden width of ``g`` is ``max(1, C // r)``.
    """

    def __init__(self, channels: int, num_sites: int, reduction: int = 16) -> None:
        super().__init__()
        if channels < 1 or num_sites < 1 or reduction < 1:
            raise ValueError(
                f"channels, num_sites and reduction must be >= 1, got {channels}, {num_sites}, "
                f"{reduction}"
            )
        self.channels = channels
        self.num_sites = num_sites
        hidden = max(1, channels // reduction)
        self.site_embedding = nn.Sequential(
            nn.Conv2d(num_sites, channels, kernel_size=1, bias=False),
            nn.ReLU(),
            nn.Conv2d(channels, channels, kernel_size=1, bias=False),
        )
        self.mlp = nn.Sequential(
            nn.Conv2d(2 * channels, hidden, kernel_size=1, bias=False),
            nn.ReLU(),
            nn.Conv2d(hidden, channels, kernel_size=1, bias=False),
        )

    def _check_site(self, site: int) -> int:
        if isinstance(site, bool) or not isinstance(site, int):
            site = int(site)
        if not 0 <= site < self.num_sites:
            raise ValueError(f"site must be in [0, {self.num_sites - 1}], got {site}")
        return site

    def gate(self, features: Tensor, site: int) -> Tensor:
        """Gate ``h`` (B, C, 1, 1) that site code ``site`` gives to ``features`` (B, C, h, w)."""
        if features.dim() != 4 or features.shape[1] != self.channels:
            raise ValueError(
                f"features must have shape (B, {self.channels}, h, w), got {tuple(features.shape)}"
            )
        site = self._check_site(site)
        batch = features.shape[0]
        code = torch.zeros(1, self.num_sites, 1, 1, device=features.device, dtype=features.dtype)
        code[:, site] = 1
        emb = self.site_embedding(code).expand(batch, -1, -1, -1)
        avg = F.adaptive_avg_pool2d(features, 1)
        mx = F.adaptive_max_pool2d(features, 1)
        logits = self.mlp(torch.cat([avg, emb], dim=1)) + self.mlp(torch.cat([mx, emb], dim=1))
        return torch.sigmoid(logits)

    def forward(self, features: Tensor, site: int) -> Tuple[Tensor, Tensor]:
        """Return ``(features * h + features, h)`` for the gate ``h`` of ``site``."""
        h = self.gate(features, site)
        return features * h + features, h
