"""Build the network a run configuration names (shared by the server and every site)."""
from __future__ import annotations

from typing import Any, Dict

import torch
from torch import nn

from dataloaders.tasks import get_task

from .registry import build


def run_model_options(cfg: Any, site: int) -> Dict[str, Any]:
    """Constructor options derived from a run config (``base_channels``, site code, ...)."""
    options: Dict[str, Any] = {"base_channels": cfg.base_channels}
    if "multihead" in cfg.model:
        options["aux_channels"] = cfg.aux_channels
    if "_lc" in cfg.model:
        options.update(num_sites=max(int(cfg.num_clients), 1), site=site)
    return options


def build_for_run(cfg: Any, site: int = 0) -> nn.Module:
    """The network of run config ``cfg`` for ``site``, seeded with ``cfg.seed`` so that the
    server and every site start from identical weights."""
    task = get_task(cfg.img_class)
    torch.manual_seed(cfg.seed)
    return build(cfg.model, task.in_chns, task.num_classes, **run_model_options(cfg, site))
