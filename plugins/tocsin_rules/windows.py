"""Sliding-window arithmetic, with no events, alerts or I/O: plain numbers in and out.

One rule for every window: a point at time ``t`` is inside the window at ``now`` while
``t + window > now``, and leaves it at ``t + window`` exactly. Every check below is written
with that one expression, so the time a kind schedules (``t + window``) and the test that
the point has left can never disagree by a float rounding.

Points are kept in time order in plain lists. With receipt time they arrive in order;
with event time a late point is inserted where it belongs (``bisect``). Lists rather than
deques: most groups hold a few points, and an empty deque alone costs 600 bytes, which
100,000 groups would pay; dropping the expired head is one slice deletion.
"""

from __future__ import annotations

from bisect import insort
from collections.abc import Iterable
from decimal import Decimal
from typing import Any

from .numbers import add, subtract, total


def expired(t: float, window: float, now: float) -> bool:
    """A point at ``t`` has left a ``window`` at ``now``."""
    return t + window <= now


def _gone(times: Iterable[float], window: float, now: float) -> int:
    """How many of the (time-ordered) leading ``times`` have left the window."""
    gone = 0
    for t in times:
        if not expired(t, window, now):
            break
        gone += 1
    return gone


RETRACT_SLACK = 8
"""Event times a count window keeps beyond its ``count`` (at most ``count`` more): that many
of the newest events may be taken back (a rollback) and the count stays exact."""


class CountWindow:
    """The times and event ids of the newest ``limit`` events, and up to ``RETRACT_SLACK``
    more: enough to tell whether ``limit`` of them fall in the window, so memory is bounded
    by ``limit`` whatever the event rate. An event the provider took back is no longer
    counted (``discard``)."""

    __slots__ = ("keep", "limit", "points")

    def __init__(self, limit: int, points: Iterable[tuple[float, str]] = ()) -> None:
        self.limit = limit
        self.keep = limit + min(limit, RETRACT_SLACK)
        self.points: list[tuple[float, str]] = (
            sorted(points, key=_time)[-self.keep :] if self.keep else []
        )

    def __len__(self) -> int:
        return len(self.points)

    def add(self, t: float, event_id: str = "") -> None:
        points = self.points
        if not points or t >= points[-1][0]:
            points.append((t, event_id))
        else:
            insort(points, (t, event_id), key=_time)
        if len(points) > self.keep:
            del points[0]

    def discard(self, event_id: str) -> bool:
        """Stop counting an event the provider took back; whether it was counted."""
        if not event_id:
            return False
        kept = [p for p in self.points if p[1] != event_id]
        found = len(kept) < len(self.points)
        self.points = kept
        return found

    def expire(self, window: float, now: float) -> None:
        """Forget the times that have left the window."""
        gone = _gone((t for t, _ in self.points), window, now)
        if gone:
            del self.points[:gone]

    def count(self, window: float, now: float) -> int:
        """Events in the window at ``now`` (at most the ``limit`` and its slack), without
        forgetting any."""
        return len(self.points) - _gone((t for t, _ in self.points), window, now)

    def reached(self, window: float, now: float) -> bool:
        return self.count(window, now) >= self.limit

    def oldest(self) -> float | None:
        return self.points[0][0] if self.points else None

    def newest(self) -> float | None:
        return self.points[-1][0] if self.points else None

    def dump(self) -> list[list[float | str]]:
        return [[t, i] for t, i in self.points]


MAX_SUM_POINTS = 4096
"""Points a ``sum`` window keeps per group; beyond, neighbours are merged."""


class SumWindow:
    """``(time, value, event id)`` points and their running total (exact: ``Decimal``), at
    most ``MAX_SUM_POINTS`` of them. An event the provider took back is taken out of the
    sum, unless its point was merged with a neighbour."""

    __slots__ = ("points", "total")

    def __init__(self, points: Iterable[tuple[float, Decimal, str]] = ()) -> None:
        self.points: list[tuple[float, Decimal, str]] = sorted(points, key=_time)
        self.total = total(v for _, v, _ in self.points)

    def __len__(self) -> int:
        return len(self.points)

    def add(self, t: float, value: Decimal, event_id: str = "") -> None:
        points = self.points
        if not points or t >= points[-1][0]:
            points.append((t, value, event_id))
        else:
            insort(points, (t, value, event_id), key=_time)
        self.total = add(self.total, value)
        if len(points) > MAX_SUM_POINTS:
            self._coalesce()

    def discard(self, event_id: str) -> bool:
        """Take an event the provider took back out of the sum; whether it was in it."""
        if not event_id:  # a merged point's, or none
            return False
        kept = []
        for point in self.points:
            if point[2] == event_id:
                self.total = subtract(self.total, point[1])
            else:
                kept.append(point)
        found = len(kept) < len(self.points)
        self.points = kept
        return found

    def _coalesce(self) -> None:
        """Halve the points: each two neighbours become one, at the later one's time.

        Memory (and the state written with each commit) stays within ``MAX_SUM_POINTS``
        per group whatever the event rate. The total is unchanged; a value may leave the
        window a little later than it arrived plus the window, by the time to its
        neighbour: at a steady rate about a thousandth of the window. A merged point
        keeps no event id: its events can no longer be taken out of the sum.
        """
        points = self.points
        merged = [
            (points[i + 1][0], add(points[i][1], points[i + 1][1]), "")
            for i in range(0, len(points) - 1, 2)
        ]
        if len(points) % 2:
            merged.append(points[-1])
        self.points = merged

    def expire(self, window: float, now: float) -> None:
        points = self.points
        gone = _gone((t for t, _, _ in points), window, now)
        if gone == len(points):
            points.clear()
            self.total = Decimal(0)
        elif gone:
            self.total = subtract(self.total, total(v for _, v, _ in points[:gone]))
            del points[:gone]

    def sum(self, window: float, now: float) -> Decimal:
        """The total in the window at ``now``, without forgetting any point."""
        out = self.total
        for t, value, _ in self.points:
            if not expired(t, window, now):
                break
            out = subtract(out, value)
        return out

    def oldest(self) -> float | None:
        return self.points[0][0] if self.points else None

    def newest(self) -> float | None:
        return self.points[-1][0] if self.points else None

    def dump(self) -> list[list[float | str]]:
        return [[t, str(v), i] for t, v, i in self.points]


