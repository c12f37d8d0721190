"""Gated CRF loss with a Potts compatibility.

Obukhov, Georgoulis, Dai, Van Gool, "Gated CRF Loss for Weakly Supervised Semantic Image
Segmentation", arXiv:1906.04651, 2019 (NeurIPS 2019 workshop).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _shift_slices(d: int, n: int):
    """Slices ``(a, b)`` of a length-``n`` axis with ``b[t] = a[t] + d`` (both inside)."""
    if d >= 0:
        return slice(0, n - d), slice(d, n)
    return slice(-d, n), slice(0, n + d)


def gated_crf_loss(
    probs: Tensor,
    image: Tensor,
    sigma_xy: float = 6.0,
    sigma_rgb: float = 0.1,
    radius: int = 5,
    downsample: int = 1,
) -> Tensor:
    """Gated CRF loss of class probabilities against the image they segment.

    .. math::

        L = \\frac{1}{B H W} \\sum_i \\sum_{j \\in \\Omega_r(i), j \\ne i}
            K_{ij} \\left(1 - \\sum_c P_{ic} P_{jc}\\right),\\quad
        K_{ij} = \\exp\\left(-\\frac{|x_i - x_j|^2}{2\\sigma_{xy}^2}
                             -\\frac{|I_i - I_j|^2}{2\\sigma_{rgb}^2}\\right)

    where :math:`\\Omega_r(i)` is the (2r+1) x (2r+1) window around pixel i restricted to the
    image, :math:`x` are pixel positions and :math:`|I_i - I_j|^2` is summed over channels.

    Parameters
    ----------
    probs:
        Class probabilities (softmax of the logits), shape (B, K, H, W).
    image:
        Guidance image, shape (B, C, H, W), any number of channels; treated as a constant
        (no gradient flows into it).
    sigma_xy:
        Spatial bandwidth, in pixels of the original (not downsampled) grid.
    sigma_rgb:
        Intensity bandwidth, in image units.
    radius:
        Window radius r, in pixels of the (possibly downsampled) grid.
    downsample:
        Factor d >= 1. With d > 1, ``probs`` and ``image`` are average-pooled by d (H and W must
        be divisible by d), the window spans r pixels of the pooled grid (r*d original pixels),
        positions are scaled by d so that ``sigma_xy`` keeps its original-pixel meaning, and the
        normaliser is B * (H/d) * (W/d).

    Returns
    -------
    Tensor
        Scalar loss in the promoted floating type of ``probs`` (at least float32).

    Notes
    -----
    The kernel is symmetric, so only half of the window offsets are visited and the gradient
    is :math:`\\partial L / \\partial P_i = -\\frac{2}{BHW} \\sum_j K_{ij} P_j`; it is formed
    without keeping a kernel per offset for autograd, so memory stays O(B K H W) whatever the
    radius (batch 12 at 384x384 is cheap). Second derivatives are not supported.
    """
    if probs.dim() != 4 or image.dim() != 4:
        raise ValueError(
            f"probs and image must have shape (B, K, H, W) and (B, C, H, W), got "
            f"{tuple(probs.shape)} and {tuple(image.shape)}"
        )
    if probs.shape[0] != image.shape[0] or probs.shape[-2:] != image.shape[-2:]:
        raise ValueError(
            f"probs {tuple(probs.shape)} and image {tuple(image.shape)} must share batch size "
            f"and spatial size"
        )
    if not probs.is_floating_point():
        raise ValueError(f"probs must be a floating tensor, got {probs.dtype}")
    if sigma_xy <= 0 or sigma_rgb <= 0:
        raise ValueError(f"sigma_xy and sigma_rgb must be > 0, got {sigma_xy}, {sigma_rgb}")
    if int(radius) != radius or radius < 1:
        raise ValueError(f"radius must be an integer >= 1, got {radius}")
    if int(downsample) != downsample or downsample < 1:
        raise ValueError(f"downsample must be an integer >= 1, got {downsample}")
    radius, d = int(radius), int(downsample)
    height, width = probs.shape[-2:]
    if height % d or width % d:
        raise ValueError(f"image size {height}x{width} is not divisible by downsample={d}")

    dtype = torch.promote_types(probs.dtype, torch.float32)
    p = probs.to(dtype)
    img = image.detach().to(dtype)
    if d > 1:
        p = F.avg_pool2d(p, d)
        img = F.avg_pool2d(img, d)
    b, _, h, w = p.shape
    n = b * h * w
    xy_scale = (d * d) / (2.0 * sigma_xy * sigma_xy)
    rgb_scale = 1.0 / (2.0 * sigma_rgb * sigma_rgb)
    need_grad = torch.is_grad_enabled() and p.requires_grad

    with torch.no_grad():
        pd = p.detach()
        filtered = torch.zeros_like(pd) if need_grad else None  # sum_j K_ij P_j
        value = torch.zeros((), dtype=dtype, device=p.device)
        for dy in range(0, radius + 1):
            for dx in range(-radius, radius + 1):
                if dy == 0 and dx <= 0:
                    continue  # the other half of the window follows by symmetry
                if dy >= h or abs(dx) >= w:
                    continue
                ya, yb = _shift_slices(dy, h)
                xa, xb = _shift_slices(dx, w)
                diff = img[:, :, ya, xa] - img[:, :, yb, xb]
                kernel = torch.exp(-(dy * dy + dx * dx) * xy_scale - diff.pow(2).sum(1) * rgb_scale)
                pa, pb = pd[:, :, ya, xa], pd[:, :, yb, xb]
                value += 2.0 * (kernel * (1.0 - (pa * pb).sum(1))).sum()
                if filtered is not None:
                    kernel = kernel.unsqueeze(1)
                    filtered[:, :, ya, xa] += kernel * pb
                    filtered[:, :, yb, xb] += kernel * pa
        value = value / n
    if filtered is None:
        return value
    # Equal to `value`, with gradient -2/n * filtered w.r.t. p.
    attached = (p * filtered).sum()
    return value - (2.0 / n) * (attached - attached.detach())
