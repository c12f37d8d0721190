"""FedAP local rule: FedAvg pre-training, one round that measures the BatchNorm inputs, then
plain local training with the BatchNorm layers kept on the site.

Lu et al., "Personalized Federated Learning with Adaptive Batchnorm for Healthcare", IEEE
TBD 2022; the server side (phases, weights, personalised aggregates) is
``strategies/fedap.py``.

Rounds ``1 .. P`` (``P = cfg.fedap_pretrain``): FedAvg's rule. Round ``P + 1``: the site loads
the whole pre-trained model it receives (BatchNorm included, though the round's shared set no
longer holds the ``bn`` group), measures per channel the mean and variance of the input of
every BatchNorm layer over one unaugmented pass of its whole training split with that model in
eval mode (so the running statistics stay as received), and sends them with its update as
``fedap_stats/<layer>/mean`` and ``fedap_stats/<layer>/var``. The moments are exact over all
pixels of all cases (population variance), accumulated in float64 by merging per-batch moments.
The best validated model is reset at that round: the deployed ``best.pt`` comes from rounds
``P + 1 .. rounds``, not from the FedAvg pre-training. Later rounds: load the personalised
non-BN arrays, train as usual.
"""
from __future__ import annotations

from typing import Dict, List, Mapping

import numpy as np
import torch
from torch.nn.modules.batchnorm import _BatchNorm

from ..registry import register_rule
from .base import LocalRule, load_whole_model

STATS_PREFIX = "fedap_stats/"  # the server reads this prefix (strategies/fedap.py)


class MomentAccumulator:
    """Per-channel count, mean and sum of squared deviations of tensors (N, C, ...), merged
    batch by batch in float64 (Chan et al.'s parallel update, stable where mean >> spread)."""

    def __init__(self) -> None:
        self.count = 0
        self.mean = None
        self.m2 = None

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().double().transpose(0, 1).reshape(x.shape[1], -1)  # (C, everything else)
        n = x.shape[1]
        if n == 0:
            return
        mean = x.mean(dim=1)
        m2 = ((x - mean[:, None]) ** 2).sum(dim=1)
        if self.count == 0:
            self.count, self.mean, self.m2 = n, mean, m2
            return
        total = self.count + n
        delta = mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + m2 + delta ** 2 * (self.count * n / total)
        self.count = total

    def moments(self):
        """(mean, population variance) as float64 NumPy arrays."""
        return self.mean.cpu().numpy(), (self.m2 / self.count).cpu().numpy()


def bn_input_statistics(model: torch.nn.Module, batches) -> Dict[str, tuple]:
    """``{BN module name: (mean, var)}`` of the inputs of every BatchNorm layer of ``model``
    over ``batches`` (dicts with ``image``), with the model in eval mode and no gradients."""
    layers = {name: m for name, m in model.named_modules() if isinstance(m, _BatchNorm)}
    if not layers:
        raise ValueError("FedAP: the network has no BatchNorm layer to measure")
    acc = {name: MomentAccumulator() for name in layers}
    hooks = [m.register_forward_pre_hook(lambda mod, args, name=name: acc[name].update(args[0]))
             for name, m in layers.items()]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in batches:
                model(batch["image"])
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    unused = [name for name, a in acc.items() if a.count == 0]
    if unused:
        raise ValueError(f"FedAP: BatchNorm layers {unused[:3]} saw no input in the forward pass")
    return {name: a.moments() for name, a in acc.items()}


@register_rule("FedAP")
class FedAPRule(LocalRule):
    """FedAvg's rule, plus the BatchNorm-input statistics in round ``fedap_pretrain + 1``."""

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        self._stats: Dict[str, np.ndarray] = {}

    def is_collection(self, server_round: int) -> bool:
        return server_round == self.cfg.fedap_pretrain + 1

    def receive(self, trainer, arrays: Mapping[str, np.ndarray], shared: List[str],
                server_round: int) -> None:
        self._stats = {}
        if not self.is_collection(server_round):
            return super().receive(trainer, arrays, shared, server_round)
        load_whole_model(trainer, arrays, f"FedAP: round {server_round}", "pre-trained model")
        stats = bn_input_statistics(trainer.model, trainer.sample_batches(
            1.0, seed=self.cfg.seed * 1000 + trainer.cid))
        for name, (mean, var) in stats.items():
            self._stats[f"{STATS_PREFIX}{name}/mean"] = mean.astype(np.float64)
            self._stats[f"{STATS_PREFIX}{name}/var"] = var.astype(np.float64)
        # the deployed model comes from the FedAP phase, not from the FedAvg pre-training
        trainer.best_val = -1.0

    def extra_reply(self, trainer, server_round: int) -> Dict[str, np.ndarray]:
        stats, self._stats = self._stats, {}
        return stats if self.is_collection(server_round) else {}
