"""FedLC / LC-Fed local rule (Wang et al., ECCV 2022); the server side is ``strategies/fedlc.py``.

Each round the site

1. loads the shared groups (encoder, PCS, decoder, auxiliary heads) and stores the snapshot of
   every site's segmentation head that came with them (its own head from its local copy) in
   its calibration module (:class:`networks.calibration.HeadCalibration`);
2. trains ``cfg.fedlc_head_steps`` steps (``fedlc_head_fraction`` of the ``iters``, default
   0.2: 2 of 10) on its personal head alone, then the rest of the round on the shared network
   with the head frozen. This is the original's split scaled to our round: its local round
   (one "epoch", between two aggregations) is 300 random draws in batches of 6 = 50 steps, of
   which the first ``head_iter = 10`` train the head and the other 40 the body
   (``scripts/train_multi_lcfed.py``: ``if i_batch < args.head_iter:
   set_global_grad(net_current, global_keys, False)``). The objective is the run's (pCE + the
   trained site-contrastive term by default) plus the calibration term: the soft Dice of the
   calibrated prediction against the sparse labels, on labelled pixels. The calibration
   module trains in every step; its inputs (decoder feature, prediction, head snapshot) are
   detached, so its loss gives no gradient to the segmentation network;
3. replies with the shared groups and, as extra arrays, its own head (for the other sites'
   calibration next round). The calibration module never leaves the site.
"""
from __future__ import annotations

from typing import Dict, List, Mapping

import numpy as np
import torch

from losses.dice import partial_dice_loss
from networks.calibration import HEAD_KEYS, CalibratedUNet, head_key

from ..registry import register_rule
from .base import HEAD_GROUP, LocalRule
from .ft import step_weighted

#: Parameter group of the calibration module (networks/calibration.py).
CALIB_GROUP = "calib"


class CalibratedObjective:
    """The run's objective plus FedLC's calibration term (weight 1, term ``calib``).

    ``calib = partial_dice_loss(model.calibrate(out, site), label)`` when the network has a
    loaded head snapshot; the calibration module detaches its inputs, so the term trains only
    the calibration module. Its weight is irrelevant to the rest of the network.
    """

    def __init__(self, inner) -> None:
        self.inner = inner
        self.config = inner.config

    def weights(self) -> Dict[str, float]:
        return {**self.inner.weights(), "calib": 1.0}

    def __call__(self, model, out, image, label, site, num_sites):
        result = self.inner(model, out, image, label, site, num_sites)
        if getattr(model, "calibration_ready", False):
            calibrated = model.calibrate(out, site)
            loss = partial_dice_loss(calibrated, label, ignore_index=out.logits.shape[1])
            result.total = result.total + loss
            result.terms["calib"] = float(loss.detach())
            result.weights["calib"] = 1.0
        return result


@register_rule("FedLC")
class FedLCRule(LocalRule):
    """Personal head + calibration module; shared encoder, PCS and decoder."""

    def _network(self, trainer) -> CalibratedUNet:
        model = trainer.model
        if not isinstance(model, CalibratedUNet):
            raise ValueError(f"FedLC needs a network with a calibration head (unet_lc_calib, "
                             f"unet_lc_multihead_calib), not {self.cfg.model!r}")
        if not isinstance(trainer.objective, CalibratedObjective):
            trainer.objective = CalibratedObjective(trainer.objective)
        return model

    def receive(self, trainer, arrays: Mapping[str, np.ndarray], shared: List[str],
                server_round: int) -> None:
        model = self._network(trainer)
        own_weight, own_bias = model.head_state()  # the head as it is now, before training
        trainer.load_arrays(arrays, shared)
        weights, biases = [], []
        for site in range(model.num_sites):
            if site == trainer.cid:
                weights.append(own_weight)
                biases.append(own_bias)
                continue
            names = [head_key(site, k) for k in HEAD_KEYS]
            missing = [n for n in names if n not in arrays]
            if missing:
                raise ValueError(f"client {trainer.cid}: FedLC round {server_round} lacks the "
                                 f"head of site {site} ({missing[0]!r}); the server must send "
                                 "every site's head")
            weights.append(torch.as_tensor(np.asarray(arrays[names[0]])).reshape(own_weight.shape))
            biases.append(torch.as_tensor(np.asarray(arrays[names[1]])).reshape(own_bias.shape))
        model.set_peer_heads(weights, biases)

    def local_train(self, trainer, server_round: int) -> Dict[str, float]:
        self._network(trainer)
        head = set(trainer.keys([HEAD_GROUP]))
        calib = set(trainer.keys([CALIB_GROUP]))
        iters = self.cfg.iters
        first = self.cfg.fedlc_head_steps
        parts = []
        if first > 0:
            parts.append((first, trainer.run_iterations(
                first, lambda n: n in head or n in calib)))
        if iters - first > 0:
            parts.append((iters - first, trainer.run_iterations(
                iters - first, lambda n: n not in head)))
        return step_weighted(parts)

    def extra_reply(self, trainer, server_round: int) -> Dict[str, np.ndarray]:
        sd = trainer.model.state_dict()
        return {head_key(trainer.cid, k): sd[k].detach().cpu().numpy().copy() for k in HEAD_KEYS}
