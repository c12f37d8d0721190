"""Name -> constructor registry for segmentation networks (filled by ``@register_network``)."""
from __future__ import annotations

from typing import Callable, Dict, Tuple

from torch import nn

_NETWORKS: Dict[str, Callable[..., nn.Module]] = {}


def register_network(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Class or factory decorator that makes a network buildable by ``build(name, ...)``."""

    def decorator(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _NETWORKS:
            raise ValueError(f"network {name!r} registered twice")
        _NETWORKS[name] = factory
        return factory

    return decorator


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
    try:
        factory = _NETWORKS[name]
    except KeyError:
        raise ValueError(
            f"unknown network {name!r}; expected one of {', '.join(network_names())}"
        ) from None
    return factory(in_chns=in_chns, num_classes=num_classes, **options)


def network_names() -> Tuple[str, ...]:
    return tuple(sorted(_NETWORKS))