MAX_VALUE_POINTS = 4096
"""Distinct values a ``change`` window keeps per group; beyond, every other one goes."""


class ValueWindow:
    """The values of a field over a window, oldest first, for ``change``: ``(time, value,
    event id, moved)`` points, and the newest value before the window however old (the
    last value, when none is within it).

    Equal consecutive values are kept as one point holding the newest time of the run:
    that point stays in the window exactly as long as some value of the run does, so
    the oldest value in the window is unchanged, and a feed that re-sends the same price
    costs no memory. Such a point keeps no event id: taking one of its events back
    leaves the value, which the others gave too.

    A value that moved (fired) starts the window again: the values before it are no
    longer references (``start`` is its index), but they stay until they leave the
    window, so that a move the provider takes back (``discard``) leaves the window as it
    was before it. Of the values that have left the window the newest stays, however
    old: it is the last value while none is within the window, and again once the
    provider takes back those after it.
    """

    __slots__ = ("points", "start")

    def __init__(self, points: Iterable[tuple[float, Decimal, str, bool]] = ()) -> None:
        self.points: list[tuple[float, Decimal, str, bool]] = list(points)
        self.start = self._last_move(len(self.points))

    def __len__(self) -> int:
        return len(self.points)

    def add(self, t: float, value: Decimal, event_id: str = "") -> None:
        """Append a value no older than the newest one."""
        points = self.points
        if points and points[-1][1] == value and not points[-1][3]:
            points[-1] = (t, value, "", False)
        else:
            points.append((t, value, event_id, False))
            if len(points) > MAX_VALUE_POINTS:
                self._thin()

    def restart(self, t: float, value: Decimal, event_id: str = "") -> None:
        """Start the window again from a value that moved (fired)."""
        self.points.append((t, value, event_id, True))
        self.start = len(self.points) - 1
        if len(self.points) > MAX_VALUE_POINTS:
            self._thin()

    def discard(self, event_id: str) -> bool:
        """Take back the value of an event the provider took back; whether it was here. If
        it moved, the window starts again from the move before it, if any."""
        if not event_id:  # a run's, or none
            return False
        points = self.points
        for i in range(len(points) - 1, -1, -1):
            if points[i][2] == event_id:
                break
        else:
            return False
        del points[i]
        if i < self.start:
            self.start -= 1
        elif i == self.start:
            self.start = self._last_move(i)
        return True

    def _last_move(self, end: int) -> int:
        """The index of the last value that moved before ``end``; 0 if none did."""
        for i in range(end - 1, -1, -1):
            if self.points[i][3]:
                return i
        return 0

    def _thin(self) -> None:
        """Keep every other point, the oldest, the newest and the one the window started
        again from always.

        Memory stays within ``MAX_VALUE_POINTS`` per group whatever the feed does. The
        oldest value in the window and the last one, the two a move is measured from,
        are kept; once the oldest leaves, the next reference may be one point further.
        """
        points, start, last = self.points, self.start, len(self.points) - 1
        self.points = [p for i, p in enumerate(points) if i % 2 == 0 or i in (start, last)]
        self.start = (start + 1) // 2  # the even indices before it stayed

    def expire(self, window: float, now: float) -> None:
        """Forget the values that have left the window, but the newest of them: a move is
        measured from the last value however old it is (a feed that sends a price only
        when it changes says nothing while the price holds), and it is the last value
        again if the provider takes back the values after it."""
        gone = _gone((p[0] for p in self.points), window, now) - 1
        if gone > 0:
            del self.points[:gone]
            self.start = max(0, self.start - gone)

    def reference(self, window: float, now: float) -> Decimal:
        """The oldest value a move is measured from: the first within the window since
        the window started again, else the last one (there must be one)."""
        points = self.points
        for i in range(self.start, len(points)):
            if not expired(points[i][0], window, now):
                return points[i][1]
        return points[-1][1]

    def inside(self, window: float, now: float) -> list[tuple[float, Decimal, str, bool]]:
        """The points a move is measured from within the window at ``now``, without
        forgetting any."""
        return [p for p in self.points[self.start :] if not expired(p[0], window, now)]

    def trimmed_at(self, window: float) -> float | None:
        """When every value will have left the window, so ``expire`` keeps only the last
        (None: one value)."""
        return self.points[-1][0] + window if len(self.points) > 1 else None

    def newest(self) -> tuple[float, Decimal, str, bool] | None:
        return self.points[-1] if self.points else None

    def dump(self) -> list[list[float | str | bool]]:
        return [[t, str(v), i, moved] for t, v, i, moved in self.points]


def _time(point: tuple[Any, ...]) -> float:
    return float(point[0])
