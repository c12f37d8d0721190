"""Test-time segmentation metrics of one binary structure, computed with medpy.

Policy for empty maps (no fake objects are ever drawn):

- prediction and ground truth both empty: Dice = Jaccard = 1, HD95 = ASSD = 0;
- exactly one of them empty: Dice = Jaccard = 0 and HD95 = ASSD = NaN (undefined); the test
  report counts such cases in ``hd95_undefined`` and averages distances over defined cases.
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Sequence

import numpy as np
from medpy.metric import binary

METRIC_NAMES = ("dice", "jaccard", "hd95", "assd", "sensitivity", "specificity", "precision")


def _ratio(num: float, den: float) -> float:
    return float(num / den) if den > 0 else float("nan")


def binary_metrics(pred: np.ndarray, truth: np.ndarray,
                   spacing: Optional[Sequence[float]] = None) -> Dict[str, float]:
    """All of :data:`METRIC_NAMES` for boolean maps ``pred`` and ``truth`` of equal shape."""
    pred = np.asarray(pred, dtype=bool)
    truth = np.asarray(truth, dtype=bool)
    if pred.shape != truth.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from ground truth {truth.shape}")
    tp = float(np.logical_and(pred, truth).sum())
    fp = float(np.logical_and(pred, ~truth).sum())
    fn = float(np.logical_and(~pred, truth).sum())
    tn = float(np.logical_and(~pred, ~truth).sum())
    out = {
        "sensitivity": _ratio(tp, tp + fn),
        "specificity": _ratio(tn, tn + fp),
        "precision": _ratio(tp, tp + fp),
    }
    if not pred.any() and not truth.any():
        out.update(dice=1.0, jaccard=1.0, hd95=0.0, assd=0.0)
    elif not pred.any() or not truth.any():
        out.update(dice=0.0, jaccard=0.0, hd95=math.nan, assd=math.nan)
    else:
        out.update(dice=float(binary.dc(pred, truth)), jaccard=float(binary.jc(pred, truth)),
                   hd95=float(binary.hd95(pred, truth, voxelspacing=spacing)),
                   assd=float(binary.assd(pred, truth, voxelspacing=spacing)))
    return {k: out[k] for k in METRIC_NAMES}
