"""FedAP: personalised aggregation weights from the similarity of the sites' BatchNorm inputs.

Lu et al., "Personalized Federated Learning with Adaptive Batchnorm for Healthcare", IEEE
Transactions on Big Data, 2022 (original code: microsoft/PersonalizedFL, ``alg/fedap.py``).
The server half is :class:`FedAP`, the site half :class:`FedAPRule`.

Phases (``P`` = :meth:`FedAPParams.fedap_pretrain`, ``R`` = ``rounds``)
-----------------------------------------------------------------------
1. Rounds ``1 .. P``, pre-training: plain FedAvg, every array shared (BatchNorm included),
   sample-weighted mean.
2. Round ``P + 1``, collection: every site loads the whole pre-trained model (the aggregate of
   round ``P``, BatchNorm included), measures with it in eval mode the per-channel mean and
   variance of the input of every BatchNorm layer over its whole (unaugmented) training split,
   then trains its round as usual. From here on the ``bn`` group stays on the site: the reply
   carries the non-BN arrays plus the statistics (``fedap_stats/<layer>/mean|var``). The
   server computes the weight matrix ``W`` once (:func:`fedap_weights`) and each client's
   aggregate ``sum_j W_ij theta_j`` of the non-BN arrays.
3. Rounds ``P + 2 .. R``, personalised: node ``n`` receives the aggregate of its own client
   (``node_cid[n]``) only, never another client's; the replies' non-BN arrays are aggregated
   again per client with the same ``W``.

The ArrayRecord this strategy hands back to Flower from round ``P + 1`` on (kept by Flower as
"the global model" and written to ``global/latest.pt``) is the plain sample-weighted mean of
the non-BN arrays: a record of the run, deployed nowhere. FedAP deploys the personal models
(``client<k>/best.pt``), chosen among rounds ``P + 1 .. R`` (the FedAvg pre-training rounds are
no candidates).

Refused replies (``screen_replies``): in round ``P + 1`` a missing or refused reply leaves a
site without statistics, so ``W`` cannot be formed and the run stops with a RuntimeError.
Later, each client's row of ``W`` is restricted to the kept replies and renormalised; a refused
client (whose site rolled back to its state before the round) thus receives the mix of the
others' models in its row's proportions. Where a row has no weight left on any kept reply
(``fedap_lambda = 1`` and the client's own reply refused) the client's previous aggregate is
sent again.

Missing clients (no reply within the round deadline, an error, not connected; the round goes
on with ``min_fit_clients``): in round ``P + 1``, ``W`` is formed over the clients that
answered (at least 2, else the run stops); a client missing then has no row or column of
``W``: if it comes back it receives the plain sample-weighted mean of the non-BN arrays (the
record above, not another client's aggregate) and its replies enter that mean only. Later, a
missing client's column is dropped from every row, which is renormalised over the clients
present (as for a refused reply); its own row is still updated, so it receives its current
aggregate when it rejoins.

The site (:class:`FedAPRule`): FedAvg pre-training, one round that measures the BatchNorm
inputs, then plain local training with the BatchNorm layers kept on the site.

Rounds ``1 .. P``: FedAvg's rule. Round ``P + 1``: the site loads the whole pre-trained model
it receives (BatchNorm included, though the round's shared set no longer holds the ``bn``
group), measures per channel the mean and variance of the input of every BatchNorm layer over
one unaugmented pass of its whole training split with that model in eval mode (so the running
statistics stay as received), and sends them with its update as ``fedap_stats/<layer>/mean``
and ``fedap_stats/<layer>/var``. The moments are exact over all pixels of all cases
(population variance), accumulated in float64 by merging per-batch moments. The best
validated model is reset at that round: the deployed ``best.pt`` comes from rounds
``P + 1 .. rounds``, not from the FedAvg pre-training. Later rounds: load the personalised
non-BN arrays, train as usual.

The round configuration carries the phase (:data:`FEDAP_PHASE`: :data:`PRETRAIN`,
:data:`COLLECT` or :data:`PERSONAL`); the site derives the same phase from the round number
and :meth:`FedAPParams.fedap_pretrain`.
"""
from __future__ import annotations

