"""The base of every server strategy: which parameters are shared, how replies combine.

A method subclasses :class:`PersonalizedStrategy` and overrides class attributes or hooks:

- ``share_include`` / ``share_exclude``: parameter groups (see :mod:`networks.groups`) that
  travel between server and sites; everything else stays personal on the site. The sites learn
  the groups from the round's config, so both sides agree without importing each other.
- :meth:`payload_for`: the arrays one node receives (personalised per node where a method
  needs it).
- :meth:`aggregate_arrays`: how the replies' arrays combine (sample-weighted mean by default).
- :meth:`state_dict` / :meth:`load_state_dict`: server state kept across rounds (stored with
  the global checkpoint every round, so ``flower_runner.py --resume`` continues the run).
- :meth:`deadline_scale`: how much longer than a plain round a round may take.

Lost sites: every phase waits at most the round deadline (``round_timeout``,
:mod:`strategies.deadlines`); a client that errs or does not answer in time is missing from
the round (logged by id, a ``missing = 1`` row in metrics.csv) and the round goes on when at
least ``min_fit_clients`` answered; otherwise the run stops (:meth:`_valid`). A site that comes
back is sent the next round again (:meth:`wait_for_nodes`).
"""
from __future__ import annotations

import logging
import re
import time
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np
from torch import nn

from configs.round_keys import SERVER_ROUND, SHARE_EXCLUDE, SHARE_INCLUDE, VALIDATE_GLOBAL
from configs.schema import LOCAL_ONLY_KEYS
from networks.groups import select_keys

from .aggregation import mean_metrics, weighted_mean
from .deadlines import DeadlineGrid, RoundClock
from .errors import SITE_REFUSED, RunStopped
from .flower import (HAVE_FLOWER, Array, ArrayRecord, ConfigRecord, Grid, Message, MessageType,
                     MetricRecord, RecordDict, Result, Strategy)
from .reporting import RunReporter

log = logging.getLogger("fedicra.server")

ALL_GROUPS = ("encoder", "pcs", "decoder", "out_conv", "aux")


def to_numpy(record: ArrayRecord) -> Dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in record.items()}


