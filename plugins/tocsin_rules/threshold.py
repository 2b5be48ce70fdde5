"""``kind = "threshold"``: fires when ``count`` events (or a ``sum`` of ``field``) fall in
the sliding ``window``; resolves on time, as soon as the window drops below the bound.

Memory per group: with ``count``, the newest ``count`` event times and ids (older ones can
never matter), and up to ``RETRACT_SLACK`` more; with ``sum``, one ``(time, value, id)`` per
counted event in the window, at most ``MAX_SUM_POINTS`` (neighbours merge beyond). A group
is forgotten once its window is empty and it is not firing.

An event the provider takes back (``removed``: a Vite rollback) is no longer counted
(``discard``), whether or not an alert carried it; if the window then drops below the
bound, a firing group resolves at the next tick. Taken back and pushed again, it counts
once. (A fact pushed twice with no removal between is the source's to drop: the bundled
sources do.)
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from typing import Any, ClassVar

from tocsin import Event, Firing, RuleConfig, get_path, split_path

from .config import ThresholdConfig
from .lifecycle import Alerting, LifecycleKind
from .numbers import show, to_decimal
from .windows import CountWindow, SumWindow


@dataclass(slots=True, kw_only=True)
class ThresholdGroup(Alerting):
    """A group's window, and its alert (carrying the event that crossed the bound)."""

    points: CountWindow | SumWindow


class ThresholdKind(LifecycleKind[ThresholdGroup]):
    """Fires when the events of a group within ``window`` reach ``count``, or the sum of
    their ``field`` reaches ``sum``; resolves when the window drops below it again."""

    name = "threshold"
    Config: ClassVar[type[RuleConfig]] = ThresholdConfig

    def __init__(self, config: RuleConfig) -> None:
        super().__init__(config)
        if not isinstance(config, ThresholdConfig):
            raise TypeError("the threshold kind needs a ThresholdConfig")
        self.limit = config.count or 0
        self.field = None if config.field is None else split_path(config.field)
        self.bound = config.sum if config.sum is not None else Decimal(0)

    def new_points(self) -> CountWindow | SumWindow:
        return SumWindow() if self.field is not None else CountWindow(self.limit)

    def reached(self, group: ThresholdGroup, now: float) -> bool:
        points = group.points
        if isinstance(points, CountWindow):
            return points.reached(self.window, now)
        return points.sum(self.window, now) >= self.bound

    def on_event(self, event: Event, group_key: str, now: float) -> list[Firing]:
        self.begin(now)
        value = None
        if self.field is not None:
            value = to_decimal(get_path(event.data, self.field))
            if value is None or value <= 0:  # only amounts add up; see the README
                self.skipped += 1
                return []
        t = self.moment(event, now)
        if t is None:
            return []
        out: list[Firing] = []
        group = self.table.get(group_key)
        if group is None:
            group = ThresholdGroup(points=self.new_points())
            self.admit(group_key, group, now)
        else:
            self.table.seen(group_key)
            out.extend(self.catch_up(group_key, group, now))
        points = group.points
        points.expire(self.window, now)
        if isinstance(points, SumWindow):
            assert value is not None
            points.add(t, value, str(event.id))
        else:
            points.add(t, str(event.id))
        if not group.firing and self.reached(group, now):
            out.extend(self.fire(group_key, group, event, now))
        self.settle(group_key, group)
        return out

    def discard(self, event: Event, group_key: str, now: float) -> None:
        group = self.table.get(group_key)
        if group is None or not group.points.discard(str(event.id)):
            return
        self.settle(group_key, group)
        if group.firing and self.table.get(group_key) is group and not self.reached(group, now):
            self.table.schedule(group_key, group, now)  # resolves at the next tick

    def wake(self, key: str, group: ThresholdGroup, now: float) -> list[Firing]:
        group.points.expire(self.window, now)
        if not group.firing:
            return []
        if self.reached(group, now):
            return self.repeat_if_due(key, group, now)
        assert group.event is not None
        crossed, group.event = group.event, None
        return self.resolve(key, group, crossed)

    def next_due(self, group: ThresholdGroup) -> float | None:
        points = group.points
        if not group.firing:
            newest = points.newest()  # everything has left the window: forget the group
            return None if newest is None else newest + self.window
        oldest = points.oldest()  # the first moment the window can drop below the bound
        due = None if oldest is None else oldest + self.window
        if group.next_repeat is not None and (due is None or group.next_repeat < due):
            due = group.next_repeat
        return due

    def needed(self, group: ThresholdGroup) -> bool:
        return group.firing or len(group.points) > 0

    def encode(self, group: ThresholdGroup) -> dict[str, Any]:
        return {"points": group.points.dump(), **self.encode_alerting(group)}

    def decode(self, state: dict[str, Any]) -> ThresholdGroup:
        raw = state["points"]
        if not isinstance(raw, list):
            raise ValueError("points: expected a list")
        points: CountWindow | SumWindow
        if self.field is not None:  # [time, value, id]; [time, value] before ids were kept
            points = SumWindow((float(p[0]), Decimal(str(p[1])), _id(p[2:])) for p in raw)
        else:  # [time, id]; a bare time before ids were kept
            points = CountWindow(
                self.limit,
                ((float(p[0]), _id(p[1:])) if isinstance(p, list) else (float(p), "") for p in raw),
            )
        return self.decode_alerting(ThresholdGroup(points=points), state)

    def explain(self, group_key: str, now: float) -> str:
        group = self.table.get(group_key)
        firing = "; firing" if group is not None and group.firing else ""
        points = None if group is None else group.points
        if isinstance(points, SumWindow):
            total = points.sum(self.window, now)
        elif self.field is not None:
            total = Decimal(0)
        else:
            count = points.count(self.window, now) if points is not None else 0
            return f"{min(count, self.limit)} of {self.limit} within {self.span()}{firing}"
        return f"sum {show(total)} of {show(self.bound)} within {self.span()}{firing}"


def _id(rest: list[Any]) -> str:
    """A saved point's event id: what follows its time (and value), if anything."""
    if not rest:
        return ""
    if not isinstance(rest[0], str | int):
        raise ValueError("points: an event id must be a string")
    return str(rest[0])  # a source's int id was saved as one before
