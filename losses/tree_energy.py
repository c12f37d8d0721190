"""Multiscale tree energy loss (Liang et al., "Tree Energy Loss: Towards Sparsely Annotated
Semantic Segmentation", CVPR 2022), in the cascaded multiscale form used by FedICRA.

The prediction is filtered along a minimum spanning tree of the image (low-level affinity),
then successively along trees of the auxiliary heads' logits (high-level affinities); the
result is a soft pseudo-label for the unlabelled pixels. Tree filter: Song et al.,
"Learnable Tree Filter for Structure-preserving Feature Transform", NeurIPS 2019
(:func:`losses.tree_filter.tree_filter`).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from losses.tree_filter import tree_filter

__all__ = ["multiscale_tree_energy_loss", "MultiscaleTreeEnergyLoss", "low_level_guide"]

IMAGE_COST_OFFSET = 1.0
"""The reference builds the image tree on ``|dI|^2 + 1`` (the offset does not change the
tree and is kept out of the edge weights)."""

_SIMPLEX_TOLERANCE = 1e-4


def multiscale_tree_energy_loss(
    probs: Tensor,
    image: Tensor,
    aux_logits: Sequence[Tensor],
    label: Tensor,
    unlabelled: int,
    sigma_low: float = 0.02,
    sigma_high: float = 1.0,
    backend: str = "torch",
    gray_as_rgb: bool = False,
) -> Tensor:
    """Multiscale tree energy loss.

    ``AS_0 = TF(probs)`` on the tree of ``image`` (weights ``exp(-|dI|^2 / sigma_low)``);
    for each auxiliary head, coarse to fine, its logits are upsampled to ``H x W`` (bilinear,
    ``align_corners=False``) and ``AS_{i+1} = TF(AS_i)`` on their tree (weights
    ``exp(-|d logits|^2 / sigma_high)``). With ``AS`` the last of these,

        L = sum over unlabelled pixels p of sum_k |probs[k, p] - AS[k, p]|  /  #unlabelled,

    i.e. the L1 distance summed over classes and averaged over unlabelled pixels of the whole
    batch, as in the reference; 0 when no pixel is unlabelled. ``AS`` is not detached:
    gradient reaches ``probs`` both directly and through the filters, and the auxiliary
    heads through the high-level edge weights. When ``probs`` sums to 1 over classes (to
    1e-4), the filters normalise by the channel sum (``simplex=True``), which saves a
    channel; the gradient with respect to ``probs`` then differs from the general one only
    by per-pixel constants over classes, which vanish through the softmax.

    Parameters
    ----------
    probs : Tensor
        ``(B, K, H, W)`` softmax of the main output.
    image : Tensor
        ``(B, C, H, W)`` input image (guide of the low-level tree; no gradient expected).
    aux_logits : sequence of Tensor
        Each ``(B, K', h, w)``, the auxiliary heads' logits, coarse to fine; may be empty.
    label : Tensor
        ``(B, H, W)`` integer labels; pixels equal to ``unlabelled`` enter the loss.
    unlabelled : int
        Label value of unlabelled pixels (``num_classes`` in this project).
    sigma_low : float
        Scale of the image tree's weights.
    sigma_high : float
        Scale of the auxiliary trees' weights.
    backend : {"torch", "scipy"}
        Tree filter implementation, see :func:`losses.tree_filter.tree_filter`.
    gray_as_rgb : bool
        Build the image tree of a 1-channel image as if the image were repeated to 3 channels,
        as the reference does for FAZ (edge weights ``exp(-3 |dI|^2 / sigma_low)``; the tree
        itself is the same). Images with other channel counts are used as given.

    Returns
    -------
    Tensor
        Scalar loss, dtype of ``probs``.

    Raises
    ------
    ValueError
        On mismatched shapes.
    """
    _check_inputs(probs, image, aux_logits, label)
    height, width = probs.shape[2:]
    # Probabilities stay on the simplex under a normalised filter: the filter can then skip
    # its channel of ones (see tree_filter's ``simplex``; same values and, through the
    # softmax, same gradients).
    simplex = bool(((probs.detach().sum(1) - 1).abs() <= _SIMPLEX_TOLERANCE).all())
    guide = low_level_guide(image, gray_as_rgb)
    filtered = tree_filter(probs, guide, sigma_low, IMAGE_COST_OFFSET, backend, simplex)
    for logits in aux_logits:
        if logits.shape[2:] != (height, width):
            logits = F.interpolate(logits, size=(height, width), mode="bilinear", align_corners=False)
        filtered = tree_filter(filtered, logits, sigma_high, backend=backend, simplex=simplex)
    mask = (label == unlabelled).to(probs.dtype)
    distance = (probs - filtered).abs().sum(dim=1)
    return (distance * mask).sum() / mask.sum().clamp(min=1.0)


def low_level_guide(image: Tensor, gray_as_rgb: bool = False) -> Tensor:
    """Guide of the image tree.

    Parameters
    ----------
    image : Tensor
        ``(B, C, H, W)`` input image.
    gray_as_rgb : bool
        Repeat a 1-channel image to 3 channels (the reference feeds FAZ images to the tree
        energy loss as ``image.repeat(1, 3, 1, 1)``), which triples every squared intensity
        difference of the MST edge costs.

    Returns
    -------
    Tensor
        ``(B, 3, H, W)`` when ``gray_as_rgb`` and ``C == 1``, else ``image`` itself.
    """
    if gray_as_rgb and image.dim() == 4 and image.shape[1] == 1:
        return image.repeat(1, 3, 1, 1)
    return image


class MultiscaleTreeEnergyLoss(nn.Module):
    """Module form of :func:`multiscale_tree_energy_loss`.

    Parameters
    ----------
    sigma_low : float
        Scale of the image tree's weights.
    sigma_high : float
        Scale of the auxiliary trees' weights.
    backend : {"torch", "scipy"}
        Tree filter implementation.
    gray_as_rgb : bool
        Image tree of 1-channel images as if repeated to 3 channels (see
        :func:`low_level_guide`).
    """

    def __init__(self, sigma_low: float = 0.02, sigma_high: float = 1.0, backend: str = "torch",
                 gray_as_rgb: bool = False) -> None:
        super().__init__()
        self.sigma_low = sigma_low
        self.sigma_high = sigma_high
        self.backend = backend
        self.gray_as_rgb = gray_as_rgb

    def forward(
        self, probs: Tensor, image: Tensor, aux_logits: Sequence[Tensor], label: Tensor, unlabelled: int
    ) -> Tensor:
        """See :func:`multiscale_tree_energy_loss` for the shapes."""
        return multiscale_tree_energy_loss(
            probs, image, aux_logits, label, unlabelled, self.sigma_low, self.sigma_high, self.backend,
            self.gray_as_rgb,
        )

    def extra_repr(self) -> str:
        return (f"sigma_low={self.sigma_low}, sigma_high={self.sigma_high}, backend={self.backend!r}, "
                f"gray_as_rgb={self.gray_as_rgb}")


def _check_inputs(probs: Tensor, image: Tensor, aux_logits: Sequence[Tensor], label: Tensor) -> None:
    if probs.dim() != 4:
        raise ValueError(f"probs must be (B, K, H, W), got {tuple(probs.shape)}")
    batch, _, height, width = probs.shape
    if image.dim() != 4 or image.shape[0] != batch or image.shape[2:] != probs.shape[2:]:
        raise ValueError(f"image must be (B, C, H, W) = ({batch}, C, {height}, {width}), got {tuple(image.shape)}")
    if label.shape != (batch, height, width):
        raise ValueError(f"label must be (B, H, W) = ({batch}, {height}, {width}), got {tuple(label.shape)}")
    if label.is_floating_point():
        raise ValueError(f"label must be an integer tensor, got {label.dtype}")
    for i, logits in enumerate(aux_logits):
        if logits.dim() != 4 or logits.shape[0] != batch:
            raise ValueError(f"aux_logits[{i}] must be (B, K, h, w) with B = {batch}, got {tuple(logits.shape)}")
    if not torch.is_floating_point(image):
        raise ValueError(f"image must be floating point, got {image.dtype}")
