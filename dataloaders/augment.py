"""Training augmentation of DESIGN.md section 5, on NumPy arrays.

Two independent steps, each applied with probability 0.5:

1. rot90 by ``k`` in 0..3 quarter turns, then a flip along a random spatial axis;
2. rotation by an integer angle drawn uniformly from -45..44 degrees (``randint(-45, 45)``
   of the reference, high end exclusive), without reshape. The image is resampled with
   spline order ``image_order`` and pixels that come from outside get ``image_fill``; label
   maps always use nearest neighbour (order 0) and the unlabelled value as fill.

The reference code (``dataloaders/dataset.py``, ``random_rotate``) samples the image with
nearest neighbour (order 0) and fills FAZ images with 0.8 and fundus images with 0; those are
the defaults the trainer passes (``Task.rotate_fill``, run keys ``rotate_order`` and
``rotate_fill``). A fill of 0 on an OCTA image would look like the dark avascular zone to the
gated CRF and the tree energy terms; 0.8 does not.

Every random draw comes from the ``np.random.Generator`` passed in, so a seeded generator
gives the same transform every time. All label maps of one sample (weak label and full mask)
get the same transform as the image.
"""
from __future__ import annotations

from typing import Sequence, Tuple

import numpy as np
from scipy import ndimage

#: Rotation angles are integers in ``-MAX_ANGLE .. MAX_ANGLE - 1`` degrees (as the reference's
#: ``np.random.randint(-45, 45)``).
MAX_ANGLE = 45
#: Spline orders accepted for the image in the free rotation.
IMAGE_ORDERS = (0, 1, 2, 3, 4, 5)


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
    image_order: int = 0,
    image_fill: float = 0.0,
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
        Spline order for the image (0 = nearest, the reference; 1 = bilinear).
    image_fill : float
        Value given to image pixels that come from outside the original image (every channel).

    Returns
    -------
    image : ndarray, shape (C, H, W)
    labels : tuple of ndarray, each (H, W)
    """
    _check_order(image_order)
    image = ndimage.rotate(image, angle, axes=(2, 1), reshape=False, order=image_order,
                           mode="constant", cval=float(image_fill))
    out = tuple(
        ndimage.rotate(lab, angle, axes=(1, 0), reshape=False, order=0,
                       mode="constant", cval=fill_label)
        for lab in labels
    )
    return image, out


def random_angle(rng: np.random.Generator) -> int:
    """Integer rotation angle in degrees, uniform on ``-MAX_ANGLE .. MAX_ANGLE - 1``."""
    return int(rng.integers(-MAX_ANGLE, MAX_ANGLE))


def _check_order(order: int) -> None:
    if isinstance(order, bool) or order not in IMAGE_ORDERS:
        raise ValueError(f"image_order must be one of {IMAGE_ORDERS}, got {order!r}")


def random_augment(
    image: np.ndarray,
    labels: Sequence[np.ndarray],
    rng: np.random.Generator,
    fill_label: int,
    image_order: int = 0,
    image_fill: float = 0.0,
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
        Spline order for the image in the free rotation (0, nearest, by default).
    image_fill : float
        Image value for pixels rotated in from outside (``Task.rotate_fill`` in training).

    Returns
    -------
    image, labels
        Contiguous arrays with the input dtypes and shapes.
    """
    _check_order(image_order)
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
        image, labels = rotate(image, labels, random_angle(rng), fill_label, image_order,
                               image_fill)
    return (np.ascontiguousarray(image),
            tuple(np.ascontiguousarray(lab) for lab in labels))
