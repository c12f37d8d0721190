"""Shorter waits inside Flower 1.42 for short rounds on one machine.

Flower's defaults suit long rounds over real networks; with rounds of a second they dominate:

- the SuperNode sleeps 3 s when the SuperLink has no message for it and checks every 0.5 s
  whether the ClientApp's reply is ready (:func:`cap_node_sleeps`);
- every object pull that finds an object not yet uploaded (the receiver saw the message
  while the sender was still pushing its objects, a routine race when polling fast) backs
  off 1 s, then 2 s, ... (:func:`shorten_pull_backoff`).

Both patch module-level names of the running process only (no files change) and return False,
leaving Flower's behaviour, when the internals they expect are absent.
"""
from __future__ import annotations

import logging
import time
import types

log = logging.getLogger("fedicra.tuning")


def shorten_pull_backoff(initial: float = 0.05) -> bool:
    """Start the exponential backoff of Flower's object pulls at ``initial`` seconds."""
    try:
        from flwr.supercore.inflatable import inflatable_utils as utils
    except ImportError:
        return False
    patched = False
    for name in ("pull_objects", "pull_and_inflate_object_from_tree"):
        fn = getattr(utils, name, None)
        defaults = getattr(fn, "__kwdefaults__", None)
        if defaults and "initial_backoff" in defaults:
            defaults["initial_backoff"] = initial
            patched = True
    if not patched:
        log.warning("Flower's object pull functions changed: keeping their backoff")
    return patched


def cap_node_sleeps(interval: float) -> bool:
    """Make the SuperNode main loop sleep at most ``interval`` s (default: 3 s and 0.5 s)."""
    try:
        from flwr.supernode import start_client_internal as loop
    except ImportError:
        return False
    if getattr(loop, "time", None) is not time:
        log.warning("flwr.supernode.start_client_internal has no 'time' module attribute; "
                    "running flower-supernode with its own poll intervals")
        return False
    capped = types.SimpleNamespace(**{k: getattr(time, k) for k in dir(time)
                                      if not k.startswith("__")})
    capped.sleep = lambda seconds: time.sleep(min(seconds, interval))
    loop.time = capped
    return True
