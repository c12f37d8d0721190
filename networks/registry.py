"""Segmentation networks by name, filled by ``@register_network``.

Every network declares at its registration what it offers (:class:`NetworkInfo`); whoever needs
to know (pre-flight checks, strategies, rules) reads the declaration through
:func:`network_info`, never the network's name.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Tuple

from torch import nn

from configs.registry import Registry

_NETWORKS = Registry("network")


@dataclass(frozen=True)
class NetworkInfo:
    """What a registered network offers, declared beside its registration.

    Attributes
    ----------
    size_multiple : int
        Input height and width must be multiples of this; other sizes are refused.
    site_gates : bool
        Site-conditioned channel selection (PCS): ``forward`` takes a site code and returns
        ``SegOutput.gates``; the site-contrastive term needs it.
    aux_heads : bool
        Auxiliary multi-scale heads (``SegOutput.aux_logits`` non-empty); the tree energy term
        needs them.
    calibration_head : bool
        FedLC's calibration module (``calib``), which only FedLC trains and deploys.
    uncalibrated : str
        For a network with a calibration head: the registered name of the same network
        without it ('' otherwise).
    site_prompts : bool
        FedLPPA's learnt prompts (one distribution prompt per site, ``prompts`` group), an
        auxiliary decoder (``aux_decoder``) and ``forward_train``; built for one ``img_size``.
    """

    size_multiple: int
    site_gates: bool = False
    aux_heads: bool = False
    calibration_head: bool = False
    uncalibrated: str = ""
    site_prompts: bool = False

    def __post_init__(self) -> None:
        if self.size_multiple < 1:
            raise ValueError(f"size_multiple must be >= 1, got {self.size_multiple}")


_INFO: Dict[str, NetworkInfo] = {}


def register_network(name: str, *, info: NetworkInfo
                     ) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Class or factory decorator that makes a network buildable by ``build(name, ...)`` and
    declares what it offers: ``@register_network("unet_lc", info=NetworkInfo(16, site_gates=True))``."""
    if not isinstance(info, NetworkInfo):
        raise TypeError(f"network {name!r}: info must be a NetworkInfo, got {type(info).__name__}")
    register = _NETWORKS.register(name)

    def decorator(obj: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        obj = register(obj)  # raises on a second registration of ``name``
        _INFO[name] = info
        return obj

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
    return _NETWORKS.get(name)(in_chns=in_chns, num_classes=num_classes, **options)


def network_info(name: str) -> NetworkInfo:
    """What network ``name`` declared at its registration.

    Raises
    ------
    ValueError
        If ``name`` is not registered (the message lists the registered names).
    """
    _NETWORKS.get(name)
    return _INFO[name]


def network_names() -> Tuple[str, ...]:
    return _NETWORKS.names()
