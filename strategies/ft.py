"""FT: FedAvg for every round, then each site fine-tunes the final global model on its own data.

FedAvg followed by local fine-tuning (Wang et al., "Federated evaluation of on-device
personalization", arXiv:1910.10252, 2019), the ``FT`` row of the FedICRA comparison (Lin et
al., MLMI 2023). The local rule is ``clients/rules/ft.py``.

What is shared and what stays local
-----------------------------------
Rounds ``1 .. rounds`` are FedAvg: every parameter group is shared and averaged, weighted by
training samples. After the last round the server sends one more train message, round
``rounds + 1`` with ``fine-tune = True`` in its config and nothing in the shared set: each
site loads the final global model (every array the message carries), trains ``ft_iters``
iterations on its own weak labels, validates on its own validation split and keeps its best
fine-tuned model as ``client<k>/best.pt``. The replies carry no arrays and nothing is
aggregated: ``global/latest.pt`` stays the aggregate of round ``rounds``. The method deploys
the fine-tuned personal models.
"""
from __future__ import annotations

import logging
from typing import Dict, Iterable, Optional, Tuple

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid

from .base import PersonalizedStrategy
from .registry import register_strategy

log = logging.getLogger("fedicra.server")


@register_strategy("FT")
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

    deploys = "personal"
    #: Read by the pre-flight checks: only this method takes ``ft_iters`` > 0.
    fine_tunes = True
    extra_rounds = 1  # the fine-tuning round
    defaults = {"model": "unet", "procedure": "pce", "ft_iters": 200, "ft_lr": 0.001}

    @classmethod
    def refuses(cls, cfg) -> Optional[Tuple[str, str]]:
        """``(key, reason)`` when ``cfg`` cannot run this method (pre-flight), else None."""
        if cfg.ft_iters < 1:
            return "ft_iters", (f"{cfg.ft_iters}: FT fine-tunes every site after the last round "
                                "and needs ft_iters >= 1 (for no fine-tuning run --strategy FedAvg)")
        return None

    @property
    def fine_tune_round(self) -> int:
        """The round number of the fine-tuning message (one past the last FedAvg round)."""
        return self.cfg.rounds + 1

    def summary(self) -> None:
        super().summary()
        log.info("strategy FT: after round %d every site fine-tunes the final global model for "
                 "%d iterations (round %d, nothing aggregated)", self.cfg.rounds,
                 self.cfg.ft_iters, self.fine_tune_round)

    def deadline_scale(self, server_round: int) -> float:
        if server_round == self.fine_tune_round:
            return max(1.0, self.cfg.ft_iters / max(1, self.cfg.iters))
        return 1.0

    def round_config(self, server_round: int) -> Dict[str, object]:
        if server_round == self.fine_tune_round:
            # nothing shared: the site sends no arrays back (clients/rules/ft.py loads every
            # array it receives, the whole global model)
            return {"fine-tune": True, "share-include": "", "share-exclude": ""}
        return {"fine-tune": False}

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

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        # the personalised models are final only after the fine-tuning round
        if server_round < self.fine_tune_round:
            self._sent = 0
            return []
        return super().configure_evaluate(server_round, arrays, config, grid)
