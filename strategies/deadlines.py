"""The server's per-round deadline (``round_timeout``) and the grid that applies it.

Flower's :meth:`Strategy.start` waits ``timeout`` seconds (3,600 by default) for the replies of
every phase and then goes on silently with what came. :class:`DeadlineGrid` wraps the grid a
strategy runs on and replaces that wait by :meth:`RoundClock.timeout`:

- ``round_timeout > 0``: that many seconds;
- ``round_timeout = 0`` (automatic): ``FACTOR`` (10) times the median duration of the
  training phases of the same kind that completed (every node answered), at least ``FLOOR``
  (120 s); until one of that kind has completed, ``FIRST`` (3,600 s, Flower's own default: the
  first round may be slow to start on a GPU).

The kind (:attr:`RoundClock.kind`, set by the strategy from
:meth:`strategies.base.PersonalizedStrategy.deadline_kind`) separates rounds whose local work
differs by more than the factor: FedICRA's warm-up rounds copy the global model and train 10
steps (about 30 s on the CPU protocol), while its first blending round also learns the
blending weights over most of the site's training cases until a stopping rule (7 to 10 times
as long, more on a loaded machine). With one median for both, the first blend could be cut off
by a deadline computed from the warm-up, and a site dropped from a round because the machine
was busy.

A phase that does more local work than a round (FT's fine-tuning round) multiplies the
deadline by :attr:`RoundClock.scale`, set by the strategy. The grid also records which node
each message went to, so the strategy can name the nodes whose reply did not come (see
:meth:`strategies.base.PersonalizedStrategy._valid`).
"""
from __future__ import annotations

import logging
import statistics
import time
from typing import Dict, Iterable, List, Optional

from .flower import Grid, Message, MessageType, RecordDict

log = logging.getLogger("fedicra.server")

#: Automatic deadline: this many times the median completed training phase ...
FACTOR = 10.0
#: ... and never less than this (seconds).
FLOOR = 120.0
#: Automatic deadline before any training phase has completed (seconds).
FIRST = 3600.0


class RoundClock:
    """Deadline policy and bookkeeping of the last phase a :class:`DeadlineGrid` ran.

    Parameters
    ----------
    fixed : float
        ``round_timeout``: seconds (> 0) or 0 for the automatic deadline.
    """

    def __init__(self, fixed: float = 0.0) -> None:
        self.fixed = float(fixed)
        #: durations (s, divided by their scale) of the completed training phases, by kind
        self.durations: Dict[str, List[float]] = {}
        #: the kind of local work of the coming phases: each kind's deadline comes from the
        #: completed phases of that kind only
        self.kind = "train"
        #: work of the coming phases relative to a plain round (>= 1)
        self.scale = 1.0
        #: node ids the last phase's messages went to (None: no phase ran through the grid)
        self.sent: Optional[List[int]] = None
        #: message id -> destination node of the last phase (to place SuperLink error replies)
        self.node_of: Dict[str, int] = {}
        #: the deadline the last phase ran under (s)
        self.last_timeout: float = 0.0
        #: a shorter deadline for the next phases while set (s; the identification of nodes)
        self.cap: Optional[float] = None

    def timeout(self) -> float:
        """Seconds the next phase may take."""
        if self.cap is not None:
            return min(self.cap, self._timeout())
        return self._timeout()

    def _timeout(self) -> float:
        if self.fixed > 0:
            base = self.fixed
        elif not self.durations.get(self.kind):
            base = FIRST
        else:
            base = max(FLOOR, FACTOR * statistics.median(self.durations[self.kind]))
        return base * max(1.0, self.scale)

    def record(self, seconds: float) -> None:
        """A training phase of the current kind in which every node answered took ``seconds``."""
        self.durations.setdefault(self.kind, []).append(float(seconds) / max(1.0, self.scale))

    def describe(self) -> str:
        """Where the last deadline came from, for log lines."""
        if self.fixed > 0:
            return f"round_timeout = {self.fixed:g} s"
        seen = self.durations.get(self.kind)
        of_kind = "" if self.kind == "train" else f" of kind {self.kind!r}"
        if not seen:
            return f"round_timeout = 0: {FIRST:.0f} s until a round{of_kind} has completed"
        return (f"round_timeout = 0: {FACTOR:g} x the median round{of_kind} "
                f"({statistics.median(seen):.1f} s), at least {FLOOR:.0f} s")

    def node_for(self, reply: Message) -> int:
        """The node a reply answers for: its sender, or for an error the SuperLink made up
        (node unavailable, message expired) the destination of the message it replies to."""
        node = self.node_of.get(str(reply.metadata.reply_to_message_id))
        return int(node) if node is not None else int(reply.metadata.src_node_id)


class GridProxy(Grid):
    """A Grid that hands every call to the wrapped ``grid`` (only its public methods); wrappers
    override what they change."""

    def __init__(self, grid: Grid) -> None:
        self.grid = grid

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
        return self.grid.send_and_receive(messages, timeout=timeout)


class DeadlineGrid(GridProxy):
    """Delegates to ``grid``; every :meth:`send_and_receive` waits at most ``clock.timeout()``."""

    def __init__(self, grid: Grid, clock: RoundClock) -> None:
        super().__init__(grid)
        self.clock = clock

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: Optional[float] = None) -> Iterable[Message]:
        """Flower's ``timeout`` is ignored: the clock's deadline applies."""
        messages = list(messages)
        clock = self.clock
        clock.sent = [int(m.metadata.dst_node_id) for m in messages]
        clock.node_of = {}
        if not messages:
            return []
        limit = clock.timeout()
        clock.last_timeout = limit
        start = time.monotonic()
        replies = list(self.grid.send_and_receive(messages, timeout=limit))
        elapsed = time.monotonic() - start
        ids = [str(m.metadata.message_id or "") for m in messages]
        if all(ids) and len(set(ids)) == len(ids):  # set when the messages were pushed
            clock.node_of = dict(zip(ids, clock.sent))
        # the strategy names the late nodes (PersonalizedStrategy._valid)
        if len(replies) >= len(messages) and all(m.metadata.message_type == MessageType.TRAIN for m in messages):
            clock.record(elapsed)
        return replies
