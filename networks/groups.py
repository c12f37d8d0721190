"""Parameter groups of a network, as ``state_dict`` keys, for federated strategies.

Partition groups (every key in exactly one): ``encoder``, ``pcs``, ``decoder``, ``out_conv``,
``aux`` (from the top-level submodules ``encoder``, ``pcs``, ``decoder``, ``out_conv``,
``aux_heads``). Any other top-level submodule forms a partition group of its own name, so the
partition stays complete for networks that add modules. Cross-cutting group: ``bn``, every
entry (weight, bias, running statistics, ``num_batches_tracked``) of every BatchNorm layer.
The pseudo-group ``all`` holds every key.
"""
from __future__ import annotations

from typing import Dict, Iterable, List, Optional

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

#: Top-level submodule name -> partition group name.
MODULE_GROUPS: Dict[str, str] = {
    "encoder": "encoder",
    "pcs": "pcs",
    "decoder": "decoder",
    "out_conv": "out_conv",
    "aux_heads": "aux",
}
PARTITION_GROUPS = ("encoder", "pcs", "decoder", "out_conv", "aux")
CROSS_GROUPS = ("bn",)


def parameter_groups(model: nn.Module) -> Dict[str, List[str]]:
    """Map group names to the model's ``state_dict`` keys (each list in ``state_dict`` order).

    Always contains the five partition groups (possibly empty) and ``bn``; see module docstring.
    """
    keys = list(model.state_dict().keys())
    groups: Dict[str, List[str]] = {name: [] for name in PARTITION_GROUPS}
    for key in keys:
        top = key.split(".", 1)[0]
        groups.setdefault(MODULE_GROUPS.get(top, top), []).append(key)
    bn_keys = set()
    for name, module in model.named_modules():
        if isinstance(module, _BatchNorm):
            prefix = f"{name}." if name else ""
            bn_keys.update(module.state_dict(prefix=prefix).keys())
    groups["bn"] = [k for k in keys if k in bn_keys]
    return groups


def select_keys(
    model: nn.Module, include: Iterable[str], exclude: Optional[Iterable[str]] = None
) -> List[str]:
    """``state_dict`` keys in any ``include`` group and in no ``exclude`` group, in order.

    Examples
    --------
    ``select_keys(model, ["all"], ["bn"])`` (FedBN: all but BatchNorm),
    ``select_keys(model, ["encoder", "decoder"], [])``.
    """
    groups = parameter_groups(model)
    groups["all"] = list(model.state_dict().keys())
    include = list(include)
    exclude = list(exclude or [])
    unknown = [g for g in include + exclude if g not in groups]
    if unknown:
        raise ValueError(f"unknown parameter groups {unknown}; expected one of {sorted(groups)}")
    inc = {k for g in include for k in groups[g]}
    exc = {k for g in exclude for k in groups[g]}
    return [k for k in groups["all"] if k in inc and k not in exc]
