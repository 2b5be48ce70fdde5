"""From result lists to events: one path for the live source and for replayed frames.

``Channel.facts`` (in ``backfill``) turns a pushed or polled result list into facts per
watch; ``FactMemory`` drops a fact emitted before with the same ``removed`` flag;
``new_events`` builds the events of the rest. ``ViteSource`` goes through them for every
push and poll answer, and so does ``ViteFrameParser``, the parser of frames recorded
from the source (``tocsin record``), for ``tocsin test --frames``.

What replays, and what cannot:

- **Push subscriptions.** A notification names its subscription only by an id the node
  chose, and the recorded frames hold the node's answers, not the requests. The source
  subscribes its channels one at a time, in the order of the config (``backfill.plan``),
  with request ids from 1 on each connection; so an answer to request 1 starts a
  connection, and the ids answered next belong to the channels in that order (a -32601
  answer is the fallback to the seed's topic name: the same channel's next answer
  follows). Pushes on a learnt id replay, rollbacks as ``removed`` events. A push on an
  id not learnt (its connection's answers are not in the frames, a recording made with
  another config, or an id of a previous connection, which the live source rejects
  too) raises ``ValueError``: a topic is never guessed from an item's shape, since
  ``{hash, height}`` is a snapshot or one account's block alike, and the by-address
  topics do not carry their address.
- **Polling filters** (``mode = "poll"``): the ids answered to the first creations are
  learnt the same way (filters outlive connections, so only channels without a filter
  wait for one); a ``getChangesByFilterId`` answer names its filter and replays. A
  filter created again after it expired is not learnt (the answer does not say which
  channel asked): its answers raise ``ValueError``. A poll answer given as a bare list
  names no filter and is skipped, like the ledger answers.
- **Not replayed:** the backfill (ledger answers do not say what was asked: a page of
  snapshot blocks and a page of account blocks look alike, and which heights of it are
  kept depends on the request), so facts fetched after a reconnect or a restart are
  missing from a replay (a fact both fetched and pushed replays from the push); and
  ``source.up``/``down``/``stale``/``gap``, which come from the connection, not from a
  frame. The ``time`` of a pushed fact is the receipt time live (pushes carry no
  timestamp) and the replay's own on replay.
- A frame whose items are partly malformed gives the events of the good ones (live, the
  others are counted as rejects); when it gives no event, its first problem is raised.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable

from tocsin import Event, EventFactory, SourceContext

from .backfill import Channel
from .protocol import Fact, Notification, Response, created_id, parse_frame, poll_changes

REMEMBERED = 50_000  # fact ids remembered to drop re-pushed facts


class FactMemory:
    """The recent facts emitted, each with its last ``removed`` flag and how many data
    fields it had (bounded)."""

    def __init__(self, size: int = REMEMBERED) -> None:
        self.size = size
        self._facts: OrderedDict[str, tuple[bool, int]] = OrderedDict()

    def is_new(self, fact_id: str, removed: bool, fields: int = 0) -> bool:
        """True unless this fact was last emitted with the same flag and as many fields;
        remembers it.

        One account block reaches two subscriptions when both ``account_block`` of every
        account and of one address are watched: the first gives its hash alone, the
        second its height and address too. The fuller one goes out as well (same id: a
        rule that fired on the first does not fire again), so a rule on the address sees
        it whichever came first."""
        last = self._facts.get(fact_id)
        if last is not None and last[0] is removed and last[1] >= fields:
            self._facts.move_to_end(fact_id)
            return False
        self._facts[fact_id] = (removed, fields)
        self._facts.move_to_end(fact_id)
        if len(self._facts) > self.size:
            self._facts.popitem(last=False)
        return True


def new_events(
    memory: FactMemory, factory: SourceContext | EventFactory, facts: Iterable[Fact]
) -> list[Event]:
    """The events of the facts not emitted yet (a rollback's re-add is new), in order."""
    return [
        factory.event(fact.type, fact.data, id=fact.id, time=fact.time, removed=fact.removed)
        for fact in facts
        if memory.is_new(fact.id, fact.removed, len(fact.data))
    ]


class ViteFrameParser:
    """Recorded frames back into the events the source emitted (the module docstring
    says what replays); a ``FrameParser``: call it with each frame, in order."""

    def __init__(
        self, channels: list[Channel], *, push: bool, factory: SourceContext | EventFactory
    ) -> None:
        self.channels = channels
        self.push = push
        self.factory = factory
        self.memory = FactMemory()
        self.by_id: dict[str, Channel] = {}
        self.waiting: list[Channel] = []  # channels whose id the next answers give, in order

    def __call__(self, raw: str | bytes) -> list[Event]:
        try:
            messages = parse_frame(raw)
        except ValueError as err:
            raise ValueError(f"malformed frame: {err}") from None
        events: list[Event] = []
        problems: list[str] = []
        for msg in messages:
            if isinstance(msg, Notification):
                events += self._items(self.by_id.get(msg.subscription), msg.result, problems)
            elif isinstance(msg, Response):
                events += self._answer(msg, problems)
        if problems and not events:
            raise ValueError(problems[0])
        return events

    def _answer(self, msg: Response, problems: list[str]) -> list[Event]:
        if str(msg.id) == "1":  # the first request of a connection: the subscribing starts
            if self.push:
                self.by_id = {}  # the ids of the last connection are dead
                self.waiting = list(self.channels)
            else:  # filters outlive connections: only those never created wait for one
                known = set(map(id, self.by_id.values()))
                self.waiting = [c for c in self.channels if id(c) not in known]
        if self.waiting:
            if msg.error is not None and msg.error.method_missing:
                return []  # the source tries the next spelling for the same channel
            sub_id = created_id(msg.result) if msg.error is None else None
            if sub_id is None:
                self.waiting = []  # refused: the source drops this connection
            else:
                self.by_id[sub_id] = self.waiting.pop(0)
            return []
        result = msg.result
        if self.push or not isinstance(result, dict) or "subscription" not in result:
            return []  # ledger answers, heights, probes
        sub = result.get("subscription")
        channel = self.by_id.get(sub) if isinstance(sub, str) else None
        try:
            items = poll_changes(result)
        except ValueError as err:
            problems.append(str(err))
            return []
        return self._items(channel, items, problems, what="poll answer for an unknown filter id")

    def _items(
        self,
        channel: Channel | None,
        items: list[object],
        problems: list[str],
        what: str = "push for an unknown subscription id",
    ) -> list[Event]:
        if channel is None:
            problems.append(what)
            return []
        groups, rejects = channel.facts(items)
        problems += rejects
        return [e for _, facts in groups for e in new_events(self.memory, self.factory, facts)]
