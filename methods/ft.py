"""FT: FedAvg for every round, then each site fine-tunes the final global model on its own data.

FedAvg followed by local fine-tuning (Wang et al., "Federated evaluation of on-device
personalization", arXiv:1910.10252, 2019), the ``FT`` row of the FedICRA comparison (Lin et
al., MLMI 2023). The server half is :class:`FedAvgFineTune`, the site half
:class:`FineTuneRule`.

What is shared and what stays local
-----------------------------------
Rounds ``1 .. rounds`` are FedAvg: every parameter group is shared and averaged, weighted by
training samples. After the last round the server sends one more train message, round
``rounds + 1`` with ``fine-tune = True`` in its config (:data:`FINE_TUNE`) and nothing in the
shared set: each site loads the final global model (every array the message carries), trains
``ft_iters`` iterations on its own weak labels, validates on its own validation split and keeps
its best fine-tuned model as ``client<k>/best.pt``. The replies carry no arrays and nothing is
aggregated: ``global/latest.pt`` stays the aggregate of round ``rounds``. The method deploys
the fine-tuned personal models.

The site
--------
Rounds ``1 .. rounds`` are FedAvg's: load the shared arrays, train ``iters`` steps on
everything. Round ``rounds + 1`` is the fine-tuning (the site knows it from the round number):
the site loads the whole final global model, trains ``ft_iters`` steps on its own weak labels
with the run's objective, validates on its own validation split every ``iters * eval_every``
steps (the cadence of the federated rounds, in steps) and at the end, and keeps the best of
these fine-tuned models as ``client<k>/best.pt`` (the models of the FedAvg rounds are no
candidates: the best score is reset when the fine-tuning starts). Nothing goes back to the
server.

Learning rate: the fine-tuning has its own poly decay, ``ft_lr * (1 - k / ft_iters) ** 0.9``
at its step ``k`` (``ft_lr = 0``: ``base_lr``). The run's schedule has decayed to 0 by then
(``clients/trainer.py`` decays over ``rounds * iters`` steps), so continuing it would not
train at all. The step counter, the per-step seeds and the TensorBoard steps go on from the
last federated step.
"""
from __future__ import annotations

from configs.round_keys import SHARE_EXCLUDE, SHARE_INCLUDE
import contextlib
import dataclasses
import logging
from dataclasses import dataclass
from typing import Dict, Iterable, Iterator, List, Mapping, Optional, Tuple

import numpy as np

from clients.evaluation import validate
from clients.rules.base import LocalRule, load_whole_model
from clients.trainer import poly_lr
from networks.checkpoint import run_meta, save_atomic
from strategies.base import PersonalizedStrategy
from strategies.flower import ArrayRecord, Message, MetricRecord

from .registry import Method, MethodParams, register_method

log = logging.getLogger("fedicra.server")

#: Round-configuration key: True in the fine-tuning round ``rounds + 1``.
FINE_TUNE = "fine-tune"


@dataclass
class FTParams(MethodParams):
    """FT's hyper-parameters (see :class:`FedAvgFineTune` for the choice of the defaults)."""

    ft_iters: int = 200  # fine-tuning iterations per site after the last round (the FedLPPA authors' fine-tuning script)
    ft_lr: float = 0.001  # initial lr of the fine-tuning's own poly decay (0: base_lr; a tenth of the reference's base_lr)

    def checks(self, cfg) -> Iterable[Tuple[bool, str]]:
        return [(self.ft_iters >= 0, "ft_iters must be >= 0"),
                (self.ft_lr >= 0.0, f"ft_lr = {self.ft_lr!r} must be >= 0 (0: base_lr)")]


def refuses(cfg) -> Optional[Tuple[str, str]]:
    """``(key, reason)`` when ``cfg`` cannot run FT (pre-flight), else None."""
    if cfg.params.ft_iters < 1:
        return "ft_iters", (f"{cfg.params.ft_iters}: FT fine-tunes every site after the last "
                            "round and needs ft_iters >= 1 (for no fine-tuning run --strategy "
                            "FedAvg)")
    return None


