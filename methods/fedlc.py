"""FedLC / LC-Fed: personalised channel selection, personal heads, local head calibration.

Wang, Jin and Wang, "Personalizing Federated Medical Image Segmentation via Local
Calibration", ECCV 2022 (code: github.com/jcwang123/FedLC). The server half is :class:`FedLC`,
the site half :class:`FedLCRule`, the network ``networks/calibration.py``.

Each round the site

1. loads the shared groups (encoder, PCS, decoder, auxiliary heads) and stores the snapshot of
   every site's segmentation head that came with them (its own head from its local copy) in
   its calibration module (:class:`networks.calibration.HeadCalibration`);
2. trains ``fedlc_head_steps(iters)`` steps (:meth:`FedLCParams.fedlc_head_steps`:
   ``fedlc_head_fraction`` of the ``iters``, default 0.2: 2 of 10) on its personal head alone,
   then the rest of the round on the shared network with the head frozen. This is the
   original's split scaled to our round: its local round (one "epoch", between two
   aggregations) is 300 random draws in batches of 6 = 50 steps, of which the first
   ``head_iter = 10`` train the head and the other 40 the body
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

import logging
import math
from dataclasses import dataclass
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from clients.rules.base import HEAD_GROUP, LocalRule
from losses.dice import partial_dice_loss
from networks.calibration import HEAD_KEYS, CalibratedUNet, head_key, parse_head_key
from networks.checkpoint import as_arrays, as_tensors
from networks.registry import network_info
from strategies.base import PersonalizedStrategy, to_numpy, to_record
from strategies.flower import ArrayRecord, ConfigRecord, Grid, Message, MetricRecord

from .ft import step_weighted
from .registry import Method, MethodParams, register_method

log = logging.getLogger("fedicra.server")

#: Parameter group of the calibration module (networks/calibration.py).
CALIB_GROUP = "calib"


@dataclass
class FedLCParams(MethodParams):
    """FedLC's hyper-parameters (docs/federated.md, "FedLC")."""

    fedlc_head_fraction: float = 0.2  # share of a round's iters that train the head first, the rest the body (the original: head_iter 10 of its 50 batches a round)

    def fedlc_head_steps(self, iters: int) -> int:
        """The first steps of a round of ``iters`` steps, which train the head (the rest train
        the body): ``fedlc_head_fraction * iters`` rounded half up, but at least 1 and at most
        ``iters - 1`` when ``0 < fedlc_head_fraction < 1`` and ``iters >= 2`` (both parts
        train). The default 0.2 is the original's ``head_iter = 10`` of its 50 steps a round."""
        fraction = self.fedlc_head_fraction
        steps = int(math.floor(fraction * iters + 0.5))
        if 0.0 < fraction < 1.0 and iters >= 2:
            steps = min(iters - 1, max(1, steps))
        return max(0, min(iters, steps))

    def checks(self, cfg) -> Iterable[Tuple[bool, str]]:
        return [(0.0 <= self.fedlc_head_fraction <= 1.0,
                 f"fedlc_head_fraction = {self.fedlc_head_fraction} must lie in [0, 1] (the share "
                 "of a FedLC round's iters that train the head before the body; the original: "
                 "0.2)")]


def refuses(cfg) -> Optional[Tuple[str, str]]:
    """``(key, reason)`` when ``cfg`` cannot run FedLC (pre-flight), else None."""
    network = network_info(cfg.model)  # its declaration (networks/registry.py)
    if not (network.site_gates and network.calibration_head):
        return "model", (f"{cfg.model!r}: FedLC needs the site channel selection (PCS) and a "
                         f"calibration head; use unet_lc_calib, or unet_lc_multihead_calib "
                         "for objectives with the tree energy term")
    if cfg.num_clients < 2:
        return "num_clients", (f"{cfg.num_clients}: FedLC calibrates by the disagreement "
                               "between the sites' heads and needs at least 2 clients")
    return None


