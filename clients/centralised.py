"""Centralised training on the pooled data of every site: the CT-weak and CT-full references.

The references of the FedICRA comparison (Lin et al., MLMI 2023; strategies/centralised.py):
one model trained on the pooled training sets of all ``num_clients`` sites, with each site's
own weak labels (CT-weak, ``label_form = ""``) or with full masks (CT-full,
``label_form = "mask"``). No Flower process runs; ``flower_runner.py`` calls
:func:`run_centralised` when the strategy class says ``federated = False``.

What the protocol shares with the federated runs
------------------------------------------------
- data: every site's ``train`` split as the sites carve it (the same ``val_fraction`` and
  seed), so the validation and test cases never enter training;
- network, objective and their keys; ``rounds * iters`` AdamW steps, poly decay of the
  learning rate over those steps; each step draws :attr:`CentralTrainer.step_cases` cases from
  the pooled set (a seeded, shuffled stream over all sites' cases, with the sites'
  augmentation): ``num_clients * batch_size`` with ``ct_batch = "federation"`` (the default:
  as many cases as a federated step trains on, ``batch_size`` at each of the ``num_clients``
  sites), ``batch_size`` with ``ct_batch = "site"`` (the reference's ``Unet_pCE.py``, whose
  step is one site's batch);
- validation every ``eval_every`` rounds of ``iters`` steps and after the last, on every
  site's validation split; the model with the best mean over sites of the validation Dice
  (every site weighs the same) is kept as ``global/best.pt`` in the server's format, which
  ``test_client.py`` tests on every site.

Site codes (``unet_lc*``): the pooled data still know their hospital, so each case is
segmented under its own site's code, as in the federation and as ``test_client.py`` tests
site ``k`` with code ``k``: a batch is split by site, one forward pass per site present, and
the objective (including the site-contrastive term) is the size-weighted mean over these
parts. Networks without site codes see the whole batch in one pass.

Outputs in ``model/<exp>/``: ``metrics.csv`` (per round a ``client = -1`` row with the pooled
training's loss terms, learning rate, seconds and the best mean validation Dice so far, and on
validation rounds one row per site with its validation Dice), ``tb/server`` (loss terms and
learning rate per step, validation Dice per round, predictions), ``global/latest.pt`` and
``global/best.pt``.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from configs import RunConfig
from configs.devices import pick_device
from configs.metrics_csv import append_rows, start_file
from dataloaders.dataset import InfiniteBatches, SiteDataset
from dataloaders.tasks import get_task
from losses.objective import WeakObjective
from networks.checkpoint import run_meta, save_atomic
from networks.factory import build_for_run

from .trainer import batch_to
from .evaluation import validate as validate_site
from .steps import StepTrainer, objective_config

log = logging.getLogger("fedicra.central")

#: Stream and seed index of the centralised trainer (sites use their client id, < 100).
CENTRAL_ID = 999


class PooledSites(Dataset):
    """The cases of several :class:`SiteDataset` s as one dataset; every sample says its site.

    Parameters
    ----------
    datasets : sequence of SiteDataset
        One per site (their ``site`` attributes must differ).

    Notes
    -----
    A sample is the site dataset's sample without ``mask`` (sites may differ in having one;
    training reads ``label``) plus ``site``, a 0-d int64 tensor.
    """

    def __init__(self, datasets: Sequence[SiteDataset]) -> None:
        self.datasets = list(datasets)
        if not self.datasets:
            raise ValueError("PooledSites needs at least one site dataset")
        sites = [d.site for d in self.datasets]
        if len(set(sites)) != len(sites):
            raise ValueError(f"PooledSites: a site appears twice in {sites}")
        self.index: List[Tuple[int, int]] = [(d, i) for d, ds in enumerate(self.datasets)
                                             for i in range(len(ds))]
        if not self.index:
            raise ValueError("PooledSites: the site datasets hold no cases")

    def __len__(self) -> int:
        return len(self.index)

    @property
    def cases(self) -> List[Tuple[int, str]]:
        """``(site, case name)`` of every pooled case, in index order."""
        return [(self.datasets[d].site, self.datasets[d].cases[i]) for d, i in self.index]

    def sample(self, index: int, rng: Optional[np.random.Generator] = None) -> Dict[str, Any]:
        d, i = self.index[index]
        out = self.datasets[d].sample(i, rng)
        out.pop("mask", None)
        out["site"] = torch.tensor(self.datasets[d].site, dtype=torch.int64)
        return out

    def __getitem__(self, index: int) -> Dict[str, Any]:
        return self.sample(index)


class CentralTrainer(StepTrainer):
    """One model on the pooled training sets of sites ``0 .. num_clients - 1``.

    Parameters
    ----------
    cfg : RunConfig
        The run (data, network, objective, schedule); ``label_form`` picks the labels:
        ``""`` each site's weak form, ``"mask"`` full masks.
    device : str
        ``''`` picks CUDA when visible, else CPU.
    """

    def __init__(self, cfg: RunConfig, device: str = "") -> None:
        self.cfg = cfg
        self.task = get_task(cfg.img_class, cfg.root_path)
        if not 1 <= cfg.num_clients <= self.task.num_sites:
            raise ValueError(f"num_clients = {cfg.num_clients}: task {self.task.name!r} has "
                             f"{self.task.num_sites} sites to pool")
        self.device = pick_device(device)
        self.sites = list(range(cfg.num_clients))
        common = dict(task=self.task, val_fraction=cfg.val_fraction, seed=cfg.seed)
        self.train_sets = [SiteDataset(cfg.root_path, site=s, split="train",
                                       label_form=cfg.label_form or None, augment=True,
                                       rotate_order=cfg.rotate_order,
                                       rotate_fill=cfg.rotate_fill, **common)
                           for s in self.sites]
        self.val_sets = [SiteDataset(cfg.root_path, site=s, split="val", **common)
                         for s in self.sites]
        self.pooled = PooledSites(self.train_sets)
        self.model = build_for_run(cfg, site=0).to(self.device)
        #: unet_lc*: every case goes through its own site's code
        self.site_coded = bool(getattr(self.model, "personalised", False))
        self.objective = WeakObjective(objective_config(cfg))
        self.optimizer = self.new_optimizer()
        self.batches = InfiniteBatches(self.pooled, self.step_cases,
                                       seed=cfg.seed * 1000 + CENTRAL_ID)
        self.step = 0
        self.total_steps = cfg.rounds * cfg.iters
        self.best_val = -1.0
        self.best_round = 0
        self._writer = None

    #: seed index of the steps (sites use their client id)
    stream_id = CENTRAL_ID

    # ------------------------------------------------------------------ plumbing
    @property
    def out_dir(self) -> Path:
        return self.cfg.out_dir

    @property
    def tb_dir(self) -> Path:
        return self.out_dir / "tb" / "server"

    @property
    def step_cases(self) -> int:
        """Pooled cases drawn per step: ``num_clients * batch_size`` (``ct_batch =
        "federation"``, what the federation trains on in one step) or ``batch_size``
        (``"site"``, the reference's budget)."""
        if self.cfg.params.ct_batch == "federation":
            return self.cfg.num_clients * self.cfg.batch_size
        if self.cfg.params.ct_batch == "site":
            return self.cfg.batch_size
        raise ValueError(f"ct_batch = {self.cfg.params.ct_batch!r}: expected \"federation\" or \"site\"")

    def to_device(self, image: Tensor, label: Tensor) -> Tuple[Tensor, Tensor]:
        """A batch on the device, resized to ``img_size`` when one is set (as the sites do)."""
        return batch_to(image, label, self.device, self.cfg.img_size)

    def next_batch(self) -> Dict[str, Any]:
        """The next pooled batch: ``image``, ``label`` on the device, ``site`` (list of int),
        ``case`` (list of str)."""
        batch = next(self.batches)
        image, label = self.to_device(batch["image"], batch["label"])
        return {"image": image, "label": label, "site": [int(s) for s in batch["site"]],
                "case": list(batch["case"])}

    # ------------------------------------------------------------------ training
    def loss(self, batch: Dict[str, Any]) -> Tuple[Tensor, Dict[str, object]]:
        """The objective on one pooled batch: one pass for networks without site codes, else
        one pass per site present (own code), weighted by its share of the batch. The terms
        end with ``total``, a detached 0-d tensor left on the device."""
        image, label, sites = batch["image"], batch["label"], batch["site"]
        num_sites = self.cfg.num_clients
        if not self.site_coded:
            result = self.objective(self.model, self.model(image), image, label, site=0,
                                    num_sites=num_sites)
            total, terms = result.total, dict(result.terms)
        else:
            total, terms = None, {}
            for site in sorted(set(sites)):
                rows = torch.tensor([i for i, s in enumerate(sites) if s == site],
                                    device=image.device)
                share = len(rows) / len(sites)
                part_image, part_label = image.index_select(0, rows), label.index_select(0, rows)
                result = self.objective(self.model, self.model(part_image, site=site), part_image,
                                        part_label, site=site, num_sites=num_sites)
                total = result.total * share if total is None else total + result.total * share
                for key, value in result.terms.items():
                    terms[key] = terms.get(key, 0.0) + float(value) * share
        terms["total"] = total.detach()
        return total, terms

    def train_round(self, server_round: int) -> Dict[str, float]:
        """``iters`` optimiser steps; the mean of every loss term and the last learning rate."""
        if self.cfg.reset_optimizer:
            self.optimizer = self.new_optimizer()
        return self.run_steps(self.cfg.iters, self.loss)

    # ------------------------------------------------------------------ validation, checkpoints
    def validate(self) -> Dict[int, float]:
        """Validation Dice on every site's validation split, each case under its site's code."""
        return {s: validate_site(self.model, v, s, self.device, img_size=self.cfg.img_size)[0]
                for s, v in zip(self.sites, self.val_sets)}

    def arrays(self) -> Dict[str, Tensor]:
        """The whole model as the server stores a global model (``state_dict`` key -> tensor)."""
        return {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}

    def save_latest(self, server_round: int) -> None:
        save_atomic({"round": server_round, "arrays": self.arrays(),
                     "meta": run_meta(self.cfg, None)}, self.out_dir / "global" / "latest.pt")

    def keep_if_best(self, server_round: int, mean_dice: float) -> bool:
        """Save ``global/best.pt`` (server format) when ``mean_dice`` beats the best so far."""
        if mean_dice <= self.best_val:
            return False
        self.best_val, self.best_round = float(mean_dice), server_round
        save_atomic({"round": server_round, "arrays": self.arrays(), "val_dice": float(mean_dice),
                     "meta": run_meta(self.cfg, None)}, self.out_dir / "global" / "best.pt")
        return True

    def log_predictions(self, server_round: int, count: int = 2) -> None:
        """TensorBoard: the first ``count`` validation cases of every site with the truth."""
        for site, data in zip(self.sites, self.val_sets):
            self.log_site_predictions(f"val/prediction_and_truth_contour_client{site}", data,
                                      site, server_round, count)


# ---------------------------------------------------------------------- the run
def run_centralised(cfg: RunConfig, device: Optional[str] = None) -> int:
    """Train run ``cfg`` centrally into ``cfg.out_dir``; 0 on success, 1 when training
    diverged (the best model so far stays in ``global/best.pt``)."""
    trainer = CentralTrainer(cfg, pick_device(gpus=cfg.gpus, logger=log)
                             if device is None else device)
    csv_path = trainer.out_dir / "metrics.csv"
    start_file(csv_path)
    sizes = ", ".join(f"site {s}: {len(d)}" for s, d in zip(trainer.sites, trainer.train_sets))
    forms = ", ".join(sorted({d.label_form for d in trainer.train_sets}))
    log.info("%s: centralised training on %s, %d pooled training cases (%s), labels %s, "
             "site codes %s, %d cases a step (ct_batch = %s)", cfg.strategy, trainer.device,
             len(trainer.pooled), sizes, forms,
             "per case (own site)" if trainer.site_coded else "unused by the network",
             trainer.step_cases, cfg.params.ct_batch)
    start = time.perf_counter()
    try:
        for server_round in range(1, cfg.rounds + 1):
            began = time.perf_counter()
            metrics = trainer.train_round(server_round)
            problem = trainer.divergence(metrics)
            if problem:
                log.error("round %d: training diverged (%s); the run stops (lower --base_lr); "
                          "the best model so far is %s", server_round, problem,
                          trainer.out_dir / "global" / "best.pt")
                append_rows(csv_path, [{"round": server_round, "client": -1, "diverged": 1,
                                        "num_examples": len(trainer.pooled)}])
                return 1
            rows: List[Dict[str, object]] = []
            is_last = server_round == cfg.rounds
            mean = None
            if server_round % cfg.eval_every == 0 or is_last:
                scores = trainer.validate()
                mean = float(np.mean(list(scores.values())))
                trainer.keep_if_best(server_round, mean)
                for site, score in scores.items():
                    trainer.writer.add_scalar(f"val/dice_client{site}", score, server_round)
                    rows.append({"round": server_round, "client": site,
                                 "num_examples": len(trainer.train_sets[site]), "val_dice": score})
                trainer.writer.add_scalar("val/dice", mean, server_round)
                every = cfg.tb_images_every
                if is_last or every == 0 or server_round % every == 0:
                    trainer.log_predictions(server_round)
            trainer.save_latest(server_round)
            pooled = {"round": server_round, "client": -1, "num_examples": len(trainer.pooled),
                      "seconds": time.perf_counter() - began, **metrics}
            if mean is not None:
                pooled["best_val_dice"] = trainer.best_val
            append_rows(csv_path, [pooled] + rows)
            trainer.writer.flush()
            elapsed = time.perf_counter() - start
            log.info("round %d/%d | pooled %d cases | train loss %.4f | val dice %s | %.0f s "
                     "elapsed | ETA %.0f s", server_round, cfg.rounds, len(trainer.pooled),
                     metrics.get("total", float("nan")), "-" if mean is None else f"{mean:.4f}",
                     elapsed, elapsed / server_round * (cfg.rounds - server_round))
    finally:
        trainer.close()
    log.info("%s: kept the model of round %d (mean validation Dice over sites %.4f) as %s",
             cfg.strategy, trainer.best_round, trainer.best_val,
             trainer.out_dir / "global" / "best.pt")
    return 0
