"""Importing this module registers every server strategy."""
from . import fedala, fedavg, fedbn, fedicra, fedprox, fedrep, local  # noqa: F401
