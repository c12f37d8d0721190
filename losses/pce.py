"""Partial cross-entropy: cross-entropy over the labelled pixels of a sparse label map.

Tang et al., "Normalized Cut Loss for Weakly-supervised CNN Segmentation", CVPR 2018;
used by WSL4MIS (Luo et al., MICCAI 2022) and FedICRA.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def check_logits_label(logits: Tensor, label: Tensor, ignore_index: int) -> None:
    """Validate (B, K, H, W) logits against a (B, H, W) integer label map.

    Raises ``ValueError`` on a shape mismatch, a non-integer label, or a label value outside
    ``[0, K-1]`` other than ``ignore_index``.
    """
    if logits.dim() != 4:
        raise ValueError(f"logits must have shape (B, K, H, W), got {tuple(logits.shape)}")
    b, k, h, w = logits.shape
    if label.shape != (b, h, w):
        raise ValueError(
            f"label must have shape (B, H, W) = {(b, h, w)} matching logits, got {tuple(label.shape)}"
        )
    if label.dtype.is_floating_point or label.dtype.is_complex or label.dtype == torch.bool:
        raise ValueError(f"label must be an integer tensor, got {label.dtype}")
    if label.numel():
        bad = (label < 0) | ((label >= k) & (label != ignore_index))
        if bool(bad.any()):
            values = label[bad].unique()[:5].tolist()
            raise ValueError(
                f"label values must be in [0, {k - 1}] or ignore_index={ignore_index}, got {values}"
            )


def partial_cross_entropy(logits: Tensor, label: Tensor, ignore_index: int) -> Tensor:
    """Mean cross-entropy over pixels whose label is not ``ignore_index``.

    Parameters
    ----------
    logits:
        Unnormalised scores, shape (B, K, H, W).
    label:
        Integer label map, shape (B, H, W); values in ``[0, K-1]`` or ``ignore_index``
        (in this project the unlabelled value is ``K``).
    ignore_index:
        Label value of unlabelled pixels.

    Returns
    -------
    Tensor
        Scalar. A batch without any labelled pixel gives exactly 0, still attached to the
        graph of ``logits`` (zero gradient), never NaN.
    """
    check_logits_label(logits, label, ignore_index)
    label = label.long()
    labelled = label != ignore_index
    total = F.cross_entropy(logits, label, ignore_index=ignore_index, reduction="sum")
    return total / labelled.sum().clamp_min(1)
