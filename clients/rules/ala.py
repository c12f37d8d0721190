"""Adaptive local aggregation rule (FedALA, Zhang et al., AAAI 2023), the site half of FedALA,
FedICRA and FedICRA-ref (``methods/fedala.py``, ``methods/fedicra.py``), and its keys
(:class:`ALAParams`).

Which shared tensors are blended element-wise with learned weights
(:class:`clients.ala.AdaptiveAggregator`) and which are copied from the global model is set by
``ala_layer_idx``:

- ``0`` (FedICRA): every decoder-side parameter (``decoder``, ``out_conv``, ``aux`` groups) is
  blended; the encoder and PCS, parameters and buffers, come from the global model; buffers of
  the decoder side (BatchNorm running statistics) stay local.
- ``N > 0`` (FedALA's ``layer_idx``): the last N tensors of ``model.named_parameters()`` are
  blended (for ``unet`` and N = 2: ``out_conv.weight`` and ``out_conv.bias``); every other
  shared *parameter* is copied from the global model. Every buffer stays local. This follows
  FedALA's code: its ALA module reads and writes ``model.parameters()`` only, and its server
  averages ``parameters()`` only, so BatchNorm statistics never leave or enter a client there.
  Our server does average the shared buffers; a FedALA site ignores them.

The learning data of one call are a random ``ala_rand_percent`` subset of the site's training
cases drawn once per call (seeded by run, site and round) and passed through in the same order
every epoch, as FedALA's fixed window. The first round copies the global model without
blending, where FedALA skips ALA because the local model still equals the global one; so does
every round up to ``ala_warmup_iters`` local iterations (``round x iters <= ala_warmup_iters``,
the reference FedICRA code's ``iter_global <= 50``).

Three keys reproduce the reference FedICRA code's round (``FedICRA-ref``; each can be set alone
for an ablation):

- ``ala_reset_weights``: W restarts at ``ala_w_init`` at every blend;
- ``ala_reset_every_iters = P``: after a round that reaches a multiple of P local iterations
  the next round starts from the whole global model, without blending (the reference's
  evaluation round loads the global encoder, after which its next blend is skipped);
- ``ala_validate_blend``: validation and ``best.pt`` score the site's trained model blended
  with that round's aggregate, before any training on it. The aggregate of round r arrives
  with round r + 1 (or the final evaluate message), so the validation of round r runs then,
  on a copy, and its Dice is logged as ``val_dice_blend`` in the row of round r + 1. When the
  next round blends too, that blend is the same call and is reused, as the reference makes
  one call there.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from losses.pce import partial_cross_entropy
from networks.groups import CROSS_GROUPS, PARTITION_GROUPS

from methods.registry import MethodParams

from ..ala import AdaptiveAggregator
from .base import LocalRule


@dataclass
class ALAParams(MethodParams):
    """Keys of adaptive local aggregation (FedALA's defaults; FedICRA's module sets its own)."""

    ala_eta: float = 1.0
    ala_threshold: float = 0.1
    ala_num_pre_loss: int = 10
    ala_rand_percent: float = 0.8
    ala_warmup_iters: int = 0  # local iterations (round x iters) during which the site takes the whole global model (FedICRA and the reference: 50)
    ala_max_epochs: int = 20  # 0: no cap (FedALA and the reference loop until the rule stops)
    ala_w_init: float = 1.0  # initial W: 1 starts from the global model (FedALA), 0 from the local one (the reference)
    ala_groups: str = "decoder,out_conv,aux"  # blended groups when ala_layer_idx = 0 (reference: decoder,out_conv)
    ala_global_buffers: bool = False  # blended layers' BatchNorm statistics from the global model (reference: true)
    ala_layer_idx: int = 0  # 0: blend the decoder side (FedICRA); N > 0: the top N parameter tensors (FedALA)
    # the reference FedICRA code's round (FedICRA-ref; docs/federated.md, "FedICRA-ref")
    ala_reset_weights: bool = False  # W restarts at ala_w_init at every blend (the reference); False: W kept across rounds
    ala_reset_every_iters: int = 0  # after a round that reaches a multiple of this many local iterations, the next starts from the whole global model (reference: 20); 0: never
    ala_validate_blend: bool = False  # validation and best.pt score the site model blended with the round's aggregate, before training (the reference); False: the trained model

    def checks(self, cfg) -> Iterable[Tuple[bool, str]]:
        groups = [g for g in self.ala_groups.split(",") if g]
        known = PARTITION_GROUPS + CROSS_GROUPS
        return [
            (bool(groups) and all(g in known for g in groups),
             f"ala_groups = {self.ala_groups!r}: expected a comma-separated list of "
             f"{', '.join(known)}"),
            (0.0 < self.ala_rand_percent <= 1.0, "ala_rand_percent must lie in (0, 1]"),
            (self.ala_layer_idx >= 0, "ala_layer_idx must be >= 0"),
            (0.0 <= self.ala_w_init <= 1.0, "ala_w_init must lie in [0, 1]"),
            (self.ala_max_epochs >= 0, "ala_max_epochs must be >= 0"),
            (self.ala_warmup_iters >= 0, "ala_warmup_iters must be >= 0 (0: only the first round)"),
            (self.ala_reset_every_iters >= 0, "ala_reset_every_iters must be >= 0 (0: never)"),
        ]


def split_shared(param_names: Sequence[str], shared: Sequence[str], layer_idx: int,
                 decoder: Sequence[str], global_buffers: bool = False
                 ) -> Tuple[List[str], List[str]]:
    """Split the shared keys into blended parameters and keys copied from the global model.

    Parameters
    ----------
    param_names : sequence of str
        ``model.named_parameters()`` names in order (buffers are not parameters).
    shared : sequence of str
        State-dict keys received from the server (parameters and buffers).
    layer_idx : int
        0: blend the ``decoder`` parameters; N > 0: blend the last N of ``param_names``.
    decoder : sequence of str
        Keys of the blended groups (``ala_groups``; used when ``layer_idx == 0``).
    global_buffers : bool
        Also copy the buffers of the blended layers (BatchNorm statistics) from the global
        model, as the reference FedICRA code does (it loads the whole global state first).

    Returns
    -------
    blended, direct : list of str
        Shared parameters to blend, and shared keys to copy from the global model. Keys in
        neither list keep their local value (decoder buffers for ``layer_idx == 0``; every
        buffer for ``layer_idx > 0``).
    """
    if layer_idx < 0:
        raise ValueError(f"ala_layer_idx must be >= 0, got {layer_idx}")
    params = set(param_names)
    if layer_idx == 0:
        decoder_set = set(decoder)
        blend_set = decoder_set & params
        direct = [k for k in shared if k not in decoder_set or (global_buffers and k not in params)]
    else:
        blend_set = set(list(param_names)[-layer_idx:])
        direct = [k for k in shared if (k in params or global_buffers) and k not in blend_set]
    blended = [k for k in shared if k in blend_set]
    return blended, direct


def resets_after(server_round: int, iters: int, period: int) -> bool:
    """Whether round ``server_round`` reaches a multiple of ``period`` local iterations (its
    last iteration count ``server_round * iters`` crosses one); ``period = 0``: never."""
    if period <= 0 or server_round < 1:
        return False
    return (server_round * iters) // period > ((server_round - 1) * iters) // period


def within_warmup(iterations: int, params: ALAParams) -> bool:
    """Whether a round whose local iteration count reaches ``iterations`` takes the whole
    global model instead of a blend (``ala_warmup_iters``; the reference's ``iter_global <= 50``)."""
    return iterations <= params.ala_warmup_iters


def validates_blend_before(server_round: int, cfg, params: ALAParams) -> bool:
    """Whether a site that has trained first validates the previous round's blend in round
    ``server_round`` (``ala_validate_blend``, after a validated round or the last one)."""
    previous = server_round - 1
    return bool(params.ala_validate_blend) and (previous % cfg.eval_every == 0
                                                or previous >= cfg.rounds)


def starts_from_global(server_round: int, cfg, params: ALAParams, trained_before: bool) -> bool:
    """Whether a site starts round ``server_round`` from the whole global model: its first
    round, or the round after one that reaches a multiple of ``ala_reset_every_iters``."""
    return not trained_before or resets_after(server_round - 1, cfg.iters,
                                              params.ala_reset_every_iters)


def blends_in_round(server_round: int, cfg, params: ALAParams) -> bool:
    """Whether a site that trained in the rounds before learns blending weights in round
    ``server_round``, by the decisions :meth:`ALARule.receive` takes: to start its training (a
    round past the warm-up that does not restart from the global model) or to validate the
    previous round's blend (after a validated round past the warm-up). The server gives such
    rounds their own deadline (``methods/fedala.py``)."""
    if server_round < 2:
        return False
    to_train = (not within_warmup(server_round * cfg.iters, params)
                and not starts_from_global(server_round, cfg, params, trained_before=True))
    to_validate = (validates_blend_before(server_round, cfg, params)
                   and not within_warmup((server_round - 1) * cfg.iters, params))
    return to_train or to_validate


class ALARule(LocalRule):
    """Blend the received model into the site's (see the module docstring), then train."""

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        p = self.params
        self.ala = AdaptiveAggregator(eta=p.ala_eta, threshold=p.ala_threshold,
                                      num_pre_loss=p.ala_num_pre_loss,
                                      max_epochs=p.ala_max_epochs, w_init=p.ala_w_init,
                                      reset=p.ala_reset_weights)
        self.last_losses: List[float] = []

    @property
    def validates_trained_model(self) -> bool:
        return not self.params.ala_validate_blend

    def receive(self, trainer, arrays: Mapping[str, np.ndarray], shared: List[str],
                server_round: int) -> Dict[str, float]:
        cfg, p = self.cfg, self.params
        previous = server_round - 1
        metrics: Dict[str, float] = {}
        reusable = None
        trained = trainer.rounds_done > 0
        if trained and validates_blend_before(server_round, cfg, p):
            probe = copy.deepcopy(trainer.model)
            blended = self.merge(trainer, probe, arrays, shared, server_round, previous * cfg.iters)
            scores = trainer.validate_and_checkpoint(previous, False, model=probe)
            metrics = {"val_dice_blend": scores["val_dice"], "best_val_dice": scores["best_val_dice"]}
            reusable = probe if blended else None
        if starts_from_global(server_round, cfg, p, trained):
            trainer.load_arrays(arrays, shared)
        elif reusable is not None:  # the blend just validated is this round's start
            trainer.model.load_state_dict(reusable.state_dict())
        else:
            self.merge(trainer, trainer.model, arrays, shared, server_round, server_round * cfg.iters)
        return metrics

    def final_validation(self, trainer, arrays: Mapping[str, np.ndarray], shared: List[str],
                         server_round: int) -> Optional[Dict[str, float]]:
        """With ``ala_validate_blend``, the last round's validation: the trained model blended
        with the final aggregate (on a copy), checkpointed like every validation."""
        if not self.params.ala_validate_blend or not arrays:
            return None
        trainer.seed_round(server_round + 1)  # drawn as a next round's start would draw it
        probe = copy.deepcopy(trainer.model)
        self.merge(trainer, probe, arrays, shared, server_round + 1, server_round * self.cfg.iters)
        return trainer.validate_and_checkpoint(server_round, True, model=probe)

    def merge(self, trainer, model: nn.Module, arrays: Mapping[str, np.ndarray],
              shared: List[str], seed_round: int, iterations: int) -> bool:
        """Bring the aggregate into ``model``: the whole shared model while ``iterations`` (the
        round's local iteration count) is within ``ala_warmup_iters``, else the copied keys
        and the learned blend. Returns whether it blended. ``seed_round`` seeds the subset."""
        if within_warmup(iterations, self.params):
            trainer.load_arrays(arrays, shared, model=model)
            return False
        names = [n for n, _ in model.named_parameters()]
        groups = [g for g in self.params.ala_groups.split(",") if g]
        blended, direct = split_shared(names, shared, self.params.ala_layer_idx,
                                       trainer.keys(groups), self.params.ala_global_buffers)
        trainer.load_arrays(arrays, direct, model=model)
        self.last_losses = []
        if not blended:
            return False
        global_params = {k: torch.as_tensor(np.asarray(arrays[k])) for k in blended}
        unlabelled = trainer.task.unlabelled

        def pce(net, batch) -> torch.Tensor:
            logits = net(batch["image"], site=trainer.cid).logits
            return partial_cross_entropy(logits, batch["label"], ignore_index=unlabelled)

        # One subset per call, the same batches in the same order every epoch (FedALA).
        seed = self.cfg.seed * 7919 + trainer.cid * 131 + seed_round
        self.last_losses = self.ala.blend(
            model, global_params, pce,
            lambda epoch: trainer.sample_batches(self.params.ala_rand_percent, seed))
        return True

    def state_dict(self) -> Dict[str, object]:
        return {"ala": self.ala.state_dict()}

    def load_state_dict(self, state: Mapping[str, object], device: torch.device) -> None:
        self.ala.load_state_dict(state["ala"], device)
