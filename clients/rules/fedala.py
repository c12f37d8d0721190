"""FedALA (Zhang et al., AAAI 2023): adaptive local aggregation of the decoder side.

Lower layers (encoder, PCS) are taken from the global model; every decoder-side parameter is
blended element-wise with learned weights (:class:`clients.ala.AdaptiveAggregator`). Buffers of
the blended layers (BatchNorm running statistics) stay local, as in FedALA.
"""
from __future__ import annotations

from typing import Dict, List, Mapping

import numpy as np
import torch

from losses.pce import partial_cross_entropy

from ..ala import AdaptiveAggregator
from ..registry import register_rule
from .base import DECODER_GROUPS, LocalRule


@register_rule("FedALA")
class FedALARule(LocalRule):
    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        self.ala = AdaptiveAggregator(eta=cfg.ala_eta, threshold=cfg.ala_threshold,
                                      num_pre_loss=cfg.ala_num_pre_loss,
                                      max_epochs=cfg.ala_max_epochs)
        self.last_losses: List[float] = []

    def receive(self, trainer, arrays: Mapping[str, np.ndarray], shared: List[str],
                server_round: int) -> None:
        if trainer.rounds_done == 0 or server_round <= self.cfg.ala_warmup_rounds:
            trainer.load_arrays(arrays, shared)
            return
        params = dict(trainer.model.named_parameters())
        decoder = set(trainer.keys(DECODER_GROUPS))
        blended = [k for k in shared if k in decoder and k in params]
        direct = [k for k in shared if k not in decoder]
        trainer.load_arrays(arrays, direct)
        global_params = {k: torch.as_tensor(np.asarray(arrays[k])) for k in blended}
        unlabelled = trainer.task.unlabelled

        def pce(model, batch) -> torch.Tensor:
            logits = model(batch["image"], site=trainer.cid).logits
            return partial_cross_entropy(logits, batch["label"], ignore_index=unlabelled)

        seed = self.cfg.seed * 7919 + trainer.cid * 131 + server_round
        self.last_losses = self.ala.blend(
            trainer.model, global_params, pce,
            lambda epoch: trainer.sample_batches(self.cfg.ala_rand_percent, seed + 100_003 * epoch))

    def state_dict(self) -> Dict[str, object]:
        return {"ala": self.ala.state_dict()}

    def load_state_dict(self, state: Mapping[str, object], device: torch.device) -> None:
        self.ala.load_state_dict(state["ala"], device)