# ====================================================================== server
class FedAvgFineTune(PersonalizedStrategy):
    """FedAvg, then one fine-tuning round in which every site adapts the final global model.

    Defaults: the plain U-Net with pCE as FedAvg; ``ft_iters = 200`` local iterations of
    fine-tuning (the number of the FedLPPA authors' fine-tuning script, 20 rounds' worth of
    local steps at ``iters = 10``) starting at ``ft_lr = 0.001`` (a tenth of the reference's
    ``base_lr``) with its own poly decay. ``metrics.csv`` gets one more round of rows
    (``rounds + 1``) for the fine-tuning.

    Lost sites: a site missing from a FedAvg round is handled as in every method (the round
    goes on with ``min_fit_clients``); a site missing from the fine-tuning round keeps its
    personal model of the FedAvg rounds (its row is marked missing). The fine-tuning round's
    deadline is ``ft_iters / iters`` times a round's (:meth:`deadline_scale`).
    """

    @property
    def fine_tune_round(self) -> int:
        """The round number of the fine-tuning message (one past the last FedAvg round)."""
        return self.cfg.rounds + 1

    def summary(self) -> None:
        super().summary()
        log.info("strategy FT: after round %d every site fine-tunes the final global model for "
                 "%d iterations (round %d, nothing aggregated)", self.cfg.rounds,
                 self.params.ft_iters, self.fine_tune_round)

    def deadline_scale(self, server_round: int) -> float:
        if server_round == self.fine_tune_round:
            return max(1.0, self.params.ft_iters / max(1, self.cfg.iters))
        return 1.0

    def round_config(self, server_round: int) -> Dict[str, object]:
        if server_round == self.fine_tune_round:
            # nothing shared: the site sends no arrays back (FineTuneRule loads every array it
            # receives, the whole global model)
            return {FINE_TUNE: True, SHARE_INCLUDE: "", SHARE_EXCLUDE: ""}
        return {FINE_TUNE: False}

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> Tuple[Optional[ArrayRecord], Optional[MetricRecord]]:
        if server_round != self.fine_tune_round:
            return super().aggregate_train(server_round, replies)
        contents = self._valid(server_round, replies, "fine-tuning")
        metrics = [dict(c["metrics"]) for c in contents]
        for m in metrics:
            if m.get("diverged"):
                log.warning("fine-tuning: client %d diverged and kept its state before the "
                            "fine-tuning", int(m.get("cid", -1)))
        fine = [m for m in metrics if not m.get("diverged")]
        summary: Dict[str, float] = {"num-examples": float(sum(m.get("num-examples", 0.0)
                                                               for m in metrics))}
        for key in ("total", "val_dice", "best_val_dice"):
            values = [float(m[key]) for m in fine if key in m]
            if values:
                summary[key] = float(np.mean(values))
        self._record_fine_tuning(server_round, metrics, summary)
        # None: Flower keeps the last aggregate, which the evaluate phase then receives
        return None, MetricRecord(summary)

    def _record_fine_tuning(self, server_round: int, metrics, summary: Dict[str, float]) -> None:
        """metrics.csv rows and TensorBoard scalars of the fine-tuning round; unlike a FedAvg
        round no global checkpoint is written (the global model did not change)."""
        if self.reporter is None:
            return
        self.reporter.write_rows(server_round, metrics, self.missing_clients(metrics))
        for key, value in summary.items():
            if key != "num-examples":
                self.reporter.writer.add_scalar(f"server/fine_tune_{key}", value, server_round)
        self.reporter.writer.flush()
        val = summary.get("val_dice")
        log.info("fine-tuning (round %d) | clients %d/%d | train loss %.4f | val dice %s",
                 server_round, len(metrics), self.cfg.num_clients,
                 summary.get("total", float("nan")), "-" if val is None else f"{val:.4f}")


# ====================================================================== site
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
        steps = self.params.ft_iters
        if steps < 1:
            raise ValueError(f"FT: ft_iters = {steps}; the fine-tuning round needs ft_iters >= 1")
        # the deployed model is the best *fine-tuned* one: forget the FedAvg rounds' best
        trainer.best_val = -1.0
        every = self.cfg.iters * self.cfg.eval_every
        parts: List[tuple] = []
        done = 0
        with own_poly_schedule(trainer, self.params.ft_lr or self.cfg.base_lr, steps):
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


FT = register_method(Method(
    name="FT", server=FedAvgFineTune, site=FineTuneRule, params=FTParams,
    model="unet", procedure="pce", deploys="personal",
    fine_tunes=True,  # read by the pre-flight checks: only this method takes ft_iters > 0
    extra_rounds=1,  # the fine-tuning round
    refuses=refuses, round_keys=(FINE_TUNE,),
    summary="FedAvg, then every site fine-tunes the final global model"))
