"""MetaFed: cyclic knowledge distillation around a ring of sites, no central model.

Chen et al., "MetaFed: Federated Learning among Federations with Cyclic Knowledge
Distillation for Personalized Healthcare", IEEE TNNLS 2023 (original code
``microsoft/PersonalizedFL``, ``alg/metafed.py``). The server half is :class:`MetaFed`, which
decides who teaches whom; the site half is :class:`MetaFedRule`: a site of the ring learns from
its predecessor's model. The round number fixes the stage:

- round 1, warm-up: load the common initial model, train ``iters`` steps alone.
- rounds 2 .. ``rounds``, common-knowledge accumulation: the message carries the teacher (the
  whole model the predecessor in the ring has just produced; nothing for the very first site of
  the first pass). Without a teacher the site trains alone. A site whose flag is off copies the
  teacher's weights into its own model (every entry but ``num_batches_tracked``) and trains
  without distillation, as the original's ``trainwithteacher`` does; a site whose flag is on
  keeps its own weights and trains on its loss + ``lambda * MSE(f_site, f_teacher)``, where
  ``f`` is the penultimate feature map (``SegOutput.decoder_features``, the input of the output
  convolution; the original's ``plan = 1`` takes the input of the last classifier layer) and
  the teacher runs in eval mode without gradient.
- round ``rounds + 1``, personalisation: the teacher is the last model of the ring. Before
  training, the site scores its own model (``v_site``) and the teacher (``v_teacher``) on its
  validation split; the weight is 0 when ``v_teacher <= v_site`` and ``v_teacher <
  metafed_teacher_threshold``, else ``10 ** min(1, 5 (v_teacher - v_site)) / 10 *
  metafed_lambda``. The flag decides copy versus distillation as in the other rounds.

The flag (personal state, saved with the trainer) turns on when the site's validation Dice
after a round of the first two stages exceeds ``metafed_threshold`` and never turns off (the
original's ``init_model_flag`` / ``update_flag``). Validation uses the site's validation split,
never its test set.

Learning rate: the run's poly decay spans the ``rounds + 1`` rounds (``(rounds + 1) * iters``
steps), so the personalisation round trains at the end of the decay like any last round.

The round configuration carries the stage (:data:`METAFED_STAGE`: :data:`WARM_UP`,
:data:`RING` or :data:`PERSONALISE`) and the client id of the message's teacher
(:data:`METAFED_TEACHER`, -1: none); the site derives the same stage from the round number
(:func:`metafed_stage`).
"""
from __future__ import annotations

from configs.round_keys import SERVER_ROUND, SHARE_EXCLUDE, SHARE_INCLUDE
import copy
import logging
from dataclasses import dataclass
from typing import Dict, Iterable, List, Mapping, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clients.evaluation import validate
from clients.rules.base import LocalRule
from networks.groups import select_keys
from strategies.aggregation import mean_metrics
from strategies.base import PersonalizedStrategy, screen_replies, to_numpy, to_record
from strategies.flower import (ArrayRecord, ConfigRecord, Grid, Message, MessageType,
                               MetricRecord, RecordDict)

from .registry import Method, MethodParams, register_method

log = logging.getLogger("fedicra.server")

#: The stages of a MetaFed run.
WARM_UP, RING, PERSONALISE = "warm-up", "ring", "personalise"
#: Round-configuration keys: the round's stage, and the client id of the message's teacher.
METAFED_STAGE = "metafed-stage"
METAFED_TEACHER = "metafed-teacher"


@dataclass
class MetaFedParams(MethodParams):
    """MetaFed's hyper-parameters (see :class:`MetaFed` for the choice of the defaults)."""

    metafed_lambda: float = 1.0  # weight of the feature-distillation MSE (the original's --lam default)
    metafed_threshold: float = 0.6  # validation Dice above which a site distils from its teacher instead of copying it (1: always copy)
    metafed_teacher_threshold: float = 0.5  # personalisation: a teacher no better than the site and below this Dice teaches with weight 0

    def checks(self, cfg) -> Iterable[Tuple[bool, str]]:
        return [(self.metafed_lambda >= 0.0, "metafed_lambda must be >= 0"),
                (0.0 <= self.metafed_threshold <= 1.0,
                 "metafed_threshold must lie in [0, 1] (a validation Dice; 1: never distil, "
                 "always copy)"),
                (0.0 <= self.metafed_teacher_threshold <= 1.0,
                 "metafed_teacher_threshold must lie in [0, 1] (a validation Dice)")]


