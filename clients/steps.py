"""The training steps that a site's trainer and the centralised trainer share.

:class:`clients.trainer.SiteTrainer` (one site of the federation) and
:class:`clients.centralised.CentralTrainer` (CT-weak / CT-full on the pooled sites) both derive
from :class:`StepTrainer`: the run's objective and optimiser, the step loop (poly learning
rate, batch, seeded forward and objective, backward, optimiser step), the TensorBoard scalars
of the steps, the divergence check and the prediction images. What differs stays with them:
where batches come from, the loss of a batch (the site's forward with ``amp``, the pooled
batch split by site code), which parameters train.
"""
from __future__ import annotations

import math
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, Mapping, Optional, Tuple

import numpy as np
import torch
from torch import Tensor, nn

from losses.objective import ObjectiveConfig

from .evaluation import predict
from .overlay import overlay

if TYPE_CHECKING:
    from configs import RunConfig

#: The loss of one batch: the scalar with graph and the terms to log (floats, or 0-d tensors
#: left on the device and fetched in one transfer after the last step).
LossOf = Callable[[Any], Tuple[Tensor, Dict[str, object]]]


def poly_lr(base_lr: float, step: int, total: int, power: float = 0.9) -> float:
    """``base_lr * (1 - step/total) ** power``, clamped at 0 past the budget."""
    return base_lr * max(0.0, 1.0 - step / max(total, 1)) ** power


def objective_config(cfg: "RunConfig") -> ObjectiveConfig:
    """The objective of run ``cfg``: every field of :class:`ObjectiveConfig` is the run
    configuration's key of the same name (test/test_objective_config.py keeps them equal)."""
    return ObjectiveConfig(**{f.name: getattr(cfg, f.name) for f in fields(ObjectiveConfig)})


class StepTrainer:
    """Base of the trainers: optimiser, step loop, step logging, divergence check, predictions.

    A subclass sets ``cfg``, ``task``, ``model``, ``device``, ``optimizer``, ``step`` and
    ``total_steps`` in its constructor and provides :meth:`next_batch`, :attr:`tb_dir` and
    :attr:`stream_id`.
    """

    cfg: "RunConfig"
    task: Any
    model: nn.Module
    device: torch.device
    optimizer: torch.optim.Optimizer
    step: int
    total_steps: int
    _writer = None
    #: TensorBoard step from which earlier events are hidden (None: none)
    _purge_step: Optional[int] = None

    # ------------------------------------------------------------------ what subclasses give
    @property
    def stream_id(self) -> int:
        """Index of the trainer in the seed of every step (a site's client id)."""
        raise NotImplementedError

    @property
    def tb_dir(self) -> Path:
        """The trainer's TensorBoard folder."""
        raise NotImplementedError

    def next_batch(self) -> Any:
        raise NotImplementedError

    # ------------------------------------------------------------------ optimiser, logging
    def new_optimizer(self) -> torch.optim.Optimizer:
        """AdamW over every parameter with no state (the reference builds one every round)."""
        return torch.optim.AdamW(self.model.parameters(), lr=self.cfg.base_lr,
                                 weight_decay=self.cfg.weight_decay)

    @property
    def writer(self):
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(self.tb_dir), purge_step=self._purge_step)
        return self._writer

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    # ------------------------------------------------------------------ training
    def run_steps(self, n: int, loss_of: LossOf) -> Dict[str, float]:
        """``n`` optimiser steps on ``loss_of(batch)``: the mean of every logged term over the
        steps and the last learning rate (``lr``).

        Step ``k`` (counted over the run) trains at ``poly_lr(base_lr, k, total_steps)`` and
        seeds torch's stream (dropout) after drawing its batch, so that a trainer restored
        from its checkpoint repeats the step. The loop never waits for the device: see
        :meth:`log_steps`.
        """
        steps: list = []  # (step number, lr, terms) per step
        lr = self.cfg.base_lr
        self.model.train()
        for _ in range(n):
            lr = poly_lr(self.cfg.base_lr, self.step, self.total_steps)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            batch = self.next_batch()
            torch.manual_seed(self.cfg.seed * 1_000_003 + self.stream_id * 10_007 + self.step)
            loss, terms = loss_of(batch)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            self.step += 1
            steps.append((self.step, lr, terms))
        metrics = self.log_steps(steps)
        metrics["lr"] = lr
        return metrics

    def log_steps(self, steps: list) -> Dict[str, float]:
        """Fetch the steps' device terms in one transfer, write their TensorBoard scalars and
        return the mean of every term over the steps (summed in step order, as floats)."""
        on_device = [v for _, _, terms in steps for v in terms.values() if isinstance(v, Tensor)]
        fetched = iter(torch.stack([v.double() for v in on_device]).tolist() if on_device else [])
        sums: Dict[str, float] = {}
        for step, lr, terms in steps:
            for key, value in terms.items():
                value = next(fetched) if isinstance(value, Tensor) else value
                sums[key] = sums.get(key, 0.0) + value
                self.writer.add_scalar(f"loss/{key}", value, step)
            self.writer.add_scalar("lr", lr, step)
        return {k: v / max(len(steps), 1) for k, v in sums.items()}

    def divergence(self, metrics: Mapping[str, float]) -> str:
        """Why the result of these steps must not be kept ('' when the metrics and the model
        are finite)."""
        bad_terms = sorted(k for k, v in metrics.items() if not math.isfinite(float(v)))
        if bad_terms:
            return f"non-finite loss terms {', '.join(bad_terms)}"
        bad = [n for n, t in self.model.state_dict().items()
               if t.is_floating_point() and not bool(torch.isfinite(t).all())]
        if bad:
            return f"non-finite model values in {len(bad)} tensors (e.g. {bad[0]})"
        return ""

    # ------------------------------------------------------------------ TensorBoard images
    def log_site_predictions(self, tag: str, dataset, site: int, step: int, count: int) -> None:
        """TensorBoard image ``tag``: the model's prediction under site code ``site`` and the
        truth's contour on the first ``count`` cases of ``dataset``."""
        samples = [dataset.sample(i) for i in range(min(count, len(dataset)))]
        if not samples:
            return
        image = torch.stack([s["image"] for s in samples]).to(self.device)
        pred = predict(self.model, image, site, self.cfg.img_size).cpu().numpy()
        pictures = [overlay(s["image"].numpy(), p, s.get("mask", s["label"]).numpy(),
                            self.task.num_classes) for s, p in zip(samples, pred)]
        self.writer.add_images(tag, np.stack(pictures), step, dataformats="NHWC")
