"""FedLC / LC-Fed: personalised channel selection, personal heads, local head calibration.

Wang, Jin and Wang, "Personalizing Federated Medical Image Segmentation via Local
Calibration", ECCV 2022 (code: github.com/jcwang123/FedLC). The local rule is
``clients/rules/fedlc.py``, the network ``networks/calibration.py``.
"""
from __future__ import annotations

import logging
from typing import Dict, Iterable, Mapping, Optional, Sequence, Tuple

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from torch import nn

from networks.calibration import HEAD_KEYS, head_key, parse_head_key
from networks.checkpoint import as_arrays, as_tensors

from .base import PersonalizedStrategy, to_numpy, to_record
from .registry import register_strategy

log = logging.getLogger("fedicra.server")

#: Networks that carry FedLC's calibration head.
CALIBRATED_NETWORKS = ("unet_lc_calib", "unet_lc_multihead_calib")


@register_strategy("FedLC")
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
    deploys = "personal"
    #: Read by the pre-flight checks: this method runs the ``*_calib`` networks.
    calibrates = True
    defaults = {"model": "unet_lc_calib", "procedure": "pce_sc", "alpha": 1.0, "sc_grad": True,
                "fedlc_head_fraction": 0.2}

    def __init__(self, cfg, reporter=None, node_timeout: float = 600.0) -> None:
        super().__init__(cfg, reporter, node_timeout)
        #: latest head of every client id, {cid: {out_conv key: array}}
        self.heads: Dict[int, Dict[str, np.ndarray]] = {}
        self._initial_head: Dict[str, np.ndarray] = {}
        self._payload: Optional[ArrayRecord] = None

    @classmethod
    def refuses(cls, cfg) -> Optional[Tuple[str, str]]:
        """``(key, reason)`` when ``cfg`` cannot run this method (pre-flight), else None."""
        if cfg.model not in CALIBRATED_NETWORKS:
            return "model", (f"{cfg.model!r}: FedLC needs the site channel selection (PCS) and a "
                             f"calibration head; use unet_lc_calib, or unet_lc_multihead_calib "
                             "for objectives with the tree energy term")
        if cfg.num_clients < 2:
            return "num_clients", (f"{cfg.num_clients}: FedLC calibrates by the disagreement "
                                   "between the sites' heads and needs at least 2 clients")
        return None

    def summary(self) -> None:
        super().summary()
        first = self.cfg.fedlc_head_steps
        log.info("strategy FedLC: personal heads and calibration modules; every site's head is "
                 "sent to every site each round for calibration; each round %d head step(s), "
                 "then %d body step(s) (fedlc_head_fraction = %g)", first, self.cfg.iters - first,
                 self.cfg.fedlc_head_fraction)

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