from configs.round_keys import SHARE_EXCLUDE
import logging
from dataclasses import dataclass
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from clients.rules.base import LocalRule, load_whole_model
from networks.checkpoint import as_arrays, as_tensors
from networks.groups import parameter_groups
from strategies.aggregation import mean_metrics, weighted_mean
from strategies.base import PersonalizedStrategy, screen_replies, to_numpy, to_record
from strategies.flower import ArrayRecord, ConfigRecord, Grid, Message, MetricRecord

from .registry import Method, MethodParams, register_method

log = logging.getLogger("fedicra.server")

#: Prefix of the reply arrays that carry a site's BatchNorm input statistics.
STATS_PREFIX = "fedap_stats/"
#: Round-configuration key of the FedAP phase, and its values.
FEDAP_PHASE = "fedap-phase"
PRETRAIN, COLLECT, PERSONAL = "pretrain", "collect", "personal"

Stats = Mapping[str, Tuple[np.ndarray, np.ndarray]]  # BN layer name -> (mean, var) per channel


@dataclass
class FedAPParams(MethodParams):
    """FedAP's hyper-parameters (the original code's values)."""

    fedap_pretrain_rounds: int = 0  # FedAvg rounds before the BN statistics (0: a tenth of rounds, at least 1, at most rounds - 2)
    fedap_lambda: float = 0.5  # weight of the own model in each client's aggregate (the original's model_momentum)

    def fedap_pretrain(self, rounds: int) -> int:
        """FedAP's rounds of FedAvg pre-training in a run of ``rounds`` rounds:
        ``fedap_pretrain_rounds``, or with 0 a tenth of ``rounds``, at least 1 but at most
        ``rounds - 2`` (so that the statistics round and one personalised round remain: a
        2-round smoke run measures the initial model)."""
        if self.fedap_pretrain_rounds:
            return self.fedap_pretrain_rounds
        return max(0, min(max(1, rounds // 10), rounds - 2))

    def checks(self, cfg) -> Iterable[Tuple[bool, str]]:
        return [(self.fedap_pretrain_rounds >= 0,
                 "fedap_pretrain_rounds must be >= 0 (0: a tenth of rounds)"),
                (0.0 <= self.fedap_lambda <= 1.0, "fedap_lambda must lie in [0, 1]")]


def refuses(cfg) -> Optional[Tuple[str, str]]:
    """``(key, reason)`` when ``cfg`` cannot run FedAP (pre-flight), else None."""
    p = cfg.params.fedap_pretrain(cfg.rounds)
    if p + 2 > cfg.rounds:
        return "fedap_pretrain_rounds", (
            f"{cfg.params.fedap_pretrain_rounds} (= {p} rounds of FedAvg pre-training) leaves no "
            f"personalised round in a run of {cfg.rounds}: FedAP collects the statistics "
            f"in round {p + 1} and sends personalised models from round {p + 2}, so it "
            f"needs rounds >= {p + 2} (or fewer pre-training rounds)")
    if cfg.num_clients < 2:
        return "num_clients", (f"{cfg.num_clients}: FedAP weighs the other sites' models "
                               "and needs at least 2 clients")
    return None


# ====================================================================== server
def split_stats(arrays: Mapping[str, np.ndarray]
                ) -> Tuple[Dict[str, np.ndarray], Dict[str, Tuple[np.ndarray, np.ndarray]]]:
    """``arrays`` split into the model arrays and the statistics ``{layer: (mean, var)}``."""
    model = {k: v for k, v in arrays.items() if not k.startswith(STATS_PREFIX)}
    raw = {k[len(STATS_PREFIX):]: v for k, v in arrays.items() if k.startswith(STATS_PREFIX)}
    layers = sorted({k.rsplit("/", 1)[0] for k in raw})
    stats = {}
    for layer in layers:
        if f"{layer}/mean" not in raw or f"{layer}/var" not in raw:
            raise ValueError(f"FedAP statistics of layer {layer!r} lack its mean or its variance")
        stats[layer] = (np.asarray(raw[f"{layer}/mean"], np.float64),
                        np.asarray(raw[f"{layer}/var"], np.float64))
    return model, stats
def bn_distance(a: Stats, b: Stats) -> float:
    """FedAP's distance between two sites: the sum over BatchNorm layers of
    ``sqrt(||mu_a - mu_b||^2 + ||sqrt(v_a) - sqrt(v_b)||^2)`` (per layer, the 2-Wasserstein
    distance between diagonal Gaussians with these moments)."""
    if set(a) != set(b):
        raise ValueError(f"the sites' statistics cover different BatchNorm layers: "
                         f"{sorted(set(a) ^ set(b))[:3]}")
    total = 0.0
    for layer in sorted(a):
        (mu_a, var_a), (mu_b, var_b) = a[layer], b[layer]
        if mu_a.shape != mu_b.shape or var_a.shape != var_b.shape:
            raise ValueError(f"layer {layer!r}: statistics of different shapes")
        sd_a = np.sqrt(np.clip(var_a, 0.0, None))
        sd_b = np.sqrt(np.clip(var_b, 0.0, None))
        total += float(np.sqrt(np.sum((mu_a - mu_b) ** 2) + np.sum((sd_a - sd_b) ** 2)))
    return total


def fedap_weights(stats: Sequence[Stats], lam: float) -> np.ndarray:
    """FedAP's aggregation matrix ``W`` (row ``i``: the weights of client ``i``'s aggregate).

    ``W_ii = lam``; ``W_ij = (1 - lam) * (1 / d_ij) / sum_{k != i} 1 / d_ik`` for ``j != i``,
    with ``d`` from :func:`bn_distance`. Rows are convex combinations. Where some ``d_ik`` are
    0 (identical statistics) the ``1 - lam`` is shared equally by those sites, the limit of
    the formula (the original code gives them a weight of 1e14 instead of infinity).

    Parameters
    ----------
    stats : sequence of mappings
        Per client, ``{BN layer: (mean, var)}`` of the inputs of each BatchNorm layer.
    lam : float
        The own model's weight ``W_ii`` in [0, 1] (``model_momentum`` of the original code).
    """
    n = len(stats)
    if n < 2:
        raise ValueError(f"FedAP needs at least 2 clients to weigh, got {n}")
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"fedap_lambda = {lam} must lie in [0, 1]")
    d = np.zeros((n, n))
    for i in range(n):
        for j in range(i + 1, n):
            d[i, j] = d[j, i] = bn_distance(stats[i], stats[j])
    w = np.zeros((n, n))
    for i in range(n):
        others = [j for j in range(n) if j != i]
        zero = [j for j in others if d[i, j] == 0.0]
        if zero:
            inv = np.array([1.0 if j in zero else 0.0 for j in others])
        else:
            inv = np.array([1.0 / d[i, j] for j in others])
        w[i, others] = (1.0 - lam) * inv / inv.sum()
        w[i, i] = lam
    return w


def personalised_aggregates(weights: np.ndarray,
                            arrays: Sequence[Optional[Mapping[str, np.ndarray]]]
                            ) -> List[Optional[Dict[str, np.ndarray]]]:
    """Per client ``i``, ``sum_j W_ij arrays[j] / sum_j W_ij`` over the clients ``j`` whose
    arrays are given (``None``: a refused reply); ``None`` for a row with no weight left."""
    kept = [j for j, a in enumerate(arrays) if a is not None]
    if not kept:
        raise ValueError("no arrays to aggregate")
    out: List[Optional[Dict[str, np.ndarray]]] = []
    for i in range(len(arrays)):
        row = np.array([weights[i, j] for j in kept])
        out.append(weighted_mean([arrays[j] for j in kept], row) if row.sum() > 0 else None)
    return out


class FedAP(PersonalizedStrategy):
    """FedAP (Lu et al., IEEE TBD 2022): BatchNorm local, personalised weighted aggregation.

    After ``fedap_pretrain`` rounds of FedAvg (everything shared), every site measures the
    inputs of its BatchNorm layers with the pre-trained model; the distances between these
    statistics give each client ``i`` its own weights ``W_i`` (``W_ii = fedap_lambda``, the
    others by inverse distance). Every following round, client ``i`` receives
    ``sum_j W_ij theta_j`` of all non-BatchNorm arrays, and only client ``i`` receives it;
    the BatchNorm layers (weights, biases, running statistics) stay on the sites.

    Shared: everything in rounds ``1 .. P``, all but the ``bn`` group afterwards. Local: the
    ``bn`` group from round ``P + 1`` on. Deploys the personal models.

    Defaults: the plain U-Net with pCE; ``fedap_lambda = 0.5`` (the original code's
    ``model_momentum``); ``fedap_pretrain_rounds = 0``, i.e. a tenth of ``rounds`` (at least
    1, at most ``rounds - 2``) of FedAvg pre-training, see :class:`FedAPParams`.
    """

    def __init__(self, cfg, reporter=None, node_timeout: float = 600.0) -> None:
        super().__init__(cfg, reporter, node_timeout)
        #: client ids in the order of the rows and columns of :attr:`weights`
        self.cids: List[int] = []
        #: the aggregation matrix, computed once in round ``collect_round``
        self.weights: Optional[np.ndarray] = None
        #: client id -> the non-BN arrays that client receives next round
        self.personal: Dict[int, Dict[str, np.ndarray]] = {}
        self._round = 0

    # ------------------------------------------------------------------ phases
    @property
    def pretrain(self) -> int:
        """The rounds of FedAvg pre-training (:meth:`FedAPParams.fedap_pretrain`)."""
        return self.params.fedap_pretrain(self.cfg.rounds)

    @property
    def collect_round(self) -> int:
        """The round in which the sites measure their BatchNorm inputs."""
        return self.pretrain + 1

    def summary(self) -> None:
        super().summary()
        log.info("strategy FedAP: FedAvg pre-training in rounds 1..%d, BatchNorm statistics in "
                 "round %d, personalised aggregates (lambda %.3g, BN local) from round %d",
                 self.pretrain, self.collect_round, self.params.fedap_lambda,
                 self.collect_round + 1)

    def initial_arrays(self, model: nn.Module) -> Dict[str, np.ndarray]:
        if not parameter_groups(model)["bn"]:
            raise ValueError(f"FedAP: network {self.cfg.model!r} has no BatchNorm layer, so "
                             "there are no statistics to weigh the sites by")
        return super().initial_arrays(model)

    def round_config(self, server_round: int) -> Dict[str, object]:
        if server_round <= self.pretrain:
            return {FEDAP_PHASE: PRETRAIN}
        # BN stays local from the collection round on (that round's message still carries the
        # whole pre-trained model, which the site loads entirely)
        phase = COLLECT if server_round == self.collect_round else PERSONAL
        return {FEDAP_PHASE: phase, SHARE_EXCLUDE: "bn"}

    def state_dict(self) -> Dict[str, object]:
        """``W``, its client order and every client's next aggregate (a resumed run sends the
        personalised models without collecting the statistics again)."""
        return {"cids": [int(c) for c in self.cids],
                "weights": None if self.weights is None else torch.from_numpy(self.weights.copy()),
                "personal": {int(c): as_tensors(a) for c, a in self.personal.items()}}

    def load_state_dict(self, state: Mapping[str, object]) -> None:
        self.cids = [int(c) for c in state.get("cids", [])]
        weights = state.get("weights")
        self.weights = None if weights is None else weights.numpy().copy()
        self.personal = {int(c): as_arrays(a) for c, a in dict(state.get("personal", {})).items()}

    # ------------------------------------------------------------------ Flower Strategy API
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self._round = server_round
        return super().configure_train(server_round, arrays, config, grid)

    def payload_for(self, node_id: int, arrays: ArrayRecord) -> ArrayRecord:
        if self._round <= self.collect_round:
            return arrays
        cid = self.node_cid.get(int(node_id))
        if cid is None or cid not in self.personal:
            # a client missing from the collection round has no row of W
            log.warning("round %d: FedAP has no personalised aggregate for client %s (node %d; "
                        "weighed clients %s): it receives the plain mean", self._round, cid,
                        node_id, self.cids)
            return arrays
        return to_record(self.personal[cid])

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> Tuple[Optional[ArrayRecord], Optional[MetricRecord]]:
        if server_round < self.collect_round:
            return super().aggregate_train(server_round, replies)
        contents = self._valid(server_round, replies, "train")
        all_metrics = [dict(c["metrics"]) for c in contents]
        all_arrays = [to_numpy(c["arrays"]) for c in contents]
        kept, refused = screen_replies(server_round, list(zip(all_metrics, all_arrays)))
        cids = [int(m["cid"]) for m in all_metrics]
        split = [split_stats(a) for a in all_arrays]
        models = [m for m, _ in split]
        if server_round == self.collect_round:
            self._compute_weights(server_round, cids, [s for _, s in split], refused)
        else:
            outside = [c for c in cids if c not in self.cids]
            if outside:
                log.warning("round %d: client(s) %s were missing when FedAP formed W in round "
                            "%d; their replies enter only the plain mean", server_round,
                            outside, self.collect_round)
        index = {c: i for i, c in enumerate(cids)}
        kept_set = set(kept)
        # rows and columns in the order of self.cids (None: refused or missing)
        ordered = [models[index[c]] if c in index and index[c] in kept_set else None
                   for c in self.cids]
        if all(o is None for o in ordered):
            raise RuntimeError(f"round {server_round}: no client weighed by FedAP ({self.cids}) "
                               "returned a usable update; the run stops")
        for cid, agg in zip(self.cids, personalised_aggregates(self.weights, ordered)):
            if agg is not None:
                self.personal[cid] = agg
            elif cid not in self.personal:
                raise RuntimeError(f"round {server_round}: client {cid}'s row of W has no "
                                   "weight on any kept reply and no earlier aggregate")
            else:
                log.warning("round %d: client %d keeps its previous aggregate (no weight on "
                            "any kept reply)", server_round, cid)
        metrics = [all_metrics[i] for i in kept]
        sizes = [float(m["num-examples"]) for m in metrics]
        # a record of the run, deployed nowhere: the plain sample-weighted mean
        mean = weighted_mean([models[i] for i in kept], sizes)
        aggregated = mean_metrics(metrics, sizes)
        aggregated.pop("cid", None)
        aggregated["num-examples"] = float(sum(sizes))
        if all("val_dice" in m for m in all_metrics):
            aggregated["val_dice"] = float(np.mean([m["val_dice"] for m in metrics]))
        else:
            aggregated.pop("val_dice", None)
        if self.reporter is not None:
            self.reporter.record_round(server_round, all_metrics, aggregated, mean,
                                       self.cfg.num_clients,
                                       missing=self.missing_clients(all_metrics))
        return to_record(mean), MetricRecord(aggregated)

    def _compute_weights(self, server_round: int, cids: List[int], stats: List[Stats],
                         refused: Mapping[int, str]) -> None:
        missing = [cids[i] for i, s in enumerate(stats) if not s]
        if refused or missing:
            who = sorted({cids[i] for i in refused} | set(missing))
            raise RuntimeError(
                f"round {server_round}: FedAP needs the BatchNorm statistics of every client "
                f"to form its weights, but client(s) {who} sent none usable "
                f"({'; '.join(refused.values()) or 'no statistics in the reply'}); the run stops")
        absent = self.missing_clients([{"cid": c} for c in cids])
        if absent:
            log.warning("round %d: client(s) %s missing from the collection round are left out "
                        "of FedAP's weights", server_round, absent)
        if len(cids) < 2:
            raise RuntimeError(f"round {server_round}: FedAP needs the BatchNorm statistics of "
                               f"at least 2 clients to form its weights, got those of {cids}; "
                               "the run stops")
        order = sorted(range(len(cids)), key=lambda i: cids[i])
        self.cids = [cids[i] for i in order]
        self.weights = fedap_weights([stats[i] for i in order], float(self.params.fedap_lambda))
        with np.printoptions(precision=3, suppress=True):
            log.info("round %d: FedAP weights (rows: receiving client %s)\n%s", server_round,
                     self.cids, self.weights)
        if self.reporter is not None:
            for i, cid in enumerate(self.cids):
                for j, other in enumerate(self.cids):
                    self.reporter.writer.add_scalar(f"fedap/W_{cid}_{other}",
                                                    float(self.weights[i, j]), server_round)


# ====================================================================== site
class MomentAccumulator:
    """Per-channel count, mean and sum of squared deviations of tensors (N, C, ...), merged
    batch by batch in float64 (Chan et al.'s parallel update, stable where mean >> spread)."""

    def __init__(self) -> None:
        self.count = 0
        self.mean = None
        self.m2 = None

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().double().transpose(0, 1).reshape(x.shape[1], -1)  # (C, everything else)
        n = x.shape[1]
        if n == 0:
            return
        mean = x.mean(dim=1)
        m2 = ((x - mean[:, None]) ** 2).sum(dim=1)
        if self.count == 0:
            self.count, self.mean, self.m2 = n, mean, m2
            return
        total = self.count + n
        delta = mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + m2 + delta ** 2 * (self.count * n / total)
        self.count = total

    def moments(self):
        """(mean, population variance) as float64 NumPy arrays."""
        return self.mean.cpu().numpy(), (self.m2 / self.count).cpu().numpy()


def bn_input_statistics(model: torch.nn.Module, batches) -> Dict[str, tuple]:
    """``{BN module name: (mean, var)}`` of the inputs of every BatchNorm layer of ``model``
    over ``batches`` (dicts with ``image``), with the model in eval mode and no gradients."""
    layers = {name: m for name, m in model.named_modules() if isinstance(m, _BatchNorm)}
    if not layers:
        raise ValueError("FedAP: the network has no BatchNorm layer to measure")
    acc = {name: MomentAccumulator() for name in layers}
    hooks = [m.register_forward_pre_hook(lambda mod, args, name=name: acc[name].update(args[0]))
             for name, m in layers.items()]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in batches:
                model(batch["image"])
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    unused = [name for name, a in acc.items() if a.count == 0]
    if unused:
        raise ValueError(f"FedAP: BatchNorm layers {unused[:3]} saw no input in the forward pass")
    return {name: a.moments() for name, a in acc.items()}


class FedAPRule(LocalRule):
    """FedAvg's rule, plus the BatchNorm-input statistics in round ``fedap_pretrain + 1``."""

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        self._stats: Dict[str, np.ndarray] = {}

    def is_collection(self, server_round: int) -> bool:
        return server_round == self.params.fedap_pretrain(self.cfg.rounds) + 1

    def receive(self, trainer, arrays: Mapping[str, np.ndarray], shared: List[str],
                server_round: int) -> None:
        self._stats = {}
        if not self.is_collection(server_round):
            return super().receive(trainer, arrays, shared, server_round)
        load_whole_model(trainer, arrays, f"FedAP: round {server_round}", "pre-trained model")
        stats = bn_input_statistics(trainer.model, trainer.sample_batches(
            1.0, seed=self.cfg.seed * 1000 + trainer.cid))
        for name, (mean, var) in stats.items():
            self._stats[f"{STATS_PREFIX}{name}/mean"] = mean.astype(np.float64)
            self._stats[f"{STATS_PREFIX}{name}/var"] = var.astype(np.float64)
        # the deployed model comes from the FedAP phase, not from the FedAvg pre-training
        trainer.best_val = -1.0

    def extra_reply(self, trainer, server_round: int) -> Dict[str, np.ndarray]:
        stats, self._stats = self._stats, {}
        return stats if self.is_collection(server_round) else {}


FEDAP = register_method(Method(
    name="FedAP", server=FedAP, site=FedAPRule, params=FedAPParams,
    model="unet", procedure="pce", deploys="personal", refuses=refuses,
    round_keys=(FEDAP_PHASE,),
    summary="FedAvg pre-training; then BatchNorm local, per-client weights from BN statistics"))
