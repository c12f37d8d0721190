"""The two terms FedLPPA (Lin et al., IEEE TMI 2024) adds to the weakly supervised objective.

- :func:`prompt_divergence_loss`: the site's fused map under its own distribution prompt is
  pushed away from the maps under the other sites' prompts (weighted by ``alpha``).
- :func:`pseudo_label_dice_loss`: both decoders learn the pseudo-label of a random mixture of
  their predictions (weighted by ``beta``).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

#: Forms of the prompt term (see :func:`prompt_divergence_loss`).
DIVERGENCE_FORMS = ("softmax_kl", "reference")


def _reference_kl(inp: Tensor, target: Tensor) -> Tensor:
    """``torch.nn.KLDivLoss()(inp, target)`` as PyTorch 1.x computed it (the reference's
    version): the mean over every element of ``t * (log t - x)`` where ``t > 0``, 0 elsewhere.
    (Current PyTorch returns NaN for a negative target, and the fused maps have some.)"""
    positive = target > 0
    safe = torch.where(positive, target, torch.ones_like(target))
    return torch.where(positive, target * (safe.log() - inp), torch.zeros_like(inp)).mean()


def _softmax_kl(own: Tensor, other: Tensor) -> Tensor:
    """Mean over batch and pixels of KL(q_own || q_other), q = softmax over channels."""
    log_own = torch.log_softmax(own, dim=1)
    log_other = torch.log_softmax(other, dim=1)
    return (log_own.exp() * (log_own - log_other)).sum(dim=1).mean()


def prompt_divergence_loss(fused: Sequence[Tensor], site: int, form: str = "softmax_kl"
                           ) -> Tensor:
    """``-(1 / (K - 1)) * sum_{k != site} D(f_site, sg(f_k))``: minimising it makes the fused
    map of the own prompt diverge from those of the other sites' prompts (which get no
    gradient).

    Parameters
    ----------
    fused : sequence of Tensor
        K maps (B, C, h, w), the bottleneck fused under each site's distribution prompt.
    site : int
        The own site's index in ``fused``.
    form : {"softmax_kl", "reference"}
        ``softmax_kl``: D is the KL divergence of the per-pixel channel distributions,
        ``KL(softmax(f_site) || softmax(f_k))``. With ``f_k`` fixed it is at most
        ``-log min_c softmax(f_k)_c``, so the term has a minimum. ``reference``: the
        published code's ``KLDivLoss()(f_site, f_k)`` applied to the raw maps (see
        :func:`_reference_kl`); it is linear in ``f_site`` and has no minimum (it lowers
        the own map without bound wherever another site's map is positive).

    Returns
    -------
    Tensor
        Scalar; 0 (attached to the graph) when K = 1.
    """
    if form not in DIVERGENCE_FORMS:
        raise ValueError(f"form must be one of {DIVERGENCE_FORMS}, got {form!r}")
    if not len(fused) or not 0 <= site < len(fused):
        raise ValueError(f"site {site} out of range for {len(fused)} fused maps")
    shape = tuple(fused[site].shape)
    if fused[site].dim() != 4 or any(tuple(f.shape) != shape for f in fused):
        raise ValueError(f"fused maps must share one (B, C, h, w) shape, got "
                         f"{[tuple(f.shape) for f in fused]}")
    own = fused[site]
    if len(fused) == 1:
        return own.sum() * 0.0
    divergence = _softmax_kl if form == "softmax_kl" else _reference_kl
    total = sum(divergence(own, f.detach()) for k, f in enumerate(fused) if k != site)
    return -total / (len(fused) - 1)


def squared_dice_loss(probs: Tensor, label: Tensor, smooth: float = 1e-5) -> Tensor:
    """Soft Dice loss with squared sums, averaged over classes, over the whole batch:
    ``1 - (2 sum p_c y_c + s) / (sum p_c^2 + sum y_c^2 + s)`` for class c (the reference's
    ``pDLoss`` when no pixel is unlabelled).

    Parameters
    ----------
    probs : Tensor
        (B, C, H, W) class probabilities.
    label : Tensor
        (B, H, W) integers in [0, C - 1].
    """
    if probs.dim() != 4 or tuple(label.shape) != (probs.shape[0],) + tuple(probs.shape[2:]):
        raise ValueError(f"probs (B, C, H, W) and label (B, H, W) expected, got "
                         f"{tuple(probs.shape)} and {tuple(label.shape)}")
    classes = probs.shape[1]
    onehot = torch.nn.functional.one_hot(label.long(), classes).permute(0, 3, 1, 2).to(probs.dtype)
    dims = (0, 2, 3)
    inter = (probs * onehot).sum(dim=dims)
    dice = (2.0 * inter + smooth) / ((probs * probs).sum(dim=dims) + onehot.sum(dim=dims) + smooth)
    return (1.0 - dice).mean()


def pseudo_label_dice_loss(main_logits: Tensor, aux_logits: Tensor, mix: float) -> Tensor:
    """Dual-decoder pseudo-label supervision: with ``p``, ``p_aux`` the two softmaxes, the
    pseudo-label ``y = argmax(mix * p + (1 - mix) * p_aux)`` (no gradient) supervises both,
    ``(Dice(p, y) + Dice(p_aux, y)) / 2`` (:func:`squared_dice_loss`).

    Parameters
    ----------
    main_logits, aux_logits : Tensor
        (B, C, H, W) logits of the main and the auxiliary decoder.
    mix : float
        Weight of the main decoder in the pseudo-label, in [0, 1] (drawn uniformly every
        step in FedLPPA).
    """
    if main_logits.shape != aux_logits.shape or main_logits.dim() != 4:
        raise ValueError(f"main and auxiliary logits must share one (B, C, H, W) shape, got "
                         f"{tuple(main_logits.shape)} and {tuple(aux_logits.shape)}")
    if not 0.0 <= mix <= 1.0:
        raise ValueError(f"mix must lie in [0, 1], got {mix}")
    p_main = main_logits.float().softmax(dim=1)
    p_aux = aux_logits.float().softmax(dim=1)
    with torch.no_grad():
        pseudo = (mix * p_main + (1.0 - mix) * p_aux).argmax(dim=1)
    return (squared_dice_loss(p_main, pseudo) + squared_dice_loss(p_aux, pseudo)) / 2.0