# ====================================================================== server
class FedLC(PersonalizedStrategy):
    """FedLC (LC-Fed, Wang et al., ECCV 2022).

    What is shared and what stays local
    -----------------------------------
    Shared and averaged (weighted by training samples): the encoder, the personalised channel
    selection (PCS, conditioned on a one-hot site code, trained with the site-contrastive loss
    *with* gradient), the decoder and the auxiliary heads of the multihead variant.
    Personal: the segmentation head ``out_conv`` and the calibration module ``calib``.

    Every site's head is nevertheless broadcast: each round the server sends every site the
    heads of all sites (the latest head each site replied with; the initial head in round 1)
    as extra arrays ``fedlc_head.<site>.out_conv.{weight,bias}``, and each site replies with
    its own head under the same naming. They are never averaged: a site uses the snapshot only
    to measure where the sites' heads disagree on its own features, the input of its
    calibration module. The calibration module's parameters and snapshot never travel.

    Each site deploys its personal model (``client<k>/best.pt``); its prediction, at
    validation, in ``best.pt`` selection and in ``test_client.py``, is the calibrated one.

    Defaults: ``unet_lc_calib`` with ``pce_sc`` (pCE plus the site-contrastive term, weight
    ``alpha = 1``, ``sc_grad = True``), ``fedlc_head_fraction = 0.2`` (of the ``iters`` steps
    of a round the first fifth, 2 of 10, train the head, the rest the shared network: the
    original's ``head_iter = 10`` of the 50 steps of its round; ``rep_iters`` is not read).
    The original's ``--alpha`` defaults to 0, which switches the contrastive site embedding of
    the paper off; it stays on here (docs/federated.md, "FedLC").

    Notes
    -----
    Deviations from the original code: the PCS module is registered, shared and trained (the
    original keeps it in a plain list outside the model); the calibration module trains in the
    same rounds as the network (its inputs are detached, so this equals the original's second
    training stage run alongside); its Dice is taken over labelled pixels (sparse labels);
    softmax over classes instead of per-class sigmoids; the smoothed attention maps are clipped
    to [0, 1]. Defect fixed: the original divides its running contrastive sum by
    ``len(hmap)`` (= 5) inside the loop over sites, which weights the other sites by
    1/5, 1/25, ... in the order of their indices; here they weigh the same
    (``losses/site_contrastive.py``).
    """

    share_exclude = ("out_conv",)

    def __init__(self, cfg, reporter=None, node_timeout: float = 600.0) -> None:
        super().__init__(cfg, reporter, node_timeout)
        #: latest head of every client id, {cid: {out_conv key: array}}
        self.heads: Dict[int, Dict[str, np.ndarray]] = {}
        self._initial_head: Dict[str, np.ndarray] = {}
        self._payload: Optional[ArrayRecord] = None

    def summary(self) -> None:
        super().summary()
        first = self.params.fedlc_head_steps(self.cfg.iters)
        log.info("strategy FedLC: personal heads and calibration modules; every site's head is "
                 "sent to every site each round for calibration; each round %d head step(s), "
                 "then %d body step(s) (fedlc_head_fraction = %g)", first, self.cfg.iters - first,
                 self.params.fedlc_head_fraction)

    # ------------------------------------------------------------------ heads
    def initial_arrays(self, model: nn.Module) -> Dict[str, np.ndarray]:
        sd = model.state_dict()
        self._initial_head = {k: sd[k].detach().cpu().numpy().copy() for k in HEAD_KEYS}
        return super().initial_arrays(model)

    def head_arrays(self) -> Dict[str, np.ndarray]:
        """Every site's head under its message key (the initial head for sites not heard of)."""
        out: Dict[str, np.ndarray] = {}
        for site in range(self.cfg.num_clients):
            head = self.heads.get(site, self._initial_head)
            if not head:
                raise RuntimeError(f"FedLC: no head known for site {site} "
                                   "(initial_arrays was not called)")
            out.update({head_key(site, k): v for k, v in head.items()})
        return out

    def state_dict(self) -> Dict[str, object]:
        """Every site's latest head and the initial head (for sites not heard of yet)."""
        return {"heads": {int(c): as_tensors(h) for c, h in self.heads.items()},
                "initial_head": as_tensors(self._initial_head)}

    def load_state_dict(self, state: Mapping[str, object]) -> None:
        self.heads = {int(c): as_arrays(h) for c, h in dict(state.get("heads", {})).items()}
        if state.get("initial_head"):
            self._initial_head = as_arrays(state["initial_head"])

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self._payload = to_record({**to_numpy(arrays), **self.head_arrays()})
        return super().configure_train(server_round, arrays, config, grid)

    def payload_for(self, node_id: int, arrays: ArrayRecord) -> ArrayRecord:
        # the same for every node: the shared groups and all sites' heads
        return self._payload if self._payload is not None else arrays

    def _collect_heads(self, server_round: int, replies: Sequence[Message]) -> None:
        """Keep the head of every finite, non-diverged reply (keyed by its client id)."""
        for m in replies:
            if m.has_error() or "metrics" not in m.content.metric_records:
                continue
            metrics = m.content["metrics"]
            if metrics.get("diverged"):
                continue
            arrays = to_numpy(m.content["arrays"]) if "arrays" in m.content.array_records else {}
            if not all(np.isfinite(a).all() for a in arrays.values()
                       if np.issubdtype(a.dtype, np.floating)):
                continue  # refused by the aggregation too
            head: Dict[int, Dict[str, np.ndarray]] = {}
            for name, value in arrays.items():
                parsed = parse_head_key(name)
                if parsed is not None:
                    head.setdefault(parsed[0], {})[parsed[1]] = value
            if not head:
                continue
            cid = int(metrics.get("cid", -1))
            if set(head) != {cid} or set(head[cid]) != set(HEAD_KEYS):
                raise RuntimeError(f"round {server_round}: client {cid} replied with heads of "
                                   f"sites {sorted(head)}; expected its own head only")
            self.heads[cid] = head[cid]

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> Tuple[Optional[ArrayRecord], Optional[MetricRecord]]:
        replies = list(replies)
        self._collect_heads(server_round, replies)
        return super().aggregate_train(server_round, replies)

    def aggregate_arrays(self, server_round: int, replies: Sequence[Mapping[str, np.ndarray]],
                         weights: Sequence[float]) -> Dict[str, np.ndarray]:
        shared = [{k: v for k, v in r.items() if parse_head_key(k) is None} for r in replies]
        return super().aggregate_arrays(server_round, shared, weights)


# ====================================================================== site
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
        first = self.params.fedlc_head_steps(iters)
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


FEDLC = register_method(Method(
    name="FedLC", server=FedLC, site=FedLCRule, params=FedLCParams,
    model="unet_lc_calib", procedure="pce_sc", defaults={"alpha": 1.0, "sc_grad": True},
    deploys="personal",
    calibrates=True,  # read by the pre-flight checks: this method runs the calibrated networks
    refuses=refuses,
    summary="personal heads with local calibration, site-contrastive channel selection"))
