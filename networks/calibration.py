"""Disagreement-aware head calibration of FedLC / LC-Fed and the networks that carry it.

Wang et al., "Personalizing Federated Medical Image Segmentation via Local Calibration",
ECCV 2022 (code: github.com/jcwang123/FedLC, ``networks/multi_lcnet.py``).

Every site keeps its own segmentation head (``out_conv``). At the start of a round the site
receives a snapshot of every site's head. Applied to the site's own full-resolution decoder
feature ``f``, the heads give K class-probability maps ``p_1 .. p_K``; where they disagree the
prediction is ambiguous (typically at boundaries). The calibration module turns this
disagreement and the site's own prediction into two attention maps per class, re-weights ``f``
with each, and fuses the 2 * classes re-weighted copies of ``f`` with one convolution into the
calibrated logits, the prediction the site deploys.

Registered names:

- ``unet_lc_calib``: U-Net + PCS (``unet_lc``) + calibration module.
- ``unet_lc_multihead_calib``: U-Net + PCS + auxiliary heads (``unet_lc_multihead``) +
  calibration module (for the objectives with the tree energy term).

The module is the top-level submodule ``calib``, hence the parameter group ``calib`` of
:mod:`networks.groups` (not among the groups a strategy shares by default). Its state holds the
fusion convolution and the snapshot of the sites' heads (buffers), so a checkpoint of the
network is all that inference needs.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .outputs import SegOutput
from .registry import NetworkInfo, register_network
from .unet import DEFAULT_DROPOUT, SIZE_MULTIPLE, UNet

#: Keys of a segmentation head (``out_conv``) in a network's ``state_dict``.
HEAD_KEYS: Tuple[str, ...] = ("out_conv.weight", "out_conv.bias")
#: Prefix of the extra message arrays that carry the sites' heads (never a model key).
HEAD_PREFIX = "fedlc_head"


def head_key(site: int, key: str) -> str:
    """Message key of head array ``key`` of site ``site``: ``fedlc_head.<site>.<key>``."""
    return f"{HEAD_PREFIX}.{int(site)}.{key}"


def parse_head_key(name: str) -> Optional[Tuple[int, str]]:
    """``(site, key)`` of a :func:`head_key` name, ``None`` for any other name."""
    parts = name.split(".", 2)
    if len(parts) == 3 and parts[0] == HEAD_PREFIX and parts[1].isdigit() and parts[2] in HEAD_KEYS:
        return int(parts[1]), parts[2]
    return None


def gaussian_window(size: int, sigma: float) -> Tensor:
    """(1, 1, size, size) Gaussian whose centre value is 1 (the original's smoothing kernel)."""
    if size < 1 or size % 2 == 0 or sigma <= 0:
        raise ValueError(f"window size must be odd and >= 1 and sigma > 0, got {size}, {sigma}")
    r = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(r[:, None] ** 2 + r[None, :] ** 2) / (2.0 * sigma * sigma))
    return g.float()[None, None]


def head_disagreement(probs: Tensor, site: int) -> Tensor:
    """Per-pixel spread of the sites' predictions around the own site's prediction.

    ``u = sqrt(sum_j (p_j - p_site)^2 / (K - 1))`` for every class channel, the standard
    deviation of the K predictions about the own site's one (the original's measure); zero for
    K = 1.

    Parameters
    ----------
    probs:
        (B, K, C, H, W) class probabilities of the K heads.
    site:
        Index of the own site's head among the K.

    Returns
    -------
    Tensor
        (B, C, H, W).
    """
    k = probs.shape[1]
    if k < 2:
        return torch.zeros_like(probs[:, 0])
    own = probs[:, site:site + 1]
    return (((probs - own) ** 2).sum(dim=1) / (k - 1)).sqrt()


