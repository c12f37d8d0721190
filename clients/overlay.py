"""Overlay pictures of a segmentation: the image in grey, the prediction tinted per class and
the ground truth drawn as a contour, for TensorBoard and the test script's PNGs."""
from __future__ import annotations

from typing import Optional

import numpy as np

#: Tint of each predicted class (index = label; 0 = background is not drawn).
CLASS_COLOURS = np.array([[0, 0, 0], [255, 64, 64], [64, 160, 255], [255, 200, 0]], dtype=np.float32)
#: Colour of the ground-truth contour.
CONTOUR_COLOUR = np.array([0, 255, 0], dtype=np.uint8)


def contour(mask: np.ndarray) -> np.ndarray:
    """Boolean map of the pixels of ``mask`` (H, W) with a 4-neighbour outside it."""
    mask = np.asarray(mask, dtype=bool)
    inner = mask.copy()
    inner[1:, :] &= mask[:-1, :]
    inner[:-1, :] &= mask[1:, :]
    inner[:, 1:] &= mask[:, :-1]
    inner[:, :-1] &= mask[:, 1:]
    return mask & ~inner


def overlay(image: np.ndarray, pred: np.ndarray, truth: Optional[np.ndarray],
            num_classes: int) -> np.ndarray:
    """RGB uint8 picture (H, W, 3).

    Parameters
    ----------
    image : ndarray
        (H, W) or (C, H, W) in [0, 1]; channels are averaged to grey.
    pred : ndarray
        (H, W) predicted labels; each class >= 1 tints its pixels half-way to its colour.
    truth : ndarray or None
        (H, W) ground-truth labels; the contour of every class >= 1 (and of the union of
        classes >= 1, e.g. the optic disc) is drawn in green. Values >= ``num_classes``
        (unlabelled) are ignored.
    num_classes : int
        Number of classes, background included.
    """
    grey = image.mean(axis=0) if image.ndim == 3 else image
    if grey.shape != pred.shape:
        raise ValueError(f"image {grey.shape} and prediction {pred.shape} differ in size")
    rgb = np.repeat((np.clip(grey, 0, 1) * 255).astype(np.float32)[..., None], 3, axis=2)
    for c in range(1, num_classes):
        m = pred == c
        rgb[m] = 0.5 * rgb[m] + 0.5 * CLASS_COLOURS[c % len(CLASS_COLOURS)]
    out = rgb.astype(np.uint8)
    if truth is not None:
        truth = np.where(truth >= num_classes, 0, truth)
        edges = contour(truth >= 1)
        for c in range(1, num_classes):
            edges |= contour(truth == c)
        out[edges] = CONTOUR_COLOUR
    return out
