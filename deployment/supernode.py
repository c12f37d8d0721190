"""``flower-supernode`` with short waits: ``python -m deployment.supernode ARGS...``.

Runs the unmodified ``flower-supernode`` command in this process after
:func:`deployment.tuning.cap_node_sleeps` and :func:`deployment.tuning.shorten_pull_backoff`
(``FEDICRA_NODE_POLL_INTERVAL`` seconds, default 0.1; ``0`` keeps Flower's timings), with
timestamps on its log lines (they go to a file, not a terminal).
"""
from __future__ import annotations

import os
import sys

from .tuning import cap_node_sleeps, shorten_pull_backoff

ENV_KEY = "FEDICRA_NODE_POLL_INTERVAL"


def main() -> None:
    interval = float(os.environ.get(ENV_KEY, "0.1"))
    if interval > 0:
        cap_node_sleeps(interval)
        shorten_pull_backoff(min(interval / 2, 1.0))
    from flwr.supercore.logger import update_console_handler
    from flwr.supernode.cli import flower_supernode

    update_console_handler(timestamps=True, colored=False)
    sys.argv[0] = "flower-supernode"
    flower_supernode()


if __name__ == "__main__":
    main()
