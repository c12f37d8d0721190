"""Segmentation networks, built by name: ``networks.build('unet_lc_multihead', 1, 2, ...)``."""
from . import calibration, efficient_unet, lppa, unet  # noqa: F401  (registers the networks)
from .groups import parameter_groups, select_keys
from .outputs import SegOutput
from .registry import NetworkInfo, build, network_info, network_names, register_network

__all__ = [
    "NetworkInfo",
    "SegOutput",
    "build",
    "network_info",
    "network_names",
    "parameter_groups",
    "register_network",
    "select_keys",
]