def to_record(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


def screen_replies(server_round: int, replies: Sequence[Tuple[Dict[str, float], Dict[str, np.ndarray]]]
                   ) -> Tuple[List[int], Dict[int, str]]:
    """Indices of the replies fit to aggregate, and why each other one is refused.

    A reply is refused when its site reports a diverged round (``diverged`` metric) or when
    any of its numbers (metrics or arrays) is NaN or infinite. Raises :class:`RunStopped`
    when no reply is left: every client diverged and the run cannot go on.
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
        raise RunStopped(f"round {server_round}: every client diverged, so no update is left "
                           "to aggregate; the run stops (lower --base_lr, or check the data); "
                           "the last good round is on disk")
    return kept, refused


def error_reason(reply: Message) -> str:
    """The text of an error reply (Flower wraps a ClientApp's exception as
    ``<class 'module.Error'>:<'message'>``: the message is kept)."""
    text = str(reply.error.reason or f"error code {reply.error.code}").strip()
    match = re.fullmatch(r"<class '([\w.]+)'>:<(['\"])(.*)\2>", text, flags=re.S)
    return match.group(3) if match else text


class PersonalizedStrategy(Strategy):
    """Sample-weighted averaging of the shared parameter groups, every node every round
    (every node that answers: see the module docstring on lost sites).

    Parameters
    ----------
    cfg : RunConfig
        The run configuration (sent to the sites with every message, minus local-only keys).
    reporter : RunReporter, optional
        Where rounds are recorded; ``None`` records nothing (unit tests).
    node_timeout : float
        Seconds to wait for ``cfg.num_clients`` nodes to connect before the first round.
    """

    share_include: Tuple[str, ...] = ALL_GROUPS
    share_exclude: Tuple[str, ...] = ()

    # what the method's registry entry declares (methods/registry.py, ``Method``)
    @property
    def name(self) -> str:
        return self.cfg.method.name

    @property
    def deploys(self) -> str:
        """``"global"`` (one model for every site, tested from ``global/best.pt``) or
        ``"personal"`` (each site's ``client<k>/best.pt``)."""
        return self.cfg.method.deploys

    @property
    def extra_rounds(self) -> int:
        """Rounds the method runs after the configured ``rounds`` (FT's fine-tuning, MetaFed's
        personalisation); :meth:`start` adds them to the loop."""
        return self.cfg.method.extra_rounds

    def sends_final_aggregate(self) -> bool:
        """Whether the final evaluate message carries the last aggregate: a global model is
        validated there; a method whose sites validate something built from the aggregate
        (FedICRA-ref) overrides this."""
        return self.deploys == "global"

    def __init__(self, cfg, reporter: Optional[RunReporter] = None,
                 node_timeout: float = 600.0) -> None:
        if not HAVE_FLOWER:
            raise ModuleNotFoundError(f"{cfg.strategy}: the server half of a method needs "
                                      "Flower (pip install flwr); this machine can only train sites")
        self.cfg = cfg
        self.params = cfg.params  # the method's hyper-parameters
        self.reporter = reporter
        self.node_timeout = node_timeout
        self.node_ids: List[int] = []
        #: client id of each node, learnt from the replies (``cid`` metric)
        self.node_cid: Dict[int, int] = {}
        self._sent = 0
        self._global_sent: Optional[ArrayRecord] = None
        #: the last round a resumed run had completed (0: a fresh run), see :meth:`start`
        self.resume_round = 0
        #: how long each phase waits for its replies (Flower's ``timeout``, set by :meth:`start`)
        self.timeout: float = 3600.0
        #: the round deadline (``round_timeout``) and what the last phase sent
        self.clock = RoundClock(float(getattr(cfg, "round_timeout", 0.0)))
        #: why each node missing from the last phase is missing ("client K (node N)": reason)
        self.missing: Dict[str, str] = {}
        self._heard: Dict[int, int] = {}  # node -> when its client id was last learnt
        #: the client id of each reply :meth:`aggregate_arrays` receives, in its order
        self.last_cids: List[int] = []

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

    def deadline_scale(self, server_round: int) -> float:
        """Local work of ``server_round`` relative to a plain round (its deadline is scaled
        by it, see :mod:`strategies.deadlines`)."""
        return 1.0

    def deadline_kind(self, server_round: int) -> str:
        """The kind of local work of ``server_round``: the automatic deadline of a round comes
        from the completed rounds of its kind only (see :mod:`strategies.deadlines`). Methods
        whose rounds differ in work by more than the deadline's factor name them apart."""
        return "train"

    def state_dict(self) -> Dict[str, object]:
        """Server state a resumed run needs, as of the end of the last aggregated round.

        Stored in ``global/latest.pt`` with every round's aggregate and read back with
        ``torch.load(weights_only=True)``: tensors and plain Python values only (convert
        arrays with :func:`networks.checkpoint.as_tensors`). The base keeps none: the
        node-to-client map is learnt again, since a resumed run's nodes get new ids.
        """
        return {}

    def load_state_dict(self, state: Mapping[str, object]) -> None:
        """Restore what :meth:`state_dict` returned (before :meth:`start` of a resumed run)."""

    # ------------------------------------------------------------------ Flower Strategy API
    def start(self, grid: Grid, initial_arrays: ArrayRecord, num_rounds: int = 3,
              timeout: float = 3600, train_config: Optional[ConfigRecord] = None,
              evaluate_config: Optional[ConfigRecord] = None, evaluate_fn=None) -> Result:
        """Flower's round loop; a resumed run (:attr:`resume_round` > 0) continues it.

        Flower's :meth:`Strategy.start` always begins at round 1. After ``resume_round = r``
        (and :meth:`load_state_dict`), ``initial_arrays`` is the aggregate of round ``r`` and
        the loop below takes over in Flower's order: the evaluate phase of round ``r`` (the
        final evaluation when ``r`` is the last round, nothing otherwise), then rounds
        ``r + 1 .. num_rounds``. ``num_rounds`` is the configured ``rounds``; a method with
        :attr:`extra_rounds` runs that many more after them.
        """
        problem = self.cfg.method.refusal(self.cfg)
        if problem:
            raise ValueError(f"{self.name}: {problem[0]} = {problem[1]}")
        if self.extra_rounds:
            if num_rounds != self.cfg.rounds:
                raise ValueError(f"{self.name}: asked for {num_rounds} rounds but the run config "
                                 f"has rounds = {self.cfg.rounds}; the method's last "
                                 f"{self.extra_rounds} round(s) follow the configured last round")
            num_rounds += self.extra_rounds
        self.timeout = timeout
        if not isinstance(grid, DeadlineGrid):  # every phase waits at most round_timeout
            grid = DeadlineGrid(grid, self.clock)
        if not self.resume_round:
            return super().start(grid, initial_arrays, num_rounds, timeout, train_config,
                                 evaluate_config, evaluate_fn)
        done = self.resume_round
        if not 1 <= done <= num_rounds:
            raise ValueError(f"cannot resume after round {done} of a run of {num_rounds} rounds")
        train_config = ConfigRecord() if train_config is None else train_config
        evaluate_config = ConfigRecord() if evaluate_config is None else evaluate_config
        self.summary()
        log.info("resuming the run after round %d of %d", done, num_rounds)
        self.identify_nodes(grid, done, train_config)
        result = Result()
        arrays = result.arrays = initial_arrays
        for current_round in range(done, num_rounds + 1):
            if current_round > done:
                replies = grid.send_and_receive(
                    self.configure_train(current_round, arrays, train_config, grid),
                    timeout=timeout)
                agg_arrays, agg_metrics = self.aggregate_train(current_round, replies)
                if agg_arrays is not None:
                    arrays = result.arrays = agg_arrays
                if agg_metrics is not None:
                    result.train_metrics_clientapp[current_round] = agg_metrics
            replies = grid.send_and_receive(
                self.configure_evaluate(current_round, arrays, evaluate_config, grid),
                timeout=timeout)
            agg_evaluate = self.aggregate_evaluate(current_round, replies)
            if agg_evaluate is not None:
                result.evaluate_metrics_clientapp[current_round] = agg_evaluate
            if evaluate_fn:
                res = evaluate_fn(current_round, arrays)
                if res is not None:
                    result.evaluate_metrics_serverapp[current_round] = res
        return result

    def identify_nodes(self, grid: Grid, server_round: int, config: ConfigRecord) -> Dict[int, int]:
        """Ask every node which client it serves (:meth:`_identify`), so that a resumed run
        can address personalised payloads and ring steps before any round's reply arrives
        (a fresh run learns it from round 1's replies). Returns ``{node: client id}``."""
        nodes = self.wait_for_nodes(grid)
        self._identify(grid, nodes, server_round, config)
        unknown = [n for n in nodes if n not in self.node_cid]
        if unknown:  # asked again by the next round's wait_for_nodes
            log.warning("resuming after round %d: node(s) %s have not said which client they "
                        "serve", server_round, unknown)
        return {n: self.node_cid[n] for n in nodes if n in self.node_cid}

    def summary(self) -> None:
        log.info("strategy %s: share %s, keep local %s, %d clients", self.name,
                 ",".join(self.share_include) or "nothing", ",".join(self.share_exclude) or "-",
                 self.cfg.num_clients)

    def message_config(self, base: ConfigRecord, server_round: int) -> ConfigRecord:
        values = {k: v for k, v in base.items() if k not in LOCAL_ONLY_KEYS}
        values.update({SERVER_ROUND: server_round,
                       SHARE_INCLUDE: ",".join(self.share_include),
                       SHARE_EXCLUDE: ",".join(self.share_exclude),
                       VALIDATE_GLOBAL: self.deploys == "global"})
        values.update(self.round_config(server_round))
        return ConfigRecord(values)

    def wait_for_nodes(self, grid: Grid, server_round: int = 0,
                       config: Optional[ConfigRecord] = None) -> List[int]:
        """The nodes to message this round.

        The first time: the first ``num_clients`` nodes, waiting up to ``node_timeout`` for
        all of them to connect. Afterwards: the connected nodes, one per client (a lost site's
        node drops out of the SuperLink's list; a restarted site's SuperNode comes back under a
        new id), waiting up to a round deadline while fewer than ``min_fit`` are connected.
        With ``config``, connected nodes whose client is not known yet are first asked which
        client they serve (:meth:`_identify`), so a site that rejoins gets its own payload.
        """
        if not self.node_ids:
            deadline = time.monotonic() + self.node_timeout
            while True:
                nodes = sorted(grid.get_node_ids())
                if len(nodes) >= self.cfg.num_clients:
                    self.node_ids = nodes[: self.cfg.num_clients]
                    return self.node_ids
                if time.monotonic() > deadline:
                    if nodes and len(nodes) >= self.cfg.min_fit:
                        log.warning("only %d of %d nodes connected within %.0f s; the run "
                                    "starts without the others (min_fit_clients)", len(nodes),
                                    self.cfg.num_clients, self.node_timeout)
                        self.node_ids = nodes
                        return self.node_ids
                    raise TimeoutError(
                        f"only {len(nodes)} of {self.cfg.num_clients} nodes connected within "
                        f"{self.node_timeout:.0f} s")
                time.sleep(0.2)
        deadline = time.monotonic() + min(self.node_timeout, self.clock.timeout())
        while True:
            online = sorted(int(n) for n in grid.get_node_ids())
            if len(online) >= self.cfg.min_fit or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        unknown = [n for n in online if n not in self.node_cid]
        if unknown and config is not None:
            self._identify(grid, unknown, server_round, config)
        chosen: Dict[int, int] = {}  # client id -> node (the one heard from last)
        for n in online:
            cid = self.node_cid.get(n)
            if cid is not None and (cid not in chosen
                                    or self._heard.get(n, 0) > self._heard.get(chosen[cid], 0)):
                chosen[cid] = n
        unknown = [n for n in online if n not in self.node_cid]
        if unknown:
            log.warning("round %d: node(s) %s have not said which client they serve; they are "
                        "sent nothing this round", server_round, unknown)
        self.node_ids = [chosen[c] for c in sorted(chosen)]
        return self.node_ids

    def _learn(self, node: int, cid: int) -> None:
        self.node_cid[int(node)] = int(cid)
        self._heard[int(node)] = max(self._heard.values(), default=0) + 1

    def _identify(self, grid: Grid, nodes: Sequence[int], server_round: int,
                  config: ConfigRecord, timeout: float = 60.0) -> None:
        """Ask ``nodes`` which client they serve (the ``identify`` evaluate message, answered
        by the site worker without any work); a node that errs or stays silent is left
        unknown and is asked again next round."""
        values = dict(self.message_config(config, server_round).items())
        values["identify"] = True
        messages = [Message(RecordDict({"arrays": ArrayRecord(), "config": ConfigRecord(values)}),
                            dst_node_id=n, message_type=MessageType.EVALUATE) for n in nodes]
        self.clock.cap = timeout
        try:
            replies = list(grid.send_and_receive(messages, timeout=timeout))
        finally:
            self.clock.cap = None
        for m in replies:
            record = None if m.has_error() else m.content.metric_records.get("metrics")
            if record is not None and record.get("cid") is not None:
                self._learn(int(m.metadata.src_node_id), int(record["cid"]))
                log.info("round %d: node %d serves client %d", server_round,
                         int(m.metadata.src_node_id), int(record["cid"]))

    def missing_clients(self, metrics: Sequence[Mapping[str, float]]) -> List[int]:
        """Client ids without a reply among ``metrics`` (one reply's metrics per client)."""
        answered = {int(m["cid"]) for m in metrics if "cid" in m}
        return sorted(set(range(self.cfg.num_clients)) - answered)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        nodes = self.wait_for_nodes(grid, server_round, config)
        self.clock.scale = self.deadline_scale(server_round)
        self.clock.kind = self.deadline_kind(server_round)
        msg_config = self.message_config(config, server_round)
        self._sent = len(nodes)
        self._global_sent = arrays
        return [Message(RecordDict({"arrays": self.payload_for(n, arrays), "config": msg_config}),
                        dst_node_id=n, message_type=MessageType.TRAIN) for n in nodes]

    def _valid(self, server_round: int, replies: Iterable[Message], phase: str,
               minimum: Optional[int] = None) -> List[RecordDict]:
        """The contents of the replies that came, ordered by client id (so aggregation does not
        depend on arrival order).

        A node that answered with an error, or not at all within the round deadline, is
        missing: logged with its client id and the reason, and listed in :attr:`missing`; the
        phase goes on without it. Fewer than ``minimum`` answers (default ``min_fit``, the
        ``min_fit_clients`` key) raise :class:`RunStopped`: the run stops, and its last
        completed round stays on disk (``global/latest.pt``, ``client<k>/latest.pt``). So
        does a site that says it can take part in no round of this run
        (:data:`~strategies.errors.SITE_REFUSED`, e.g. its checkpoint is of another run):
        going on without it would leave it out of every round.
        """
        replies = list(replies)
        sent = self.clock.sent if self.clock.sent is not None else range(self._sent)
        if not replies and not len(sent):
            return []  # nothing was sent (an evaluate phase before the last round)
        minimum = self.cfg.min_fit if minimum is None else minimum
        failed: Dict[int, str] = {}
        contents: List[RecordDict] = []
        seen: Dict[int, int] = {}
        for m in replies:
            node = self.clock.node_for(m)
            if m.has_error():
                failed[node] = error_reason(m)
                continue
            record = m.content.metric_records.get("metrics")
            cid = None if record is None else record.get("cid")
            if cid is not None:
                if int(cid) in seen:
                    log.warning("round %d %s: nodes %d and %d both answered for client %d; the "
                                "second reply is ignored", server_round, phase, seen[int(cid)],
                                node, int(cid))
                    continue
                seen[int(cid)] = node
                self._learn(int(m.metadata.src_node_id), int(cid))
            contents.append(m.content)
        answered = {self.clock.node_for(m) for m in replies}
        if self.clock.sent is not None:
            for node in self.clock.sent:
                if node not in answered:
                    failed[node] = (f"no reply within {self.clock.last_timeout:.0f} s "
                                    f"({self.clock.describe()})")
        else:  # messages sent by hand, not through the strategy's grid (unit tests)
            for i in range(max(0, self._sent - len(replies))):
                failed[-1 - i] = "no reply"
        self.missing = {}
        for node, reason in sorted(failed.items()):
            cid = self.node_cid.get(node)
            who = (f"client {cid} (node {node})" if cid is not None else
                   f"node {node} (client not known yet)" if node >= 0 else "a node")
            self.missing[who] = reason
            log.warning("round %d %s: %s is missing: %s", server_round, phase, who, reason)
        refused = {who: reason for who, reason in self.missing.items() if SITE_REFUSED in reason}
        if refused:
            why = "; ".join(f"{who}: {reason}" for who, reason in refused.items())
            raise RunStopped(
                f"round {server_round} {phase}: {why}. It would miss every round, so the run "
                "stops; its last completed round is on disk (global/latest.pt, "
                "client<k>/latest.pt): put the site's own checkpoint back, or delete it to "
                "have the site start again from the initial model, then --resume")
        if len(contents) < minimum:
            why = "; ".join(f"{who}: {reason}" for who, reason in self.missing.items())
            raise RunStopped(
                f"round {server_round} {phase}: {len(contents)} of {self.cfg.num_clients} "
                f"clients answered, fewer than the {minimum} needed (min_fit_clients = "
                f"{self.cfg.min_fit_clients}, 0: all but one) [{why or 'no reply'}]; the run "
                "stops, its last completed round is on disk (global/latest.pt, "
                "client<k>/latest.pt)")
        return sorted(contents, key=lambda c: float(c["metrics"].get("cid", -1.0)))

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> Tuple[Optional[ArrayRecord], Optional[MetricRecord]]:
        contents = self._valid(server_round, replies, "train")
        all_metrics = [dict(c["metrics"]) for c in contents]
        all_arrays = [to_numpy(c["arrays"]) for c in contents]
        kept, _ = screen_replies(server_round, list(zip(all_metrics, all_arrays)))
        metrics = [all_metrics[i] for i in kept]
        weights = [float(m["num-examples"]) for m in metrics]
        self.last_cids = [int(m["cid"]) for m in metrics]  # whose arrays aggregate_arrays gets
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
            if "val_dice_global" in aggregated and self._global_sent is not None:
                # the arrays sent this round are the aggregate of the previous round (recorded
                # first: the round's checkpoint then holds the best score so far)
                self.reporter.record_global_validation(
                    server_round - 1, to_numpy(self._global_sent), aggregated["val_dice_global"])
            self.reporter.record_round(server_round, all_metrics, aggregated, arrays,
                                       self.cfg.num_clients,
                                       missing=self.missing_clients(all_metrics))
        return to_record(arrays), MetricRecord(aggregated)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        # the models are final only after the last round, extra rounds included (FT's
        # fine-tuning, MetaFed's personalisation)
        if server_round < self.cfg.rounds + self.extra_rounds:
            self._sent = 0
            return []
        nodes = self.wait_for_nodes(grid, server_round, config)
        self.clock.scale = 1.0
        msg_config = self.message_config(config, server_round)
        self._sent = len(nodes)
        # A global method's final aggregate is validated by every site, and so is a site's
        # model blended with it (``ala_validate_blend``); other methods send nothing.
        self._global_sent = arrays if self.deploys == "global" else None
        sends = self.sends_final_aggregate()
        payload = arrays if sends else ArrayRecord()
        return [Message(RecordDict({"arrays": payload, "config": msg_config}),
                        dst_node_id=n, message_type=MessageType.EVALUATE) for n in nodes]

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]
                           ) -> Optional[MetricRecord]:
        # the final validation: recorded for the sites that answer (at least one)
        contents = self._valid(server_round, replies, "evaluate", minimum=1)
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
