"""Training augmentation of DESIGN.md section 5, on NumPy arrays.

Two independent steps, each applied with probability 0.5:

1. rot90 by ``k`` in 0..3 quarter turns, then a flip along a random spatial axis;
2. rotation by an angle drawn uniformly from [-45, 45] degrees (no reshape): the image is
   resampled with linear interpolation (order 1) and filled with 0 outside, label maps with
   nearest neighbour (order 0) and filled with the unlabelled value.

Every random draw comes from the ``np.random.Generator`` passed in, so a seeded generator
gives the same transform every time. All label maps of one sample (weak label and full mask)
get the same transform as the image.
"""
from __future__ import annotations

from typing import Sequence, Tuple

import numpy as np
from scipy import ndimage

#: Largest rotation angle in degrees.
MAX_ANGLE = 45.0


def rot_flip(
    image: np.ndarray, labels: Sequence[np.ndarray], k: int, axis: int
) -> Tuple[np.ndarray, Tuple[np.ndarray, ...]]:
    """Rotate by ``k`` quarter turns, then flip along spatial ``axis`` (0 = rows, 1 = columns).

    Parameters
    ----------
    image : ndarray, shape (C, H, W)
    labels : sequence of ndarray, each (H, W)
    k : int
        Number of counter-clockwise quarter turns.
    axis : int
        Spatial axis to flip (0 or 1).
    """
    image = np.flip(np.rot90(image, k, axes=(1, 2)), axis=axis + 1)
    out = tuple(np.flip(np.rot90(lab, k, axes=(0, 1)), axis=axis) for lab in labels)
    return image, out


def rotate(
    image: np.ndarray,
    labels: Sequence[np.ndarray],
    angle: float,
    fill_label: int,
    image_order: int = 1,
) -> Tuple[np.ndarray, Tuple[np.ndarray, ...]]:
    """Rotate about the centre by ``angle`` degrees, keeping the shape.

    Parameters
    ----------
    image : ndarray, shape (C, H, W)
    labels : sequence of ndarray, each (H, W)
    angle : float
        Degrees, counter-clockwise.
    fill_label : int
        Value given to label pixels that come from outside the original image.
    image_order : int
        Spline order for the image (1 = bilinear; 0 = nearest, used by tests).
    """
    image = ndimage.rotate(image, angle, axes=(2, 1), reshape=False, order=image_order,
                           mode="constant", cval=0.0)
    out = tuple(
        ndimage.rotate(lab, angle, axes=(1, 0), reshape=False, order=0,
                       mode="constant", cval=fill_label)
        for lab in labels
    )
    return image, out


def random_augment(
    image: np.ndarray,
    labels: Sequence[np.ndarray],
    rng: np.random.Generator,
    fill_label: int,
    image_order: int = 1,
) -> Tuple[np.ndarray, Tuple[np.ndarray, ...]]:
    """Apply the random rot90/flip and rotation steps of the training schedule.

    Parameters
    ----------
    image : ndarray, shape (C, H, W), float
    labels : sequence of ndarray, each (H, W), integer
        Weak label, full mask, ...: all transformed identically.
    rng : numpy.random.Generator
        Source of every random draw.
    fill_label : int
        Label value for pixels rotated in from outside (the task's unlabelled value).
    image_order : int
        Interpolation order for the image in the free rotation (1 by default).

    Returns
    -------
    image, labels
        Contiguous arrays with the input dtypes and shapes.
    """
    if image.ndim != 3:
        raise ValueError(f"expected a (C, H, W) image, got shape {image.shape}")
    for lab in labels:
        if lab.shape != image.shape[1:]:
            raise ValueError(f"label shape {lab.shape} does not match image shape {image.shape}")
    labels = tuple(labels)
    if rng.random() < 0.5:
        k = int(rng.integers(0, 4))
        axis = int(rng.integers(0, 2))
        image, labels = rot_flip(image, labels, k, axis)
    if rng.random() < 0.5:
        angle = float(rng.uniform(-MAX_ANGLE, MAX_ANGLE))
        image, labels = rotate(image, labels, angle, fill_label, image_order)
    return (np.ascontiguousarray(image),
            tuple(np.ascontiguousarray(lab) for lab in labels))
