"""MetaFed local rule: a site of the ring learns from its predecessor's model.

MetaFed (Chen et al., "MetaFed: Federated Learning among Federations with Cyclic Knowledge
Distillation for Personalized Healthcare", IEEE TNNLS 2023; original code
``microsoft/PersonalizedFL``, ``alg/metafed.py``). The server side, which decides who teaches
whom, is ``strategies/metafed.py``. The round number fixes the stage:

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
"""
from __future__ import annotations

import copy
from typing import Dict, List, Mapping, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..evaluation import validate
from ..registry import register_rule
from .base import LocalRule

WARM_UP, RING, PERSONALISE = "warm-up", "ring", "personalise"


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


@register_rule("MetaFed")
class MetaFedRule(LocalRule):
    """Warm-up, ring rounds with copy-or-distil, personalisation; see the module docstring."""

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        #: the site is good enough to distil (validation Dice above metafed_threshold)
        self.flag = False
        #: this round's teacher (eval mode, frozen); kept until the next round
        self.teacher: Optional[nn.Module] = None
        #: this round's distillation weight
        self.lam = float(cfg.metafed_lambda)
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
        self.lam = float(self.cfg.metafed_lambda)
        if stage == PERSONALISE:
            own = self.score(trainer, trainer.model)
            taught = self.score(trainer, self.teacher)
            self.lam = personal_lambda(own, taught, self.cfg.metafed_lambda,
                                       self.cfg.metafed_teacher_threshold)
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
            if self.score(trainer, trainer.model) > self.cfg.metafed_threshold:
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
