"""Soft Dice loss restricted to labelled pixels (the Dice of FedLC's calibration head on
sparse labels)."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def partial_dice_loss(logits: Tensor, label: Tensor, ignore_index: int, smooth: float = 1e-5
                      ) -> Tensor:
    """``1 - Dice`` of the softmax of ``logits`` and the one-hot ``label``, averaged over classes,
    over the labelled pixels of the whole batch.

    For class c with probabilities q_c and indicator y_c over the labelled pixels L:
    ``dice_c = (2 * sum_L q_c y_c + s) / (sum_L q_c + sum_L y_c + s)`` (the smoothed soft Dice of
    FedLC's ``dice_loss``). With full masks (no pixel equal to ``ignore_index``) this is the
    ordinary soft Dice loss. No labelled pixel: 0, attached to ``logits``.

    Parameters
    ----------
    logits:
        (B, C, H, W).
    label:
        (B, H, W) integers in [0, C - 1] or ``ignore_index``.
    ignore_index:
        Value of unlabelled pixels (the number of classes in this project).
    smooth:
        s, keeps empty classes finite.
    """
    if logits.dim() != 4 or label.shape != (logits.shape[0],) + tuple(logits.shape[2:]):
        raise ValueError(f"logits (B, C, H, W) and label (B, H, W) expected, got "
                         f"{tuple(logits.shape)} and {tuple(label.shape)}")
    classes = logits.shape[1]
    probs = logits.float().softmax(dim=1)
    labelled = label != ignore_index
    if not bool(labelled.any()):
        return logits.sum() * 0.0
    onehot = F.one_hot(label.clamp(0, classes - 1).long(), classes).permute(0, 3, 1, 2).float()
    weight = labelled[:, None].float()
    q = probs * weight
    y = onehot * weight
    inter = (q * y).sum(dim=(0, 2, 3))
    dice = (2.0 * inter + smooth) / (q.sum(dim=(0, 2, 3)) + y.sum(dim=(0, 2, 3)) + smooth)
    return (1.0 - dice).mean()
