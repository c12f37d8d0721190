"""The base of every server strategy: which parameters are shared, how replies combine.

A method subclasses :class:`PersonalizedStrategy` and overrides class attributes or hooks:

- ``share_include`` / ``share_exclude``: parameter groups (see :mod:`networks.groups`) that
  travel between server and sites; everything else stays personal on the site. The sites learn
  the groups from the round's config, so both sides agree without importing each other.
- :meth:`payload_for`: the arrays one node receives (personalised per node where a method
  needs it).
- :meth:`aggregate_arrays`: how the replies' arrays combine (sample-weighted mean by default).
"""
from __future__ import annotations

import logging
import time
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np
from flwr.app import (Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord,
                      RecordDict)
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from torch import nn

from networks.groups import select_keys

from .aggregation import mean_metrics, weighted_mean
from .reporting import RunReporter

log = logging.getLogger("fedicra.server")

ALL_GROUPS = ("encoder", "pcs", "decoder", "out_conv", "aux")
#: RunConfig keys that concern only the launching machine, never sent to sites.
LOCAL_ONLY_KEYS = ("gpus", "mode", "port", "cpus_per_client")


def to_numpy(record: ArrayRecord) -> Dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in record.items()}


def to_record(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


def screen_replies(server_round: int, replies: Sequence[Tuple[Dict[str, float], Dict[str, np.ndarray]]]
                   ) -> Tuple[List[int], Dict[int, str]]:
    """Indices of the replies fit to aggregate, and why each other one is refused.

    A reply is refused when its site reports a diverged round (``diverged`` metric) or when
    any of its numbers (metrics or arrays) is NaN or infinite. Raises RuntimeError when no
    reply is left: every client diverged and the run cannot go on.
    """
    kept: List[int] = []
    refused: Dict[int, str] = {}
    for i, (metrics, arrays) in enumerate(replies):
        bad_arrays = [k for k, a in arrays.items()
                      if np.issubdtype(a.dtype, np.floating) and not np.isfinite(a).all()]
        bad_metrics = [k for k, v in metrics.items() if not np.isfinite(float(v))]
        if metrics.get("diverged"):
            refused[i] = "the site rejected its own update (non-finite loss or model)"
        elif bad_arrays or bad_metrics:
            refused[i] = f"non-finite values in {', '.join((bad_arrays + bad_metrics)[:3])}"
        else:
            kept.append(i)
    for i, reason in refused.items():
        log.warning("round %d: update of client %d refused: %s", server_round,
                    int(replies[i][0].get("cid", i)), reason)
    if not kept:
        raise RuntimeError(f"round {server_round}: every client diverged, so no update is left "
                           "to aggregate; the run stops (lower --base_lr, or check the data); "
                           "the last good round is on disk")
    return kept, refused


class PersonalizedStrategy(Strategy):
    """Sample-weighted averaging of the shared parameter groups, every node every round.

    Parameters
    ----------
    cfg : RunConfig
        The run configuration (sent to the sites with every message, minus local-only keys).
    reporter : RunReporter, optional
        Where rounds are recorded; ``None`` records nothing (unit tests).
    node_timeout : float
        Seconds to wait for ``cfg.num_clients`` nodes to connect before failing.
    """

    name = "base"
    share_include: Tuple[str, ...] = ALL_GROUPS
    share_exclude: Tuple[str, ...] = ()
    #: What the method hands each site at the end: ``"global"`` (one model for every site,
    #: tested from ``global/best.pt``) or ``"personal"`` (each site's ``client<k>/best.pt``).
    deploys: str = "personal"
    #: The method as its paper defines it: RunConfig values applied when neither the config
    #: file nor the command line sets them (network, objective, method hyper-parameters).
    defaults: Dict[str, object] = {"model": "unet", "procedure": "pce"}

    def __init__(self, cfg, reporter: Optional[RunReporter] = None,
                 node_timeout: float = 600.0) -> None:
        self.cfg = cfg
        self.reporter = reporter
        self.node_timeout = node_timeout
        self.node_ids: List[int] = []
        #: client id of each node, learnt from the replies (``cid`` metric)
        self.node_cid: Dict[int, int] = {}
        self._sent = 0
        self._global_sent: Optional[ArrayRecord] = None

    # ------------------------------------------------------------------ hooks
    def shared_keys(self, model: nn.Module) -> List[str]:
        return select_keys(model, list(self.share_include), list(self.share_exclude))

    def initial_arrays(self, model: nn.Module) -> Dict[str, np.ndarray]:
        sd = model.state_dict()
        return {k: sd[k].detach().cpu().numpy().copy() for k in self.shared_keys(model)}

    def payload_for(self, node_id: int, arrays: ArrayRecord) -> ArrayRecord:
        return arrays

    def aggregate_arrays(self, server_round: int, replies: Sequence[Mapping[str, np.ndarray]],
                         weights: Sequence[float]) -> Dict[str, np.ndarray]:
        if not replies or not replies[0]:
            return {}
        return weighted_mean(replies, weights)

    def round_config(self, server_round: int) -> Dict[str, object]:
        return {}

    # ------------------------------------------------------------------ Flower Strategy API
    def summary(self) -> None:
        log.info("strategy %s: share %s, keep local %s, %d clients", self.name,
                 ",".join(self.share_include) or "nothing", ",".join(self.share_exclude) or "-",
                 self.cfg.num_clients)

    def message_config(self, base: ConfigRecord, server_round: int) -> ConfigRecord:
        values = {k: v for k, v in base.items() if k not in LOCAL_ONLY_KEYS}
        values.update({"server-round": server_round,
                       "share-include": ",".join(self.share_include),
                       "share-exclude": ",".join(self.share_exclude),
                       "validate-global": self.deploys == "global"})
        values.update(self.round_config(server_round))
        return ConfigRecord(values)

    def wait_for_nodes(self, grid: Grid) -> List[int]:
        deadline = time.monotonic() + self.node_timeout
        while True:
            nodes = sorted(grid.get_node_ids())
            if len(nodes) >= self.cfg.num_clients:
                self.node_ids = nodes[: self.cfg.num_clients]
                return self.node_ids
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"only {len(nodes)} of {self.cfg.num_clients} nodes connected within "
                    f"{self.node_timeout:.0f} s")
            time.sleep(0.2)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        nodes = self.wait_for_nodes(grid)
        msg_config = self.message_config(config, server_round)
        self._sent = len(nodes)
        self._global_sent = arrays
        return [Message(RecordDict({"arrays": self.payload_for(n, arrays), "config": msg_config}),
                        dst_node_id=n, message_type=MessageType.TRAIN) for n in nodes]

    def _valid(self, server_round: int, replies: Iterable[Message], phase: str) -> List[RecordDict]:
        """The replies' contents, ordered by client id (so aggregation does not depend on
        arrival order); an error reply or a missing client fails the round."""
        replies = list(replies)
        failed = [m for m in replies if m.has_error()]
        if failed:
            reasons = "; ".join(f"node {m.metadata.src_node_id}: {m.error.reason}" for m in failed)
            raise RuntimeError(f"round {server_round} {phase}: {len(failed)} client(s) failed: {reasons}")
        if len(replies) < self._sent:
            raise RuntimeError(f"round {server_round} {phase}: {len(replies)} of "
                               f"{self._sent} clients answered")
        for m in replies:
            record = m.content.metric_records.get("metrics")
            cid = None if record is None else record.get("cid")
            if cid is not None:
                self.node_cid[int(m.metadata.src_node_id)] = int(cid)
        contents = [m.content for m in replies]
        return sorted(contents, key=lambda c: float(c["metrics"].get("cid", -1.0)))

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> Tuple[Optional[ArrayRecord], Optional[MetricRecord]]:
        contents = self._valid(server_round, replies, "train")
        all_metrics = [dict(c["metrics"]) for c in contents]
        all_arrays = [to_numpy(c["arrays"]) for c in contents]
        kept, _ = screen_replies(server_round, list(zip(all_metrics, all_arrays)))
        metrics = [all_metrics[i] for i in kept]
        weights = [float(m["num-examples"]) for m in metrics]
        arrays = self.aggregate_arrays(server_round, [all_arrays[i] for i in kept], weights)
        aggregated = mean_metrics(metrics, weights)
        aggregated.pop("cid", None)
        aggregated["num-examples"] = float(sum(weights))
        # Sites validate on the same rounds; plain means weigh every site equally.
        for key in ("val_dice", "val_dice_global"):  # only when every site scored it
            if all(key in m for m in all_metrics):
                aggregated[key] = float(np.mean([m[key] for m in metrics]))
            else:
                aggregated.pop(key, None)
        if self.reporter is not None:
            self.reporter.record_round(server_round, all_metrics, aggregated, arrays, len(self.node_ids))
            if "val_dice_global" in aggregated and self._global_sent is not None:
                # the arrays sent this round are the aggregate of the previous round
                self.reporter.record_global_validation(
                    server_round - 1, to_numpy(self._global_sent), aggregated["val_dice_global"])
        return to_record(arrays), MetricRecord(aggregated)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        if server_round < self.cfg.rounds:
            self._sent = 0
            return []
        msg_config = self.message_config(config, server_round)
        self._sent = len(self.node_ids)
        # A global method's final aggregate is validated by every site; others send nothing.
        self._global_sent = arrays if self.deploys == "global" else None
        payload = arrays if self.deploys == "global" else ArrayRecord()
        return [Message(RecordDict({"arrays": payload, "config": msg_config}),
                        dst_node_id=n, message_type=MessageType.EVALUATE) for n in self.node_ids]

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]
                           ) -> Optional[MetricRecord]:
        contents = self._valid(server_round, replies, "evaluate")
        if not contents:
            return None
        metrics = [dict(c["metrics"]) for c in contents]
        summary = {"val_dice": float(np.mean([m["val_dice"] for m in metrics]))}
        if self._global_sent is not None and all("val_dice_global" in m for m in metrics):
            summary["val_dice_global"] = float(np.mean([m["val_dice_global"] for m in metrics]))
        if self.reporter is not None:
            self.reporter.record_final(metrics)
            if "val_dice_global" in summary:
                self.reporter.record_global_validation(
                    server_round, to_numpy(self._global_sent), summary["val_dice_global"])
        return MetricRecord(summary)
