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


class Taken(NamedTuple):
    """What one push gave: its items less repeated ``seq_id`` (candles follow them for
    the cursor), the events of those not emitted lately, and the ``seq_id`` ranges
    skipped before them (``(first, last)``, for ``source.gap``)."""

    items: list[Item]
    events: list[Event]
    missing: list[tuple[int, int]]


class PushIntake:
    """The subscribed channels and the repeats to drop, kept across connections."""

    def __init__(
        self, channels: Iterable[ChannelKey], clock: Callable[[], float] | None = None
    ) -> None:
        self.channels = frozenset(channels)
        self.recent = RecentIds()
        self.seqs = SeqTracker()
        # Snapshots (orderbook, percent10): the content id of each channel's last one, and
        # the numbers of their changes.
        self.books: dict[ChannelKey, str] = {}
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
        items = normalize(push)
        missing: list[tuple[int, int]] = []
        if backfill:
            items.sort(key=lambda i: candle_time(i.data, push) or 0)
        elif key.type not in SNAPSHOT_TYPES:  # their seq_id "is ignored" (BGE's docs)
            seqs = [i.seq_id for i in items if i.seq_id is not None]
            if seqs:
                fresh, missing = self.seqs.admit(key, seqs, gaps=gaps)
                items = [i for i in items if i.seq_id is None or i.seq_id in fresh]
        if key.type in SNAPSHOT_TYPES:
            items = [moved for item in items if (moved := self._snapshot(key, item))]
        events = [
            factory.event(item.type, item.data, id=item.id, time=item.time)
            for item in items
            if not self.recent.seen(item.id)
        ]
        return Taken(items, events, missing)

    def _snapshot(self, key: ChannelKey, item: Item) -> Item | None:
        """A book's snapshot is a fact when it differs from the channel's last one. Its
        first has the id of its content (the same unchanged book re-sent after a restart
        is no news); a change also holds its number, so a book that returns to an earlier
        state (A, B, A) is a new fact each time."""
        last = self.books.get(key)
        if last == item.id:
            return None  # unchanged: BGE pushes an unchanged book twice a second
        self.books[key] = item.id
        if last is None:
            return item
        return item._replace(id=stable_id(item.id, "change", self.changes.next()))
