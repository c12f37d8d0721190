"""Pure aggregation rules on dicts of NumPy arrays (no Flower types)."""
from __future__ import annotations

from typing import Dict, List, Mapping, Sequence

import numpy as np

Arrays = Mapping[str, np.ndarray]


def weighted_mean(arrays: Sequence[Arrays], weights: Sequence[float]) -> Dict[str, np.ndarray]:
    """Key-wise mean of ``arrays`` weighted by ``weights`` (e.g. training sample counts).

    Accumulates in float64; integer arrays (BatchNorm's ``num_batches_tracked``) are rounded
    back to their dtype. Every reply must carry the same keys and shapes.
    """
    if not arrays:
        raise ValueError("weighted_mean needs at least one set of arrays")
    if len(arrays) != len(weights):
        raise ValueError(f"{len(arrays)} array sets but {len(weights)} weights")
    w = np.asarray(weights, dtype=np.float64)
    if np.any(w < 0) or w.sum() <= 0:
        raise ValueError(f"weights must be non-negative with a positive sum, got {list(weights)}")
    w = w / w.sum()
    keys = list(arrays[0])
    for i, a in enumerate(arrays[1:], start=1):
        if list(a) != keys:
            raise ValueError(f"reply {i} carries keys {sorted(set(a) ^ set(keys))} that differ from reply 0")
    out: Dict[str, np.ndarray] = {}
    for key in keys:
        first = np.asarray(arrays[0][key])
        acc = np.zeros(first.shape, dtype=np.float64)
        for wi, a in zip(w, arrays):
            value = np.asarray(a[key])
            if value.shape != first.shape:
                raise ValueError(f"array {key!r}: shapes {value.shape} and {first.shape} differ")
            acc += wi * value
        out[key] = np.rint(acc).astype(first.dtype) if np.issubdtype(first.dtype, np.integer) \
            else acc.astype(first.dtype)
    return out


def mean_metrics(metrics: Sequence[Mapping[str, float]], weights: Sequence[float]) -> Dict[str, float]:
    """Weighted mean of every metric present in all replies."""
    keys: List[str] = sorted(set.intersection(*(set(m) for m in metrics))) if metrics else []
    total = float(sum(weights)) or 1.0
    return {k: float(sum(w * float(m[k]) for w, m in zip(weights, metrics)) / total) for k in keys}
