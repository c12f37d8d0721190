"""Test-time segmentation metrics of one binary structure, computed with medpy.

Policy for empty maps (no fake objects are ever drawn), so that only distances can be NaN:

- prediction and ground truth both empty: Dice = Jaccard = sensitivity = precision = 1 and
  HD95 = ASSD = 0 (nothing to find, nothing wrongly found);
- exactly one of them empty: Dice = Jaccard = sensitivity = precision = 0 (an empty prediction
  gets precision 0, an empty ground truth sensitivity 0) and HD95 = ASSD = NaN (undefined); the
  test report counts such cases in ``hd95_undefined`` and averages distances over defined cases;
- specificity = TN / (TN + FP), and 1 when the ground truth has no background at all (then no
  false positive is possible).
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Sequence

import numpy as np
from medpy.metric import binary

METRIC_NAMES = ("dice", "jaccard", "hd95", "assd", "sensitivity", "specificity", "precision")


def _ratio(num: float, den: float, empty: float) -> float:
    """``num / den``, or ``empty`` when the denominator's set is empty (``den == 0``)."""
    return float(num / den) if den > 0 else float(empty)


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
    both_empty = not pred.any() and not truth.any()
    out = {  # an empty denominator: 1 if both maps are empty, else 0 (module docstring)
        "sensitivity": _ratio(tp, tp + fn, empty=float(both_empty)),
        "specificity": _ratio(tn, tn + fp, empty=1.0),
        "precision": _ratio(tp, tp + fp, empty=float(both_empty)),
    }
    if both_empty:
        out.update(dice=1.0, jaccard=1.0, hd95=0.0, assd=0.0)
    elif not pred.any() or not truth.any():
        out.update(dice=0.0, jaccard=0.0, hd95=math.nan, assd=math.nan)
    else:
        out.update(dice=float(binary.dc(pred, truth)), jaccard=float(binary.jc(pred, truth)),
                   hd95=float(binary.hd95(pred, truth, voxelspacing=spacing)),
                   assd=float(binary.assd(pred, truth, voxelspacing=spacing)))
    return {k: out[k] for k in METRIC_NAMES}
