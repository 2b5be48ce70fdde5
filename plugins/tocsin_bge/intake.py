"""Which pushed items become events: one place for the live source and for replay.

``PushIntake`` holds what a source keeps across connections to drop repeats: the
``seq_id`` seen per channel (several connections and resubscribes repeat them) and the
ids of the events emitted lately. ``BGESource.on_push`` and ``BGESource.frame_parser``
both call ``PushIntake.take``, so a replayed push gives the events the live one gave.
No I/O here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import NamedTuple

from tocsin import Event, EventFactory, Numbering, RecentIds, SourceContext, stable_id

from .protocol import (
    ALL,
    SNAPSHOT_TYPES,
    ChannelKey,
    Item,
    Push,
    SeqTracker,
    candle_time,
    normalize,
)

STATE_TYPES = SNAPSHOT_TYPES | {"assets"}
"""Pushes of a state (a book, a balance): a fact when the state changes."""


class Taken(NamedTuple):
    """What one push gave: its items less repeated ``seq_id`` (candles follow them for
    the cursor), the events of those not emitted lately, the ``seq_id`` ranges skipped
    before them (``(first, last)``, for ``source.gap``), and the states it changed
    (``(state key, content id)``, to save after the events)."""

    items: list[Item]
    events: list[Event]
    missing: list[tuple[int, int]]
    states: list[tuple[str, str]]


def state_key(key: ChannelKey, item: Item, index: int) -> str:
    """Which state an item is of: its channel's book, or the balance of one currency
    (BGE names it ``symbol``; the ``index``-th item of its push, when it names none)."""
    if key.type != "assets":
        return key.label
    for name in ("symbol", "currency", "coin"):
        currency = item.data.get(name)
        if isinstance(currency, str) and currency:
            return f"{key.label}|{currency}"
    return f"{key.label}|#{index}"


class PushIntake:
    """The subscribed channels and the repeats to drop, kept across connections."""

    def __init__(
        self, channels: Iterable[ChannelKey], clock: Callable[[], float] | None = None
    ) -> None:
        self.channels = frozenset(channels)
        self.recent = RecentIds()
        self.seqs = SeqTracker()
        # States (books of orderbook and percent10, balances of assets): the content id of
        # the last of each (``state_key``), and the numbers of their changes. ``recall``
        # gives one its value from before a restart.
        self.states: dict[str, str] = {}
        self.recalled: set[str] = set()
        self.changes = Numbering(clock)

    def route(self, channel: ChannelKey) -> ChannelKey | None:
        """The subscription a push belongs to (``orders`` of ``all`` take every pair's)."""
        if channel in self.channels:
            return channel
        every = ChannelKey("orders", ALL, "")
        if channel.type == "orders" and every in self.channels:
            return every
        return None

    def take(
        self,
        key: ChannelKey,
        push: Push,
        factory: SourceContext | EventFactory,
        *,
        backfill: bool,
        gaps: bool,
    ) -> Taken:
        """The events of ``push`` on the subscription ``key`` (a candles ``req`` answer with
        ``backfill``: sorted by time, no ``seq_id`` check); ``gaps`` reports skipped
        ``seq_id``. Raises ``ValueError`` for a malformed push (nothing is remembered)."""
        items = pushed = normalize(push)
        missing: list[tuple[int, int]] = []
        if backfill:
            items.sort(key=lambda i: candle_time(i.data, push) or 0)
        elif key.type not in SNAPSHOT_TYPES:  # their seq_id "is ignored" (BGE's docs)
            seqs = [i.seq_id for i in items if i.seq_id is not None]
            if seqs:
                fresh, missing = self.seqs.admit(key, seqs, gaps=gaps)
                items = [i for i in items if i.seq_id is None or i.seq_id in fresh]
        states: list[tuple[str, str]] = []
        if key.type in STATE_TYPES:
            place = {id(item): index for index, item in enumerate(pushed)}  # for state_key
            changed = []
            for item in items:
                state = state_key(key, item, place[id(item)])
                moved = self._state(state, item)
                if moved is not None:
                    changed.append(moved)
                    states.append((state, item.id))
            items = changed
        events = [
            factory.event(item.type, item.data, id=item.id, time=item.time)
            for item in items
            if not self.recent.seen(item.id)
        ]
        return Taken(items, events, missing, states)

    def to_recall(self, key: ChannelKey, push: Push) -> list[str]:
        """The states ``push`` holds whose value from before a restart was not asked for
        yet in this run (``recall`` each, with what was saved, before ``take``)."""
        if key.type not in STATE_TYPES:
            return []
        if key.type in SNAPSHOT_TYPES:  # one state per channel: no need to read the push
            states = {key.label}
        else:
            try:
                states = {state_key(key, item, i) for i, item in enumerate(normalize(push))}
            except ValueError:
                return []  # take() rejects it
        return sorted(states - self.recalled)

    def recall(self, state: str, saved: str | None) -> None:
        """What ``state`` was when last saved (None: nothing saved): a push of the same
        content is no news, another is a change."""
        self.recalled.add(state)
        if saved and state not in self.states:
            self.states[state] = saved

    def _state(self, state: str, item: Item) -> Item | None:
        """A state's push is a fact when it differs from the last one. Its first has the
        id of its content (the same unchanged book re-sent after a restart, with nothing
        saved, is no news); a change also holds its number, so a book that returns to an
        earlier state (A, B, A) is a new fact each time."""
        last = self.states.get(state)
        if last == item.id:
            return None  # unchanged: BGE pushes an unchanged book twice a second
        self.states[state] = item.id
        if last is None:
            return item
        return item._replace(id=stable_id(item.id, "change", self.changes.next()))
