"""Build the network a run configuration names (shared by the server and every site)."""
from __future__ import annotations

import inspect
from typing import Any, Dict, FrozenSet, Mapping

import torch
from torch import nn

from dataloaders.tasks import get_task

from .registry import _NETWORKS, build

#: Every constructor option a run config supplies (see :func:`run_option_values`).
RUN_OPTION_NAMES: FrozenSet[str] = frozenset({"base_channels", "aux_channels", "num_sites", "site",
                                              "img_size", "label_form"})
#: Run-config options each registered network's constructor takes; ``build_for_run`` passes a
#: network only these. A network missing here gets the options its factory signature names.
RUN_OPTIONS: Mapping[str, FrozenSet[str]] = {
    "unet": frozenset({"base_channels"}),
    "unet_multihead": frozenset({"base_channels", "aux_channels"}),
    "unet_lc": frozenset({"base_channels", "num_sites", "site"}),
    "unet_lc_multihead": frozenset({"base_channels", "aux_channels", "num_sites", "site"}),
    "efficient_unet": frozenset(),
    "unet_lppa": frozenset({"base_channels", "num_sites", "site", "img_size", "label_form"}),
}


def run_option_values(cfg: Any, site: int) -> Dict[str, Any]:
    """Every constructor option a run config can supply, whether a network takes it or not:
    ``img_size`` is the run's input size (the task's own when ``img_size = 0``), ``label_form``
    the site's (``label_form`` of the run, else the site's weak form)."""
    task = get_task(cfg.img_class)
    form = cfg.label_form or (task.sites[site].weak_form if 0 <= site < len(task.sites) else "")
    return {"base_channels": cfg.base_channels, "aux_channels": cfg.aux_channels,
            "num_sites": max(int(cfg.num_clients), 1), "site": site,
            "img_size": int(cfg.img_size) or task.image_size, "label_form": form}


def method_network_options(cfg: Any) -> Dict[str, Any]:
    """Network options the run's method sets from its own keys (``Method.network_options``),
    e.g. FedLPPA's attention and sparsity prompt; none for a configuration without a method."""
    method = getattr(cfg, "method", None)
    hook = getattr(method, "network_options", None)
    return dict(hook(cfg)) if hook is not None else {}


def accepted_run_options(name: str) -> FrozenSet[str]:
    """Names of the run options network ``name`` accepts.

    Parameters
    ----------
    name : str
        Registered network name.

    Raises
    ------
    ValueError
        If ``name`` is not registered, or is neither declared in ``RUN_OPTIONS`` nor built by a
        factory whose signature names its options (a bare ``**options`` says nothing).
    """
    if name in RUN_OPTIONS:
        return RUN_OPTIONS[name]
    factory = _NETWORKS.get(name)
    params = inspect.signature(factory).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        raise ValueError(f"network {name!r} takes **options: declare the run options it accepts "
                         f"in RUN_OPTIONS of networks/factory.py")
    return frozenset(p.name for p in params) & RUN_OPTION_NAMES


def run_model_options(cfg: Any, site: int) -> Dict[str, Any]:
    """Constructor options for ``cfg.model`` derived from run config ``cfg`` and ``site``,
    restricted to those the network accepts (see ``RUN_OPTIONS``)."""
    accepted = accepted_run_options(cfg.model)
    options = {k: v for k, v in run_option_values(cfg, site).items() if k in accepted}
    options.update(method_network_options(cfg))
    return options


def build_for_run(cfg: Any, site: int = 0) -> nn.Module:
    """The network of run config ``cfg`` for ``site``, seeded with ``cfg.seed`` so that the
    server and every site start from identical weights."""
    task = get_task(cfg.img_class)
    torch.manual_seed(cfg.seed)
    return build(cfg.model, task.in_chns, task.num_classes, **run_model_options(cfg, site))
