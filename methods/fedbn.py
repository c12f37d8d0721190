"""FedBN (Li et al., ICLR 2021): BatchNorm weights, biases and statistics stay on each site.

Only the server differs from FedAvg: it leaves the ``bn`` group out of the shared set, so the
site (the framework's :class:`clients.rules.base.LocalRule`) loads and returns only the other
arrays.
"""
from clients.rules.base import LocalRule
from strategies.base import PersonalizedStrategy

from .registry import Method, register_method


class FedBNServer(PersonalizedStrategy):
    share_exclude = ("bn",)


class FedBNSite(LocalRule):
    """Local training; the BatchNorm layers never leave or enter the site."""


FEDBN = register_method(Method(
    name="FedBN", server=FedBNServer, site=FedBNSite,
    summary="BatchNorm layers local, the rest averaged"))
