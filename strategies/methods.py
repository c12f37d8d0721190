"""Importing this module registers every server strategy."""
from . import centralised, fedala, fedap, fedavg, fedbn, fedicra, fedlc, fedprox, fedrep, ft, local, metafed  # noqa: F401
