"""Validation metrics computed inside a site (no medpy: cheap enough to run every round)."""
from __future__ import annotations

from typing import Dict, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dataloaders.dataset import SiteDataset
from dataloaders.tasks import EvalTarget


def dice(pred: np.ndarray, target: np.ndarray) -> float:
    """Dice of two boolean maps; two empty maps agree perfectly (1.0)."""
    pred, target = pred.astype(bool), target.astype(bool)
    total = pred.sum() + target.sum()
    if total == 0:
        return 1.0
    return float(2.0 * np.logical_and(pred, target).sum() / total)


def target_maps(labels: np.ndarray, targets: Sequence[EvalTarget]) -> Dict[str, np.ndarray]:
    """Boolean map of every scored structure (``disc`` = cup + rim for fundus)."""
    return {t.name: np.isin(labels, t.labels) for t in targets}


@torch.no_grad()
def predict(model: nn.Module, image: torch.Tensor, site: int, img_size: int = 0) -> torch.Tensor:
    """Label map (B, H, W) predicted by ``model`` for images (B, C, H, W).

    With ``img_size`` set, the network sees the images resized to ``img_size`` (as in
    training) and its logits are resized back to (H, W) before the argmax.
    """
    was_training = model.training
    model.eval()
    try:
        size = tuple(image.shape[-2:])
        if img_size and size != (img_size, img_size):
            small = F.interpolate(image, size=(img_size, img_size), mode="bilinear", align_corners=False)
            logits = F.interpolate(model(small, site=site).logits, size=size, mode="bilinear",
                                   align_corners=False)
        else:
            logits = model(image, site=site).logits
        return logits.argmax(dim=1)
    finally:
        model.train(was_training)


def validate(model: nn.Module, dataset: SiteDataset, site: int, device: torch.device,
             batch_size: int = 8, img_size: int = 0) -> Tuple[float, Dict[str, float]]:
    """Mean Dice over cases and targets against each case's full mask (``label`` of the split)."""
    targets = dataset.task.eval_targets
    scores: Dict[str, list] = {t.name: [] for t in targets}
    for start in range(0, len(dataset), batch_size):
        samples = [dataset.sample(i) for i in range(start, min(start + batch_size, len(dataset)))]
        image = torch.stack([s["image"] for s in samples]).to(device)
        pred = predict(model, image, site, img_size).cpu().numpy()
        for p, s in zip(pred, samples):
            truth = (s["mask"] if "mask" in s else s["label"]).numpy()
            predicted = target_maps(p, targets)
            for name, gt in target_maps(truth, targets).items():
                scores[name].append(dice(predicted[name], gt))
    per_target = {name: float(np.mean(v)) for name, v in scores.items()}
    return float(np.mean(list(per_target.values()))), per_target
