"""Importing this module registers every server strategy."""
from . import centralised, fedala, fedavg, fedbn, fedicra, fedprox, fedrep, ft, local  # noqa: F401
