"""Local update rules, one method per module; importing this package registers them all."""
from . import base, fedala, fedap, fedavg, fedicra, fedlc, fedprox, fedrep, ft, local, metafed  # noqa: F401
