"""``flower-supernode`` with a shorter idle poll: ``python -m deployment.supernode ARGS...``.

Flower 1.42's SuperNode sleeps 3 s whenever the SuperLink has no message for it and checks
for a finished ClientApp reply every 0.5 s; on a short round both waits dominate. This entry
point runs the unmodified ``flower-supernode`` command in-process after capping those sleeps
at ``FEDICRA_NODE_POLL_INTERVAL`` seconds (default 0.1; ``0`` leaves Flower's timings).
If the Flower internals it relies on are not there, it logs a warning and runs stock.
"""
from __future__ import annotations

import logging
import os
import sys
import time
import types

log = logging.getLogger("fedicra.supernode")

ENV_KEY = "FEDICRA_NODE_POLL_INTERVAL"


def cap_node_sleeps(interval: float) -> bool:
    """Make the SuperNode main loop sleep at most ``interval`` s; ``True`` if patched."""
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


def main() -> None:
    interval = float(os.environ.get(ENV_KEY, "0.1"))
    if interval > 0:
        cap_node_sleeps(interval)
    from flwr.supercore.logger import update_console_handler
    from flwr.supernode.cli import flower_supernode

    update_console_handler(timestamps=True, colored=False)  # log files, not a terminal

    sys.argv[0] = "flower-supernode"
    flower_supernode()


if __name__ == "__main__":
    main()
