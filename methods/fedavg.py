"""FedAvg (McMahan et al., AISTATS 2017): every parameter shared, sample-weighted mean.

Server: the framework's :class:`strategies.base.PersonalizedStrategy` as it is. Site: the
framework's :class:`clients.rules.base.LocalRule` (load the shared arrays, train ``iters``
steps). The global model is deployed.
"""
from clients.rules.base import LocalRule
from strategies.base import PersonalizedStrategy

from .registry import Method, register_method


class FedAvgServer(PersonalizedStrategy):
    """Sample-weighted mean of every group."""


class FedAvgSite(LocalRule):
    """Plain local training on the received model."""


FEDAVG = register_method(Method(
    name="FedAvg", server=FedAvgServer, site=FedAvgSite, deploys="global",
    summary="every parameter averaged; one global model"))