def refuses(cfg) -> Optional[Tuple[str, str]]:
    """``(key, reason)`` when ``cfg`` cannot run MetaFed (pre-flight), else None."""
    if cfg.num_clients < 2:
        return "num_clients", (f"{cfg.num_clients}: MetaFed passes models around a ring of "
                               "sites and needs at least 2 clients")
    if cfg.rounds < 2:
        return "rounds", (f"{cfg.rounds}: MetaFed needs rounds >= 2 (round 1 is the warm-up, "
                          "rounds 2.. are the passes around the ring, round rounds + 1 the "
                          "personalisation)")
    return None


# ====================================================================== server
def passes_on(metrics: Mapping[str, float], arrays: Mapping[str, np.ndarray]) -> bool:
    """Whether a ring reply may teach the next site: a whole, finite model from a site that
    did not reject its own round."""
    if metrics.get("diverged") or not arrays:
        return False
    return all(np.isfinite(a).all() for a in arrays.values() if np.issubdtype(a.dtype, np.floating))


class MetaFed(PersonalizedStrategy):
    """Cyclic knowledge distillation (MetaFed): sites teach each other in a ring.

    Stages and rounds
    -----------------
    Round 1, warm-up: every site receives the same initial model and trains ``iters`` steps
    alone (the original's ``init_model_flag``); from its validation Dice it sets its flag
    (``metafed_threshold``). The replies carry no arrays; they tell the server which node is
    which client.

    Rounds 2 .. ``rounds``, common-knowledge accumulation: one pass around the ring per round,
    in client-id order, one site at a time. Site ``k`` receives the whole model site ``k - 1``
    has just returned in this pass; site 0 receives the last site's model of the previous pass
    (nothing in round 2: no teacher at the very start). A site whose flag is off copies its
    teacher and trains on its own loss; a site whose flag is on trains on its loss +
    ``metafed_lambda * MSE`` between its penultimate features and those of the detached
    teacher. Every site trains ``iters`` steps per round, as in the other methods.

    Round ``rounds + 1``, personalisation: every site receives the last model of the ring and
    learns from it with ``metafed_lambda`` scaled by how much better that model is on the
    site's validation split (0 when it is no better and below ``metafed_teacher_threshold``).
    Each site keeps its best validated model over all rounds as ``client<k>/best.pt``.

    What is shared and what stays local
    -----------------------------------
    There is no central model and nothing is averaged. Each site's model stays on the site
    between rounds; what travels is only the teacher: a site's whole model (every
    ``state_dict`` entry) goes to the server and on to the next site in the ring, and the last
    ring model goes to every site for the personalisation. The flag stays on the site.
    ``global/latest.pt`` holds the last model of the ring after each pass (the model that
    travels on), not a deployed model: the method deploys the personal models.

    Lost sites
    ----------
    The ring skips a site that is missing (it errs, stays silent past the round deadline or
    is not connected): the next site learns from the last model that came back, and the pass
    counts when at least ``min_fit_clients`` sites took their step (else the run stops, as in
    every method). A site missing from the warm-up keeps its flag off until it validates
    above the threshold; one missing from the personalisation keeps its model of the last
    pass. A site that comes back takes its place in the ring again (by client id).

    Defaults: the plain U-Net with pCE as the other baselines; ``metafed_lambda = 1`` (the
    original's ``--lam``); ``metafed_threshold = 0.6`` on validation Dice (the original's
    default is 0.6 on classification accuracy: here a site distils once its Dice is clearly
    above what an untrained or trivial prediction scores on FAZ and the fundus structures,
    well below the 0.8-0.9 trained weakly supervised models reach, and copies its teacher
    until then); ``metafed_teacher_threshold = 0.5`` (the original's value for every dataset
    except VLCS and PACS).

    Parameters
    ----------
    cfg : RunConfig
        The run configuration.
    reporter : RunReporter, optional
        Where rounds are recorded.
    node_timeout : float
        Seconds to wait for ``cfg.num_clients`` nodes.
    """

    def __init__(self, cfg, reporter=None, node_timeout: float = 600.0) -> None:
        super().__init__(cfg, reporter, node_timeout)
        #: contents of this pass's replies before the last site's, in ring order
        self._ring: List[RecordDict] = []
        #: client id of each message's teacher in this pass (-1: none)
        self.teachers: Dict[int, int] = {}
        #: client id of the last ring model, the teacher of the next pass (-1: none yet)
        self._last_cid = -1

    # ------------------------------------------------------------------ stages
    @property
    def personalise_round(self) -> int:
        return self.cfg.rounds + 1

    def stage(self, server_round: int) -> str:
        if server_round == 1:
            return WARM_UP
        if 2 <= server_round <= self.cfg.rounds:
            return RING
        if server_round == self.personalise_round:
            return PERSONALISE
        raise ValueError(f"MetaFed: no round {server_round} in a run of {self.cfg.rounds} rounds")

    def initial_arrays(self, model: nn.Module) -> Dict[str, np.ndarray]:
        """The whole initial model: every site starts from it (the warm-up round)."""
        sd = model.state_dict()
        return {k: sd[k].detach().cpu().numpy().copy() for k in select_keys(model, ["all"])}

    def round_config(self, server_round: int) -> Dict[str, object]:
        # ring rounds reply with the whole model; the others send nothing back
        share = "all" if self.stage(server_round) == RING else ""
        return {METAFED_STAGE: self.stage(server_round), SHARE_INCLUDE: share,
                SHARE_EXCLUDE: ""}

    def summary(self) -> None:
        log.info("strategy MetaFed: %d clients in a ring; round 1 warm-up, rounds 2..%d one pass "
                 "each, round %d personalisation; lambda %g, flag threshold %g (validation Dice)",
                 self.cfg.num_clients, self.cfg.rounds, self.personalise_round,
                 self.params.metafed_lambda, self.params.metafed_threshold)

    def state_dict(self) -> Dict[str, object]:
        """The client whose model ended the last pass (the next pass's first teacher); the
        model itself is the round's aggregate in ``global/latest.pt``."""
        return {"last_cid": int(self._last_cid)}

    def load_state_dict(self, state: Mapping[str, object]) -> None:
        self._last_cid = int(state.get("last_cid", -1))

    # ------------------------------------------------------------------ messages
    def ring_order(self) -> List[int]:
        """Node ids sorted by client id (learnt from the warm-up replies)."""
        unknown = [n for n in self.node_ids if n not in self.node_cid]
        if unknown:
            raise RuntimeError(f"MetaFed: client ids of nodes {unknown} unknown; the warm-up "
                               "round's replies should have named them")
        if not self.node_ids:
            raise RuntimeError("MetaFed: no site is connected to form the ring; the run stops")
        return sorted(self.node_ids, key=lambda n: self.node_cid[n])

    def _message(self, node: int, arrays: ArrayRecord, config: ConfigRecord,
                 teacher_cid: int) -> Message:
        values = dict(config.items())
        values[METAFED_TEACHER] = teacher_cid
        self.teachers[node] = teacher_cid
        if values.get(METAFED_STAGE) == RING:
            log.info("round %s: ring step of client %d (teacher: %s)", values[SERVER_ROUND],
                     self.node_cid[node], "none" if teacher_cid < 0 else f"client {teacher_cid}")
        return Message(RecordDict({"arrays": arrays, "config": ConfigRecord(values)}),
                       dst_node_id=node, message_type=MessageType.TRAIN)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """Warm-up and personalisation: one message per node. A ring pass: every site but the
        last is sent, one at a time, from here (each message carries the previous reply); the
        last site's message is returned for Flower's round loop to send."""
        nodes = self.wait_for_nodes(grid, server_round, config)
        msg_config = self.message_config(config, server_round)
        stage = self.stage(server_round)
        self.teachers = {}
        if stage != RING:
            if stage == PERSONALISE and not len(arrays):
                raise RuntimeError("MetaFed: no ring model to personalise from")
            teacher = -1 if stage == WARM_UP else self._last_cid
            self._sent = len(nodes)
            return [self._message(n, arrays, msg_config, teacher) for n in nodes]
        order = self.ring_order()
        # the previous pass's last model (nothing after the warm-up)
        teacher, teacher_cid = arrays, (self._last_cid if len(arrays) else -1)
        self._ring = []
        for node in order[:-1]:
            msg = self._message(node, teacher, msg_config, teacher_cid)
            self._sent = 1
            got = self._valid(server_round, grid.send_and_receive([msg], timeout=self.timeout),
                              f"ring step of client {self.node_cid[node]}", minimum=0)
            if not got:  # skipped: the next site learns from the last model that came back
                log.warning("round %d: client %d is missing from the ring; client %d learns "
                            "from %s instead", server_round, self.node_cid[node],
                            self.node_cid[order[order.index(node) + 1]],
                            "no teacher" if teacher_cid < 0 else f"client {teacher_cid}'s model")
                continue
            content = got[0]
            self._ring.append(content)
            if passes_on(dict(content["metrics"]), to_numpy(content["arrays"])):
                teacher, teacher_cid = content["arrays"], self.node_cid[node]
            else:
                log.warning("round %d: client %d's model is refused; client %d learns from "
                            "client %d's instead", server_round, self.node_cid[node],
                            self.node_cid[order[order.index(node) + 1]], teacher_cid)
        self._sent = 1
        return [self._message(order[-1], teacher, msg_config, teacher_cid)]

    # ------------------------------------------------------------------ replies
    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> Tuple[Optional[ArrayRecord], Optional[MetricRecord]]:
        stage = self.stage(server_round)
        if stage == WARM_UP:
            return self._record_warm_up(server_round, replies)
        if stage == PERSONALISE:
            return self._record_personalisation(server_round, replies)
        contents = self._ring + self._valid(server_round, replies, "ring step of the last client",
                                            minimum=0)
        self._ring = []
        if len(contents) < self.cfg.min_fit:
            raise RuntimeError(
                f"round {server_round} ring: {len(contents)} of {self.cfg.num_clients} clients "
                f"took their ring step, fewer than the {self.cfg.min_fit} needed "
                f"(min_fit_clients = {self.cfg.min_fit_clients}, 0: all but one); the run "
                "stops, its last completed round is on disk (global/latest.pt, "
                "client<k>/latest.pt)")
        all_metrics = [dict(c["metrics"]) for c in contents]
        all_arrays = [to_numpy(c["arrays"]) for c in contents]
        kept, _ = screen_replies(server_round, list(zip(all_metrics, all_arrays)))
        kept = [i for i in kept if passes_on(all_metrics[i], all_arrays[i])]
        if not kept:
            raise RuntimeError(f"round {server_round}: no site of the ring returned a usable "
                               "model; the run stops")
        last = kept[-1]  # ring order: the model the next pass starts from
        self._last_cid = int(all_metrics[last]["cid"])
        summary = self._summary([all_metrics[i] for i in kept])
        if self.reporter is not None:
            self.reporter.record_round(server_round, all_metrics, summary, all_arrays[last],
                                       self.cfg.num_clients,
                                       missing=self.missing_clients(all_metrics))
        return to_record(all_arrays[last]), MetricRecord(summary)

    @staticmethod
    def _summary(metrics: List[Dict[str, float]]) -> Dict[str, float]:
        """Sample-weighted means of the sites' metrics; validation Dice as a plain mean."""
        weights = [float(m.get("num-examples", 0.0)) for m in metrics]
        summary = mean_metrics(metrics, weights) if sum(weights) > 0 else {}
        summary.pop("cid", None)
        summary["num-examples"] = float(sum(weights))
        for key in ("val_dice",):
            if metrics and all(key in m for m in metrics):
                summary[key] = float(np.mean([m[key] for m in metrics]))
            else:
                summary.pop(key, None)
        return summary

    def _record_warm_up(self, server_round: int, replies: Iterable[Message]):
        contents = self._valid(server_round, replies, "warm-up")  # learns node -> client id
        all_metrics = [dict(c["metrics"]) for c in contents]
        kept, _ = screen_replies(server_round, [(m, {}) for m in all_metrics])
        summary = self._summary([all_metrics[i] for i in kept])
        if self.reporter is not None:
            self.reporter.record_round(server_round, all_metrics, summary, {}, self.cfg.num_clients,
                                       missing=self.missing_clients(all_metrics))
        # empty: round 2's first site has no teacher
        return ArrayRecord(), MetricRecord(summary)

    def _record_personalisation(self, server_round: int, replies: Iterable[Message]):
        contents = self._valid(server_round, replies, "personalisation")
        metrics = [dict(c["metrics"]) for c in contents]
        for m in metrics:
            if m.get("diverged"):
                log.warning("personalisation: client %d diverged and kept its model of round %d",
                            int(m.get("cid", -1)), self.cfg.rounds)
        summary = self._summary([m for m in metrics if not m.get("diverged")])
        if self.reporter is not None:
            self.reporter.write_rows(server_round, metrics, self.missing_clients(metrics))
            for key, value in summary.items():
                if key != "num-examples":
                    self.reporter.writer.add_scalar(f"server/personalise_{key}", value, server_round)
            self.reporter.writer.flush()
            val = summary.get("val_dice")
            log.info("personalisation (round %d) | clients %d/%d | val dice %s", server_round,
                     len(metrics), self.cfg.num_clients, "-" if val is None else f"{val:.4f}")
        # None: Flower keeps the last ring model; no global checkpoint is written
        return None, MetricRecord(summary)


