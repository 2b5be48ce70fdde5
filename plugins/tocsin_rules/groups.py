"""The groups of one stateful rule: least recently seen first, woken by a deadline heap.

A rule ticked once a second may hold 10,000+ groups; a tick must cost what is due, not
what exists. Each group holds the time it next needs attention (``due``: a window
draining, a silence ending, a realert) and the heap holds one live entry per group that
has one. A group whose deadline moves later keeps its earlier entry, which wakes it, finds
it not yet due and re-files it: that is one heap push per wake, never one per event.
"""

from __future__ import annotations

import heapq
import itertools
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Generic, TypeVar


@dataclass(slots=True)
class Group:
    """What every group carries for the table: its deadline and its heap entry."""

    due: float | None = None
    entry: int = 0  # the token of this group's live heap entry; 0: none
    entry_at: float = 0.0


G = TypeVar("G", bound=Group)

SPARE_SCAN = 64
"""Groups looked at, least recently seen first, for one to evict that need not be spared."""


class GroupTable(Generic[G]):
    """Group key -> state, with deadlines, a size cap and the set of groups to persist.

    ``max_groups`` bounds memory when ``group_by`` turns out to have unbounded values: the
    least recently seen group is forgotten (``evicted`` counts them).
    """

    def __init__(self, max_groups: int) -> None:
        self.max_groups = max_groups
        self.groups: OrderedDict[str, G] = OrderedDict()
        self.changed: dict[str, None] = {}  # keys to persist (or delete), in order
        self.evicted = 0
        self._heap: list[tuple[float, int, str]] = []
        self._tokens = itertools.count(1)

    def __len__(self) -> int:
        return len(self.groups)

    def __contains__(self, key: object) -> bool:
        return key in self.groups

    def __iter__(self) -> Iterator[str]:
        return iter(self.groups)

    def get(self, key: str) -> G | None:
        return self.groups.get(key)

    def add(self, key: str, group: G, spare: Callable[[G], bool] | None = None) -> G | None:
        """Add a new group as the most recently seen; returns the group evicted for room.

        The least recently seen group goes, except one ``spare`` says to keep (a firing
        one, whose resolved would never come) when one of the ``SPARE_SCAN`` least
        recently seen may go instead."""
        self.groups[key] = group
        self.changed[key] = None
        if len(self.groups) <= self.max_groups:
            return None
        old = next(iter(self.groups))
        if spare is not None:
            for candidate in itertools.islice(self.groups, SPARE_SCAN):
                if candidate != key and not spare(self.groups[candidate]):
                    old = candidate
                    break
        evicted = self.groups.pop(old)
        self.changed[old] = None
        self.evicted += 1
        return evicted

    def restore(self, key: str, group: G) -> None:
        """Put back a group read from the state database (not marked for saving again)."""
        self.groups[key] = group
        while len(self.groups) > self.max_groups:
            old, _ = self.groups.popitem(last=False)
            self.changed[old] = None
            self.evicted += 1

    def seen(self, key: str) -> None:
        """Mark a group as the most recently seen (it is evicted last)."""
        self.groups.move_to_end(key)

    def mark(self, key: str) -> None:
        """Persist this group's state at the next ``changes``."""
        self.changed[key] = None

    def drop(self, key: str) -> None:
        """Forget a group (its saved state is deleted at the next ``changes``)."""
        if self.groups.pop(key, None) is not None:
            self.changed[key] = None
            if not self.groups:  # a dict keeps its largest size: give a burst's memory back
                self.groups = OrderedDict()

    def schedule(self, key: str, group: G, due: float | None) -> None:
        """Wake ``group`` at ``due`` (None: nothing will happen to it by time alone)."""
        group.due = due
        if due is None or (group.entry and group.entry_at <= due):
            return  # no deadline, or an entry that wakes it early enough exists
        group.entry = next(self._tokens)
        group.entry_at = due
        heapq.heappush(self._heap, (due, group.entry, key))
        if len(self._heap) > 2 * len(self.groups) + 64:
            self._compact()

    def due(self, now: float) -> list[str]:
        """Keys of the groups due at ``now``, each once, taken off the heap."""
        heap = self._heap  # compacted in place only: this name stays valid
        found: list[str] = []
        while heap and heap[0][0] <= now:
            _, token, key = heapq.heappop(heap)
            group = self.groups.get(key)
            if group is None or group.entry != token:
                continue  # the group is gone, or has a newer entry
            group.entry = 0
            if group.due is None:
                continue
            if group.due > now:  # its deadline moved later: re-file it
                self.schedule(key, group, group.due)
                continue
            found.append(key)
        return found

    def changes(self, encode: Callable[[G], Any]) -> list[tuple[str, Any]]:
        """``(key, state)`` of each group changed since the last call; None: deleted."""
        out = []
        for key in self.changed:
            group = self.groups.get(key)
            out.append((key, None if group is None else encode(group)))
        self.changed = {}
        return out

    def next_wake(self) -> float | None:
        """The earliest deadline filed (it may be stale: never later than the real one)."""
        return self._heap[0][0] if self._heap else None

    def heap_size(self) -> int:
        return len(self._heap)

    def _compact(self) -> None:
        """Rebuild the heap from the live entries (stale ones pile up after evictions)."""
        self._heap[:] = [(g.entry_at, g.entry, k) for k, g in self.groups.items() if g.entry]
        heapq.heapify(self._heap)
