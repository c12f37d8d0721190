"""The deployment ServerApp: the project's ServerApp behind a Grid that polls for replies faster.

Flower 1.42's HTTP Grid checks for the nodes' replies every 3 s, which adds up to 3 s to every
round. :class:`PollingGrid` keeps the Grid contract (it only uses the public ``push_messages``
/ ``pull_messages`` methods of the wrapped grid) but polls every ``grid-poll-interval``
seconds (run config; 0 keeps Flower's own ``send_and_receive``). Everything else is
:data:`strategies.server_app.app`: it reads ``config-file`` from the run config and runs all
rounds.
"""
from __future__ import annotations

import time
from typing import Iterable, Optional

from flwr.app import Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

from strategies.server_app import app as project_app

POLL_KEY = "grid-poll-interval"

app = ServerApp()


class PollingGrid(Grid):
    """Delegates to ``grid``; ``send_and_receive`` polls every ``interval`` seconds.

    Parameters
    ----------
    grid : Grid
        The grid Flower handed to the ServerApp.
    interval : float
        Seconds between two pulls for replies.
    """

    def __init__(self, grid: Grid, interval: float) -> None:
        self.grid = grid
        self.interval = interval

    def set_run(self, run) -> None:
        self.grid.set_run(run)

    @property
    def run(self):
        return self.grid.run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int,
                       group_id: str, ttl: Optional[float] = None) -> Message:
        return self.grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self.grid.get_node_ids()

    def get_nodes(self):
        return self.grid.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.grid.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: Optional[float] = None) -> Iterable[Message]:
        pending = set(self.push_messages(messages))
        replies: list = []
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
    project_app(PollingGrid(grid, interval) if interval > 0 else grid, context)
