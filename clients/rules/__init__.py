"""Local update rules, one method per module; importing this package registers them all."""
from . import base, fedala, fedavg, fedicra, fedprox, fedrep, ft, local  # noqa: F401