# ====================================================================== site
def metafed_stage(server_round: int, rounds: int) -> str:
    """The MetaFed stage of ``server_round`` in a run of ``rounds`` rounds (plus one)."""
    if server_round == 1:
        return WARM_UP
    if 2 <= server_round <= rounds:
        return RING
    if server_round == rounds + 1:
        return PERSONALISE
    raise ValueError(f"MetaFed: round {server_round} requested, but the run has {rounds} rounds "
                     f"and personalises in round {rounds + 1}")


def personal_lambda(own: float, teacher: float, lam: float, teacher_threshold: float) -> float:
    """Distillation weight of the personalisation stage (the original's formula).

    0 when the teacher scores no better than the site and below ``teacher_threshold``; else
    ``lam`` times ``10 ** min(1, 5 * (teacher - own)) / 10``, which is ``lam`` when the teacher
    is at least 0.2 better, ``lam / 10`` when both are equal and smaller still when the teacher
    is worse.
    """
    if teacher <= own and teacher < teacher_threshold:
        return 0.0
    return float(10.0 ** min(1.0, (teacher - own) * 5.0) / 10.0 * lam)


def feature_distillation(student_features: Tensor, teacher: nn.Module, image: Tensor,
                         lam: float, amp: bool = False) -> Tensor:
    """``lam * MSE(student_features, teacher(image).decoder_features)``; the teacher runs in
    eval mode without gradient, so only the student receives a gradient."""
    teacher.eval()
    with torch.no_grad(), torch.autocast(image.device.type, dtype=torch.bfloat16, enabled=amp):
        target = teacher(image).decoder_features
    return lam * F.mse_loss(student_features.float(), target.detach().float())