class HeadCalibration(nn.Module):
    """Disagreement-aware calibration head (FedLC's "local calibration" of the prediction).

    Given the own decoder feature ``f`` (B, c, H, W), the own logits and the snapshot of all K
    sites' heads:

    1. ``p_j = softmax(head_j(f))`` for every site j; ``u`` = :func:`head_disagreement`;
    2. ``u`` is scaled to a maximum of 1 per image and class, and only its local maxima
       (``peak_window`` x ``peak_window`` neighbourhood) above ``peak_threshold`` are kept;
    3. the peak map and the own class probabilities are smoothed with a Gaussian window
       (``smooth_size``, ``smooth_sigma``, centre value 1) and clipped to [0, 1]: attention
       maps ``a_u[c]`` and ``a_p[c]``;
    4. ``out = fuse(concat_c [f * a_u[c] + f, f * a_p[c] + f])``, a ``fuse_kernel`` convolution
       from ``2 * C * c`` channels to C calibrated logits.

    Steps 1-3 involve no parameter of this module and run without gradient; ``f`` and the
    logits enter detached, so a loss on ``out`` trains only ``fuse``.

    Buffers ``head_weight`` (K, C, c, k, k), ``head_bias`` (K, C) and ``ready`` hold the heads'
    snapshot; they are state (saved with the network), not parameters.

    Parameters
    ----------
    num_classes, channels, num_sites:
        C, c (channels of ``f``) and K.
    head_kernel:
        Kernel size of the segmentation head (``out_conv``), whose weights the snapshot holds.
    fuse_kernel:
        Kernel size of the fusion convolution (3 in the original code).
    peak_window, peak_threshold, smooth_size, smooth_sigma:
        Peak selection and smoothing of step 2-3 (original: 31, 0.2, 31, 6).
    """

    def __init__(self, num_classes: int, channels: int, num_sites: int, head_kernel: int = 3,
                 fuse_kernel: int = 3, peak_window: int = 31, peak_threshold: float = 0.2,
                 smooth_size: int = 31, smooth_sigma: float = 6.0) -> None:
        super().__init__()
        if min(num_classes, channels, num_sites, head_kernel, fuse_kernel) < 1:
            raise ValueError("num_classes, channels, num_sites and kernel sizes must be >= 1")
        if peak_window < 1 or peak_window % 2 == 0:
            raise ValueError(f"peak_window must be odd and >= 1, got {peak_window}")
        self.num_classes = num_classes
        self.channels = channels
        self.num_sites = num_sites
        self.head_kernel = head_kernel
        self.peak_window = peak_window
        self.peak_threshold = float(peak_threshold)
        self.fuse = nn.Conv2d(2 * num_classes * channels, num_classes, kernel_size=fuse_kernel,
                              padding=fuse_kernel // 2)
        head_shape = (num_sites, num_classes, channels, head_kernel, head_kernel)
        self.register_buffer("head_weight", torch.zeros(head_shape))
        self.register_buffer("head_bias", torch.zeros(num_sites, num_classes))
        self.register_buffer("ready", torch.zeros((), dtype=torch.bool))
        self.register_buffer("smooth_window", gaussian_window(smooth_size, smooth_sigma),
                             persistent=False)

    @property
    def is_ready(self) -> bool:
        """Whether a snapshot of the heads has been loaded."""
        return bool(self.ready)

    @torch.no_grad()
    def set_heads(self, weight: Tensor, bias: Tensor) -> None:
        """Store the snapshot: ``weight`` (K, C, c, k, k) and ``bias`` (K, C), copied (detached)."""
        weight = torch.as_tensor(weight)
        bias = torch.as_tensor(bias)
        if tuple(weight.shape) != tuple(self.head_weight.shape) or \
                tuple(bias.shape) != tuple(self.head_bias.shape):
            raise ValueError(f"head snapshot of shapes {tuple(weight.shape)}, "
                             f"{tuple(bias.shape)}; expected {tuple(self.head_weight.shape)}, "
                             f"{tuple(self.head_bias.shape)}")
        self.head_weight.copy_(weight.to(self.head_weight))
        self.head_bias.copy_(bias.to(self.head_bias))
        self.ready.fill_(True)

    @torch.no_grad()
    def head_probabilities(self, features: Tensor) -> Tensor:
        """(B, K, C, H, W) class probabilities of every snapshot head on ``features``."""
        k, c = self.num_sites, self.num_classes
        weight = self.head_weight.reshape(k * c, self.channels, self.head_kernel, self.head_kernel)
        bias = self.head_bias.reshape(-1).to(features.dtype)
        logits = F.conv2d(features, weight.to(features.dtype), bias, padding=self.head_kernel // 2)
        b, _, h, w = logits.shape
        return logits.reshape(b, k, c, h, w).softmax(dim=2)

    def _smooth(self, maps: Tensor) -> Tensor:
        """Gaussian smoothing of every channel of (B, C, H, W), clipped to [0, 1]."""
        b, c, h, w = maps.shape
        window = self.smooth_window.to(maps.dtype)
        out = F.conv2d(maps.reshape(b * c, 1, h, w), window, padding=window.shape[-1] // 2)
        return out.reshape(b, c, h, w).clamp(0.0, 1.0)

    @torch.no_grad()
    def uncertainty(self, features: Tensor, site: int) -> Tensor:
        """(B, C, H, W) disagreement of the snapshot heads on ``features`` (see
        :func:`head_disagreement`), before peak selection."""
        return head_disagreement(self.head_probabilities(features), site)

    @torch.no_grad()
    def attention(self, features: Tensor, logits: Tensor, site: int) -> Tuple[Tensor, Tensor]:
        """Attention maps ``(a_u, a_p)``, each (B, C, H, W) in [0, 1] (steps 1-3)."""
        u = self.uncertainty(features, site)
        u = u / u.amax(dim=(2, 3), keepdim=True).clamp_min(1e-12)
        local_max = F.max_pool2d(u, self.peak_window, stride=1, padding=self.peak_window // 2)
        peaks = ((u == local_max) & (u > self.peak_threshold)).to(u.dtype)
        return self._smooth(peaks), self._smooth(logits.softmax(dim=1))

    def forward(self, features: Tensor, logits: Tensor, site: int) -> Tensor:
        """Calibrated logits (B, C, H, W) from the own decoder ``features`` and ``logits``
        (both detached here: gradient reaches only :attr:`fuse`)."""
        if not self.is_ready:
            raise RuntimeError("the calibration head has no snapshot of the sites' heads yet "
                               "(set_heads)")
        if not 0 <= int(site) < self.num_sites:
            raise ValueError(f"site must be in [0, {self.num_sites - 1}], got {site}")
        features = features.detach()
        att_u, att_p = self.attention(features, logits.detach(), int(site))
        parts = []
        for c in range(self.num_classes):
            parts.append(features * att_u[:, c:c + 1] + features)
            parts.append(features * att_p[:, c:c + 1] + features)
        return self.fuse(torch.cat(parts, dim=1))


class CalibratedUNet(UNet):
    """U-Net with PCS (and optionally auxiliary heads) plus a :class:`HeadCalibration` ``calib``.

    In training mode :meth:`forward` returns the network's own prediction (what the objective
    trains); in evaluation mode, once a snapshot of the heads is loaded, ``logits`` are the
    calibrated ones: validation, ``best.pt`` selection and ``test_client.py`` score the
    calibrated prediction without knowing about it. ``forward(x, calibrated=...)`` forces
    either.
    """

    def __init__(self, in_chns: int, num_classes: int, base_channels: int = 16,
                 dropout: Optional[Sequence[float]] = DEFAULT_DROPOUT, multihead: bool = False,
                 aux_channels: int = 512, num_sites: int = 1, site: int = 0,
                 pcs_reduction: int = 16) -> None:
        super().__init__(in_chns, num_classes, base_channels=base_channels, dropout=dropout,
                         personalised=True, multihead=multihead, aux_channels=aux_channels,
                         num_sites=num_sites, site=site, pcs_reduction=pcs_reduction)
        self.calib = HeadCalibration(num_classes, self.channels[0], num_sites,
                                     head_kernel=self.out_conv.kernel_size[0])

    @property
    def calibration_ready(self) -> bool:
        return self.calib.is_ready

    def head_state(self) -> Tuple[Tensor, Tensor]:
        """Detached copies of the own head's weight and bias."""
        return self.out_conv.weight.detach().clone(), self.out_conv.bias.detach().clone()

    def set_peer_heads(self, weights: Sequence[Tensor], biases: Sequence[Tensor]) -> None:
        """Snapshot of the K sites' heads, in site order (see :meth:`HeadCalibration.set_heads`)."""
        self.calib.set_heads(torch.stack([torch.as_tensor(w) for w in weights]),
                             torch.stack([torch.as_tensor(b) for b in biases]))

    def calibrate(self, out: SegOutput, site: Optional[int] = None) -> Tensor:
        """Calibrated logits for a forward output ``out`` of this network (inputs detached)."""
        return self.calib(out.decoder_features, out.logits, self.site if site is None else site)

    def forward(self, x: Tensor, site: Optional[int] = None,
                calibrated: Optional[bool] = None) -> SegOutput:
        """As :meth:`UNet.forward`; ``calibrated`` (default: evaluation mode with a snapshot
        loaded) replaces ``logits`` by the calibrated logits."""
        out = super().forward(x, site)
        if calibrated is None:
            calibrated = not self.training and self.calibration_ready
        if not calibrated:
            return out
        return dataclasses.replace(out, logits=self.calibrate(out, site))


@register_network("unet_lc_calib", info=NetworkInfo(
    size_multiple=SIZE_MULTIPLE, site_gates=True, calibration_head=True, uncalibrated="unet_lc"))
def unet_lc_calib(in_chns: int, num_classes: int, base_channels: int = 16,
                  dropout: Optional[Sequence[float]] = DEFAULT_DROPOUT, aux_channels: int = 512,
                  num_sites: int = 1, site: int = 0, pcs_reduction: int = 16) -> CalibratedUNet:
    """FedLC network: U-Net + PCS + disagreement-aware calibration head."""
    return CalibratedUNet(in_chns, num_classes, base_channels=base_channels, dropout=dropout,
                          multihead=False, aux_channels=aux_channels, num_sites=num_sites,
                          site=site, pcs_reduction=pcs_reduction)


@register_network("unet_lc_multihead_calib", info=NetworkInfo(
    size_multiple=SIZE_MULTIPLE, site_gates=True, aux_heads=True, calibration_head=True,
    uncalibrated="unet_lc_multihead"))
def unet_lc_multihead_calib(in_chns: int, num_classes: int, base_channels: int = 16,
                            dropout: Optional[Sequence[float]] = DEFAULT_DROPOUT,
                            aux_channels: int = 512, num_sites: int = 1, site: int = 0,
                            pcs_reduction: int = 16) -> CalibratedUNet:
    """FedLC network with the three auxiliary heads (for the tree energy objectives)."""
    return CalibratedUNet(in_chns, num_classes, base_channels=base_channels, dropout=dropout,
                          multihead=True, aux_channels=aux_channels, num_sites=num_sites,
                          site=site, pcs_reduction=pcs_reduction)
