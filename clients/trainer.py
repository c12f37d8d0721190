"""One site's trainer: data, device, model, optimiser, schedule position and personal state.

The same object serves the simulation (kept alive inside the ClientApp process) and the
deployment workers. Everything it needs to resume lives in :meth:`SiteTrainer.state_dict`.
"""
from __future__ import annotations

import copy
import logging
import time
from pathlib import Path
from typing import Callable, Dict, Iterable, Mapping, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from configs.round_keys import SERVER_ROUND, SHARE_EXCLUDE, SHARE_INCLUDE, VALIDATE_GLOBAL
from configs import RunConfig
from configs.devices import pick_device
from dataloaders.dataset import InfiniteBatches, PrefetchBatches, SiteDataset
from dataloaders.tasks import get_task
from losses.objective import WeakObjective
from networks.checkpoint import copy_atomic, load_checkpoint, run_meta, save_atomic
from networks.factory import build_for_run
from networks.groups import select_keys
from networks.outputs import SegOutput

from .evaluation import validate
from .steps import StepTrainer, objective_config, poly_lr  # noqa: F401 - poly_lr: clients.trainer.poly_lr

log = logging.getLogger("fedicra.client")

Batch = Dict[str, Tensor]


def _groups(config: Mapping[str, object], key: str) -> list:
    return [g for g in str(config.get(key, "")).split(",") if g]


def batch_to(image: Tensor, label: Tensor, device: torch.device, size: int) -> Tuple[Tensor, Tensor]:
    """Images (B, C, H, W) and labels (B, H, W) on ``device``, resized to ``size`` x ``size``
    (bilinear images, nearest labels) when ``size`` is set and differs."""
    image = image.to(device, non_blocking=True)
    label = label.to(device, non_blocking=True)
    if size and tuple(image.shape[-2:]) != (size, size):
        image = F.interpolate(image, size=(size, size), mode="bilinear", align_corners=False)
        label = F.interpolate(label[:, None].float(), size=(size, size), mode="nearest")[:, 0].long()
    return image, label


def is_global_eval_round(server_round: int, eval_every: int) -> bool:
    """Whether the global model received in ``server_round`` (the aggregate of round
    ``server_round - 1``) is validated: the aggregates of rounds ``eval_every``,
    ``2 * eval_every``, ...; the last aggregate is validated by the final evaluate message."""
    return server_round > 1 and (server_round - 1) % eval_every == 0


def float32_output(out: SegOutput) -> SegOutput:
    """``out`` with every floating tensor in float32 (autocast leaves bf16 activations).

    The losses then run in float32: the tree filter's products of edge weights, the gated
    CRF's kernel sums and the softmax would lose too much in bf16 (8 bits of mantissa).
    """
    def f32(t: Optional[Tensor]) -> Optional[Tensor]:
        return t.float() if t is not None and t.is_floating_point() else t

    return SegOutput(logits=f32(out.logits), aux_logits=tuple(f32(a) for a in out.aux_logits),
                     gates=f32(out.gates), features=f32(out.features),
                     decoder_features=f32(out.decoder_features))


