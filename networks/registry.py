"""Segmentation networks by name, filled by ``@register_network``."""
from __future__ import annotations

from typing import Callable, Tuple

from torch import nn

from configs.registry import Registry

_NETWORKS = Registry("network")


def register_network(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Class or factory decorator that makes a network buildable by ``build(name, ...)``."""
    return _NETWORKS.register(name)


def build(name: str, in_chns: int, num_classes: int, **options) -> nn.Module:
    """Build the network registered as ``name``.

    Parameters
    ----------
    name:
        Registered name, e.g. ``'unet'`` or ``'unet_lc_multihead'``.
    in_chns, num_classes:
        Input channels and number of output classes (unlabelled value excluded).
    **options:
        Network-specific options (``base_channels``, ``num_sites``, ``site``, ...).
    """
    return _NETWORKS.get(name)(in_chns=in_chns, num_classes=num_classes, **options)


def network_names() -> Tuple[str, ...]:
    return _NETWORKS.names()
