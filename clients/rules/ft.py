"""FT local rule: FedAvg rounds, then local fine-tuning of the final global model.

FedAvg followed by local fine-tuning (Wang et al., arXiv:1910.10252, 2019), the ``FT``
baseline of FedICRA (Lin et al., MLMI 2023); the server side is ``strategies/ft.py``.

Rounds ``1 .. rounds`` are FedAvg's: load the shared arrays, train ``iters`` steps on
everything. Round ``rounds + 1`` is the fine-tuning: the site loads the whole final global
model, trains ``ft_iters`` steps on its own weak labels with the run's objective, validates on
its own validation split every ``iters * eval_every`` steps (the cadence of the federated
rounds, in steps) and at the end, and keeps the best of these fine-tuned models as
``client<k>/best.pt`` (the models of the FedAvg rounds are no candidates: the best score is
reset when the fine-tuning starts). Nothing goes back to the server.

Learning rate: the fine-tuning has its own poly decay, ``ft_lr * (1 - k / ft_iters) ** 0.9``
at its step ``k`` (``ft_lr = 0``: ``base_lr``). The run's schedule has decayed to 0 by then
(``clients/trainer.py`` decays over ``rounds * iters`` steps), so continuing it would not
train at all. The step counter, the per-step seeds and the TensorBoard steps go on from the
last federated step.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Dict, Iterator, List, Mapping

import numpy as np

from networks.checkpoint import run_meta, save_atomic

from ..evaluation import validate
from ..registry import register_rule
from ..trainer import poly_lr
from .base import LocalRule, load_whole_model


@contextlib.contextmanager
def own_poly_schedule(trainer, lr: float, steps: int) -> Iterator[None]:
    """Make ``trainer.run_iterations`` follow ``lr * (1 - k / steps) ** 0.9`` for its next
    ``steps`` steps ``k = 0 .. steps - 1``, keeping the trainer's step counter running.

    The trainer's rate is ``poly_lr(cfg.base_lr, step, total_steps)``; with
    ``total_steps = step0 + steps`` it is ``base_lr * c * (1 - k / steps) ** 0.9`` where
    ``c = poly_lr(1, step0, step0 + steps)``, so ``base_lr = lr / c`` gives the wanted
    schedule. Both are restored afterwards.
    """
    start = trainer.step
    total = start + steps
    scale = poly_lr(1.0, start, total)
    saved_cfg, saved_total = trainer.cfg, trainer.total_steps
    trainer.cfg = dataclasses.replace(saved_cfg, base_lr=lr / scale)
    trainer.total_steps = total
    try:
        yield
    finally:
        trainer.cfg, trainer.total_steps = saved_cfg, saved_total


def step_weighted(parts: List[tuple]) -> Dict[str, float]:
    """Mean of every metric over ``(steps, metrics)`` parts weighted by steps; ``lr`` is the
    last part's."""
    total = sum(n for n, _ in parts)
    merged: Dict[str, float] = {}
    for n, metrics in parts:
        for key, value in metrics.items():
            if key != "lr":
                merged[key] = merged.get(key, 0.0) + float(value) * n / total
    merged["lr"] = parts[-1][1]["lr"]
    return merged


@register_rule("FT")
class FineTuneRule(LocalRule):
    """FedAvg's rule for the federated rounds; fine-tuning in round ``rounds + 1``."""

    def is_fine_tuning(self, server_round: int) -> bool:
        if server_round > self.cfg.rounds + 1:
            raise ValueError(f"FT: round {server_round} requested, but the run has {self.cfg.rounds} "
                             f"rounds and fine-tunes in round {self.cfg.rounds + 1}")
        return server_round == self.cfg.rounds + 1

    def receive(self, trainer, arrays: Mapping[str, np.ndarray], shared: List[str],
                server_round: int) -> None:
        if not self.is_fine_tuning(server_round):
            return super().receive(trainer, arrays, shared, server_round)
        load_whole_model(trainer, arrays, "FT: the fine-tuning round", "global model")

    def local_train(self, trainer, server_round: int) -> Dict[str, float]:
        if not self.is_fine_tuning(server_round):
            return super().local_train(trainer, server_round)
        steps = self.cfg.ft_iters
        if steps < 1:
            raise ValueError(f"FT: ft_iters = {steps}; the fine-tuning round needs ft_iters >= 1")
        # the deployed model is the best *fine-tuned* one: forget the FedAvg rounds' best
        trainer.best_val = -1.0
        every = self.cfg.iters * self.cfg.eval_every
        parts: List[tuple] = []
        done = 0
        with own_poly_schedule(trainer, self.cfg.ft_lr or self.cfg.base_lr, steps):
            while done < steps:
                n = min(every, steps - done)
                metrics = trainer.run_iterations(n, lambda name: True)
                parts.append((n, metrics))
                done += n
                if trainer.divergence(metrics):
                    break  # the trainer rejects the round; keep no non-finite checkpoint
                if done < steps:  # the end is validated by the trainer after the round
                    self.validate_and_keep(trainer, server_round, done)
        return step_weighted(parts)

    def validate_and_keep(self, trainer, server_round: int, done: int) -> float:
        """Validation Dice of the model after ``done`` fine-tuning steps; saved as
        ``best.pt`` (the trainer's format plus ``ft_step``) when it is the best so far."""
        score, _ = validate(trainer.model, trainer.val_set, trainer.cid, trainer.device,
                            img_size=trainer.cfg.img_size)
        trainer.writer.add_scalar("val/fine_tune_dice", score, trainer.step)
        if score > trainer.best_val:
            trainer.best_val = score
            save_atomic({"model": trainer.model.state_dict(), "round": server_round,
                         "val_dice": score, "cid": trainer.cid, "ft_step": done,
                         "meta": run_meta(trainer.cfg, trainer.cid)},
                        trainer.client_dir / "best.pt")
        return score