class SiteTrainer(StepTrainer):
    """Trainer of client ``cid`` (site index = client id).

    Parameters
    ----------
    cfg : RunConfig
        The run's configuration (the trainer reads data, model, objective and schedule from it).
    cid : int
        Client id, also the site index (``Domain{cid+1}``) and the site code of the PCS gates.
    device : str
        ``''`` picks CUDA when visible, else CPU.
    """

    def __init__(self, cfg: RunConfig, cid: int, device: str = "") -> None:
        self.cfg = cfg
        self.cid = cid
        self.task = get_task(cfg.img_class, cfg.root_path)
        if not 0 <= cid < min(cfg.num_clients, self.task.num_sites):
            raise ValueError(
                f"client id {cid} out of range: num_clients={cfg.num_clients}, "
                f"task {self.task.name!r} has {self.task.num_sites} sites"
            )
        self.device = pick_device(device)
        form = cfg.label_form or None
        common = dict(task=self.task, site=cid, val_fraction=cfg.val_fraction, seed=cfg.seed)
        self.train_set = SiteDataset(cfg.root_path, split="train", label_form=form, augment=True,
                                     rotate_order=cfg.rotate_order, rotate_fill=cfg.rotate_fill,
                                     **common)
        self.val_set = SiteDataset(cfg.root_path, split="val", **common)
        self.model = build_for_run(cfg, cid).to(self.device)
        self.objective = WeakObjective(objective_config(cfg))
        self.optimizer = self.new_optimizer()
        # prefetching builds the same batches on background threads (same seed, same state)
        stream = InfiniteBatches(self.train_set, cfg.batch_size, seed=cfg.seed * 1000 + cid)
        self.batches = stream if cfg.prefetch == 0 else PrefetchBatches(
            stream, cfg.prefetch, pin_memory=self.device.type == "cuda")
        self.rule = cfg.method.site(cfg)  # the method's site half (methods/registry.py)
        self.step = 0
        self.rounds_done = 0
        self.best_val = -1.0
        self.total_steps = cfg.rounds * cfg.iters
        self._writer = None
        #: TensorBoard step from which earlier events are hidden (set when resumed from a
        #: checkpoint: the steps of an interrupted round are logged again)
        self._purge_step: Optional[int] = None

    # ------------------------------------------------------------------ paths and logging
    @property
    def client_dir(self) -> Path:
        return self.cfg.out_dir / f"client{self.cid}"

    @property
    def tb_dir(self) -> Path:
        return self.cfg.out_dir / "tb" / f"client{self.cid}"

    @property
    def stream_id(self) -> int:
        return self.cid

    # ------------------------------------------------------------------ data
    def next_batch(self) -> Batch:
        batch = next(self.batches)
        return self.to_device(batch["image"], batch["label"])

    def to_device(self, image: Tensor, label: Tensor) -> Batch:
        """Move a batch to the trainer's device, resized to ``img_size`` when one is set."""
        image, label = batch_to(image, label, self.device, self.cfg.img_size)
        return {"image": image, "label": label}

    def sample_batches(self, fraction: float, seed: int) -> Iterable[Batch]:
        """One pass over a random ``fraction`` of the training cases (no augmentation)."""
        rng = np.random.default_rng(seed)
        n = len(self.train_set)
        chosen = rng.permutation(n)[: max(1, int(round(fraction * n)))]
        for start in range(0, len(chosen), self.cfg.batch_size):
            samples = [self.train_set.arrays(int(i)) for i in chosen[start:start + self.cfg.batch_size]]
            image = torch.from_numpy(np.stack([s.image for s in samples]).astype(np.float32))
            label = torch.from_numpy(np.stack([s.label for s in samples]).astype(np.int64))
            yield self.to_device(image, label)

    # ------------------------------------------------------------------ state exchange
    def state_of(self, keys: Iterable[str]) -> Dict[str, np.ndarray]:
        sd = self.model.state_dict()
        return {k: sd[k].detach().cpu().numpy().copy() for k in keys}

    def load_arrays(self, arrays: Mapping[str, np.ndarray], keys: Iterable[str],
                    model: Optional[nn.Module] = None) -> None:
        """Copy ``arrays[k]`` into the model (``model``, default the site's) for every ``k``
        in ``keys`` (shape-checked)."""
        sd = (self.model if model is None else model).state_dict()
        for k in keys:
            if k not in arrays:
                raise KeyError(f"client {self.cid}: received arrays lack {k!r}")
            value = torch.as_tensor(np.asarray(arrays[k]))
            if value.dim() == 1 and value.numel() == 1 and sd[k].dim() == 0:
                value = value.reshape(())  # Flower transports 0-d arrays as shape (1,)
            if tuple(value.shape) != tuple(sd[k].shape):
                raise ValueError(
                    f"client {self.cid}: array {k!r} has shape {tuple(value.shape)}, "
                    f"model expects {tuple(sd[k].shape)}"
                )
            sd[k].copy_(value.to(sd[k].dtype))

    def keys(self, include: Iterable[str], exclude: Iterable[str] = ()) -> list:
        return select_keys(self.model, list(include), list(exclude))

    # ------------------------------------------------------------------ training
    def forward_loss(self, batch: Batch, extra_loss: Optional[Callable[[nn.Module], Tensor]] = None
                     ) -> Tuple[Tensor, Dict[str, object]]:
        """Network forward (bf16 autocast when ``cfg.amp``) and the objective in float32.

        Parameters
        ----------
        batch : dict
            ``image`` (B, C, H, W) and ``label`` (B, H, W) on the trainer's device.
        extra_loss : callable, optional
            Added to the objective (e.g. FedProx's proximal term), computed in float32.

        Returns
        -------
        loss : Tensor
            Scalar with graph.
        terms : dict
            The objective's unweighted terms as floats, then ``extra`` (when given) and
            ``total`` as detached 0-d tensors, left on the device (no synchronisation).
        """
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cfg.amp):
            out = self.model(batch["image"])
        if self.cfg.amp:
            out = float32_output(out)
        result = self.objective(self.model, out, batch["image"], batch["label"],
                                site=self.cid, num_sites=self.cfg.num_clients)
        loss = result.total
        terms: Dict[str, object] = dict(result.terms)
        if extra_loss is not None:
            extra = extra_loss(self.model)
            loss = loss + extra
            terms["extra"] = extra.detach()
        terms["total"] = loss.detach()
        return loss, terms

    def run_iterations(self, n: int, trainable: Callable[[str], bool],
                       extra_loss: Optional[Callable[[nn.Module], Tensor]] = None) -> Dict[str, float]:
        """``n`` optimiser steps on the parameters for which ``trainable(name)`` holds.

        Frozen parameters get ``requires_grad=False`` and no gradient tensor, so AdamW leaves
        them (and their moments) untouched: no weight decay on frozen weights.

        The loop itself never waits for the device: the terms that live on it (``total``,
        ``extra``) are kept as tensors and fetched in one transfer after the last step, when
        every step's TensorBoard scalars (``loss/<term>``, ``lr``, at their own step numbers)
        are written. The objective's own terms arrive as floats (see
        :class:`losses.objective.ObjectiveResult`).
        """
        params = dict(self.model.named_parameters())
        for name, p in params.items():
            p.requires_grad_(bool(trainable(name)))
        try:
            return self.run_steps(n, lambda batch: self.forward_loss(batch, extra_loss))
        finally:
            for p in params.values():
                p.requires_grad_(True)

    def train(self, arrays: Mapping[str, np.ndarray], config: Mapping[str, object]
              ) -> Tuple[Dict[str, np.ndarray], Dict[str, float]]:
        """One federated round: merge the received arrays, train, validate, checkpoint.

        Returns the arrays to send back (only those the strategy shares) and the metrics.
        """
        start = time.perf_counter()
        server_round = int(config[SERVER_ROUND])
        self.seed_round(server_round)
        shared = self.keys(_groups(config, SHARE_INCLUDE), _groups(config, SHARE_EXCLUDE))
        last_good = copy.deepcopy(self.state_dict())
        global_metrics = {}
        if config.get(VALIDATE_GLOBAL) and is_global_eval_round(server_round, self.cfg.eval_every):
            global_metrics = self.validate_global(arrays, shared)
        received = self.rule.receive(self, arrays, shared, server_round) or {}
        if self.cfg.reset_optimizer:
            self.optimizer = self.new_optimizer()
        metrics = self.rule.local_train(self, server_round)
        metrics.update(global_metrics)
        metrics.update(received)
        problem = self.divergence(metrics)
        if problem:
            return {}, self.reject_round(server_round, last_good, problem, start)
        self.rounds_done = server_round
        is_last = server_round >= self.cfg.rounds
        if (server_round % self.cfg.eval_every == 0 or is_last) and self.rule.validates_trained_model:
            metrics.update(self.validate_and_checkpoint(server_round, is_last))
        self.save_latest()
        if self._writer is not None:
            # every round's events on disk before the next round, which may run in another
            # process of the Simulation Engine: one ordered stream per client
            self._writer.flush()
        metrics["seconds"] = time.perf_counter() - start
        log.info("client %d round %d: loss %.4f, val dice %s, %.1f s", self.cid, server_round,
                 metrics.get("total", float("nan")),
                 f"{metrics['val_dice']:.4f}" if "val_dice" in metrics else "-", metrics["seconds"])
        metrics["num-examples"] = float(len(self.train_set))
        metrics["cid"] = float(self.cid)
        reply = self.state_of(shared)
        extra = self.rule.extra_reply(self, server_round)
        clash = sorted(set(extra) & set(reply))
        if clash:
            raise ValueError(f"client {self.cid}: the {self.rule.name} rule's extra reply "
                             f"arrays reuse model keys {clash[:3]}")
        reply.update(extra)
        return reply, metrics

    def seed_round(self, server_round: int) -> None:
        """Seed torch's stream for the start of ``server_round``, so that a trainer restored
        from its checkpoint repeats the round exactly (dropout inside adaptive aggregation
        draws from this stream)."""
        torch.manual_seed(self.cfg.seed * 1_000_003 + self.cid * 10_007 + 7 * server_round + 1)

    def reject_round(self, server_round: int, last_good: Mapping[str, object], problem: str,
                     start: float) -> Dict[str, float]:
        """Back to the state before the round; the reply tells the server why it carries no
        update (``diverged`` = 1, no samples)."""
        self.load_state_dict(last_good)
        self.rounds_done = server_round
        self.save_latest()
        log.warning("client %d round %d: update rejected (%s); kept the state of round %d",
                    self.cid, server_round, problem, server_round - 1)
        return {"diverged": 1.0, "num-examples": 0.0, "cid": float(self.cid),
                "seconds": time.perf_counter() - start}

    def evaluate(self, arrays: Optional[Mapping[str, np.ndarray]] = None,
                 config: Optional[Mapping[str, object]] = None) -> Dict[str, float]:
        """Validation Dice of the current personalised model and, when the config asks for it
        (``validate-global``), of the received global ``arrays``. A rule that validates another
        model (:meth:`clients.rules.base.LocalRule.final_validation`) scores that one."""
        config = config or {}
        shared = self.keys(_groups(config, SHARE_INCLUDE), _groups(config, SHARE_EXCLUDE)) \
            if arrays else []
        if arrays:
            own = self.rule.final_validation(self, arrays, shared,
                                             int(config.get(SERVER_ROUND, self.rounds_done)))
            if own is not None:
                return {"val_dice": own["val_dice"], "best_val_dice": own["best_val_dice"],
                        "num-examples": float(len(self.val_set)), "cid": float(self.cid)}
        score, per_target = validate(self.model, self.val_set, self.cid, self.device, img_size=self.cfg.img_size)
        metrics = {"val_dice": score, "num-examples": float(len(self.val_set)), "cid": float(self.cid)}
        metrics.update({f"val_dice_{k}": v for k, v in per_target.items()})
        if config.get(VALIDATE_GLOBAL) and arrays:
            metrics.update(self.validate_global(arrays, shared))
        return metrics

    def validate_global(self, arrays: Mapping[str, np.ndarray], shared: Iterable[str]
                        ) -> Dict[str, float]:
        """Validation Dice of the received global model (``arrays`` loaded into a copy of the
        local model for the ``shared`` keys), the model a global method deploys."""
        own = self.model
        self.model = copy.deepcopy(own)
        try:
            self.load_arrays(arrays, shared)
            score, _ = validate(self.model, self.val_set, self.cid, self.device,
                                img_size=self.cfg.img_size)
        finally:
            self.model = own
        return {"val_dice_global": score}

    def validate_and_checkpoint(self, server_round: int, log_images: bool,
                                model: Optional[nn.Module] = None) -> Dict[str, float]:
        """Validate ``model`` (default: the site's own) as the model of ``server_round``, log
        it, and keep it as ``best.pt`` when it is the site's best so far."""
        if model is not None and model is not self.model:
            own, self.model = self.model, model
            try:
                return self.validate_and_checkpoint(server_round, log_images)
            finally:
                self.model = own
        score, per_target = validate(self.model, self.val_set, self.cid, self.device, img_size=self.cfg.img_size)
        self.writer.add_scalar("val/dice", score, server_round)
        for name, value in per_target.items():
            self.writer.add_scalar(f"val/dice_{name}", value, server_round)
        every = self.cfg.tb_images_every
        if log_images or every == 0 or server_round % every == 0:
            self.log_predictions(server_round)
        if score > self.best_val:
            self.best_val = score
            save_atomic({"model": self.model.state_dict(), "round": server_round,
                         "val_dice": score, "cid": self.cid, "meta": run_meta(self.cfg, self.cid)},
                        self.client_dir / "best.pt")
        return {"val_dice": score, "best_val_dice": self.best_val}

    def log_predictions(self, step: int, count: int = 4) -> None:
        """TensorBoard: the site model's predictions on the first ``count`` validation cases."""
        self.log_site_predictions("val/prediction_and_truth_contour", self.val_set, self.cid,
                                  step, count)

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> Dict[str, object]:
        return {
            "meta": run_meta(self.cfg, self.cid),
            "cid": self.cid,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "batches": self.batches.state_dict(),
            "rule": self.rule.state_dict(),
            "step": self.step,
            "rounds_done": self.rounds_done,
            "best_val": self.best_val,
        }

    def load_state_dict(self, state: Mapping[str, object]) -> None:
        if int(state["cid"]) != self.cid:
            raise ValueError(f"checkpoint of client {state['cid']} given to client {self.cid}")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.batches.load_state_dict(state["batches"])
        self.rule.load_state_dict(state["rule"], self.device)
        self.step = int(state["step"])
        self.rounds_done = int(state["rounds_done"])
        self.best_val = float(state["best_val"])

    def save(self, path: Path) -> None:
        save_atomic(self.state_dict(), path)

    def save_latest(self) -> None:
        """Write ``latest.pt``, keeping the file it replaces as ``previous.pt``: a run resumed
        after an interruption in the middle of a round rolls a site that had already finished
        that round back to the round before (:func:`strategies.resume.rollback_sites`)."""
        latest = self.client_dir / "latest.pt"
        if latest.is_file():
            copy_atomic(latest, self.client_dir / "previous.pt")
        self.save(latest)

    def load(self, path: Path) -> None:
        self.load_state_dict(load_checkpoint(path, map_location=self.device,
                                             expect=run_meta(self.cfg, self.cid)))
        if self._writer is None:  # TensorBoard continues after the restored step
            self._purge_step = self.step + 1