class MetaFedRule(LocalRule):
    """Warm-up, ring rounds with copy-or-distil, personalisation; see the module docstring."""

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        #: the site is good enough to distil (validation Dice above metafed_threshold)
        self.flag = False
        #: this round's teacher (eval mode, frozen); kept until the next round
        self.teacher: Optional[nn.Module] = None
        #: this round's distillation weight
        self.lam = float(self.params.metafed_lambda)
        #: validation Dice of the site and of the teacher before the personalisation
        self.scores: Dict[str, float] = {}

    def stage(self, server_round: int) -> str:
        return metafed_stage(server_round, self.cfg.rounds)

    # ------------------------------------------------------------------ receiving
    def receive(self, trainer, arrays: Mapping[str, np.ndarray], shared: List[str],
                server_round: int) -> None:
        stage = self.stage(server_round)
        # one poly decay over warm-up, ring rounds and personalisation
        trainer.total_steps = (self.cfg.rounds + 1) * self.cfg.iters
        keys = trainer.keys(["all"])
        if arrays:
            missing = [k for k in keys if k not in arrays]
            if missing:
                raise ValueError(f"MetaFed: round {server_round} must carry a whole model; "
                                 f"{len(missing)} of {len(keys)} arrays are missing "
                                 f"(e.g. {missing[0]!r})")
        self.teacher = None
        self.scores = {}
        if stage == WARM_UP:
            if arrays:  # the common initial model (the original deep-copies one server model)
                trainer.load_arrays(arrays, keys)
            return
        if not arrays:
            if stage == PERSONALISE:
                raise ValueError("MetaFed: the personalisation round must carry the last model "
                                 "of the ring")
            return  # the first site of the first pass has no teacher
        self.teacher = self.build_teacher(trainer, arrays, keys)
        self.lam = float(self.params.metafed_lambda)
        if stage == PERSONALISE:
            own = self.score(trainer, trainer.model)
            taught = self.score(trainer, self.teacher)
            self.lam = personal_lambda(own, taught, self.params.metafed_lambda,
                                       self.params.metafed_teacher_threshold)
            self.scores = {"metafed_own_val_dice": own, "metafed_teacher_val_dice": taught}
        if not self.flag:
            copy_weights(self.teacher, trainer.model)

    @staticmethod
    def build_teacher(trainer, arrays: Mapping[str, np.ndarray], keys: List[str]) -> nn.Module:
        """The received model in a frozen copy of the site's network (same site code)."""
        own = trainer.model
        teacher = copy.deepcopy(own)
        trainer.model = teacher
        try:
            trainer.load_arrays(arrays, keys)
        finally:
            trainer.model = own
        teacher.eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
        return teacher

    @staticmethod
    def score(trainer, model: nn.Module) -> float:
        value, _ = validate(model, trainer.val_set, trainer.cid, trainer.device,
                            img_size=trainer.cfg.img_size)
        return float(value)

    # ------------------------------------------------------------------ training
    def local_train(self, trainer, server_round: int) -> Dict[str, float]:
        stage = self.stage(server_round)
        distils = self.teacher is not None and self.flag
        if distils:
            metrics = self.distil(trainer, self.cfg.iters)
        else:
            metrics = trainer.run_iterations(self.cfg.iters, lambda name: True)
        metrics["metafed_flag"] = float(self.flag)
        metrics["metafed_lambda"] = self.lam if distils else 0.0
        metrics.update(self.scores)
        if stage != PERSONALISE and not self.flag and not trainer.divergence(metrics):
            # the original's init_model_flag / update_flag: on once good enough, never off
            if self.score(trainer, trainer.model) > self.params.metafed_threshold:
                self.flag = True
        return metrics

    def distil(self, trainer, iters: int) -> Dict[str, float]:
        """``iters`` steps on the objective + ``lam * MSE`` to the teacher's features; the
        student's features come from the training forward itself (a forward hook)."""
        seen: Dict[str, Tensor] = {}

        def keep(module, args, kwargs, output) -> None:
            if "features" not in seen:  # the step's first forward: the one the loss uses
                seen["image"] = args[0] if args else kwargs["x"]
                seen["features"] = output.decoder_features

        def term(model: nn.Module) -> Tensor:
            image, features = seen.pop("image"), seen.pop("features")
            return feature_distillation(features, self.teacher, image, self.lam,
                                        amp=self.cfg.amp)

        handle = trainer.model.register_forward_hook(keep, with_kwargs=True)
        try:
            return trainer.run_iterations(iters, lambda name: True, extra_loss=term)
        finally:
            handle.remove()

    # ------------------------------------------------------------------ personal state
    def state_dict(self) -> Dict[str, object]:
        return {"flag": self.flag}

    def load_state_dict(self, state: Mapping[str, object], device: torch.device) -> None:
        self.flag = bool(state.get("flag", False))


def copy_weights(source: nn.Module, target: nn.Module) -> None:
    """Every state entry of ``source`` into ``target`` except the BatchNorm step counters."""
    with torch.no_grad():
        target_state = target.state_dict()
        for key, value in source.state_dict().items():
            if not key.endswith("num_batches_tracked"):
                target_state[key].copy_(value)


METAFED = register_method(Method(
    name="MetaFed", server=MetaFed, site=MetaFedRule, params=MetaFedParams,
    model="unet", procedure="pce", deploys="personal", refuses=refuses,
    extra_rounds=1,  # the personalisation round
    round_keys=(METAFED_STAGE, METAFED_TEACHER),
    summary="cyclic knowledge distillation around a ring of sites, then personalisation"))
