"""The deployment ServerApp: the project's ServerApp behind a grid suited to real transport.

:class:`DeploymentGrid` wraps the Grid Flower hands to the ServerApp and changes two things,
both invisible to the strategy:

- it packs each outgoing message's arrays into one array and unpacks the replies
  (:mod:`deployment.packing`; Flower moves every array as its own HTTP object otherwise);
- it polls for replies every ``grid-poll-interval`` seconds (run config) instead of every 3 s,
  and retries an object that is not uploaded yet after half that interval rather than 1 s
  (:func:`deployment.tuning.shorten_pull_backoff`).

It uses only the public Grid methods of the wrapped grid. Everything else is
:data:`strategies.server_app.app`: it reads ``config-file`` from the run config and runs all
rounds.
"""
from __future__ import annotations

import time
from typing import Iterable, List, Optional

from flwr.app import Context, Message
from flwr.serverapp import Grid, ServerApp

from strategies.deadlines import GridProxy
from strategies.server_app import app as project_app

from .packing import pack_content, unpack_content
from .tuning import shorten_pull_backoff

POLL_KEY = "grid-poll-interval"
PACK_KEY = "pack-arrays"
#: Used when the run config does not set ``grid-poll-interval`` (Flower's own value is 3 s).
DEFAULT_POLL = 0.05

app = ServerApp()


class DeploymentGrid(GridProxy):
    """Delegates to ``grid``; packs arrays on the way out, unpacks replies, polls faster.

    Parameters
    ----------
    grid : Grid
        The grid Flower handed to the ServerApp.
    interval : float
        Seconds between two pulls for replies in :meth:`send_and_receive`.
    pack : bool
        Pack outgoing arrays (replies are unpacked whenever they come packed).
    """

    def __init__(self, grid: Grid, interval: float = DEFAULT_POLL, pack: bool = True) -> None:
        super().__init__(grid)
        self.interval = interval
        self.pack = pack
        shorten_pull_backoff(min(interval / 2, 1.0))

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        outgoing = []
        for msg in messages:
            if self.pack and msg.has_content():
                msg.content = pack_content(msg.content)
            outgoing.append(msg)
        return self.grid.push_messages(outgoing)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        replies = list(self.grid.pull_messages(message_ids))
        for msg in replies:
            if msg.has_content():
                msg.content = unpack_content(msg.content)
        return replies

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: Optional[float] = None) -> Iterable[Message]:
        pending = set(self.push_messages(messages))
        replies: List[Message] = []
        deadline = None if timeout is None else time.monotonic() + timeout
        while pending and (deadline is None or time.monotonic() < deadline):
            got = list(self.pull_messages(pending))
            replies.extend(got)
            pending.difference_update(m.metadata.reply_to_message_id for m in got)
            if pending:
                time.sleep(self.interval)
        return replies


@app.main()
def main(grid: Grid, context: Context) -> None:
    interval = float(context.run_config.get(POLL_KEY, 0.0) or 0.0)
    pack = bool(context.run_config.get(PACK_KEY, True))
    project_app(DeploymentGrid(grid, interval if interval > 0 else DEFAULT_POLL, pack), context)
