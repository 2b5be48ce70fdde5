"""``kind = "change"``: fires when a numeric ``field`` moves by ``by`` or more (an amount,
or ``"3%"`` of the reference value) from its oldest value within ``window`` or from its
last value. After an alert the window starts again from the value that fired, so a
move alerts once. Change alerts do not resolve.

A group keeps the distinct values of its window (a repeated value costs nothing) and its
last value however old: odds that hold for longer than the window and then jump move from
it. So a group is kept until ``max_groups`` makes room (the least recently seen goes:
silently when all it held was a last value older than the window, the fate meant for
keys a feed stopped sending).
Values that are not numbers are ignored; with ``time_field = "event"``, so is an event
older than the newest value of its group.

A value the provider takes back (``removed``: a Vite rollback) no longer counts
(``discard``); a move taken back is undone, so pushed again it fires again, as a
threshold counts a fact taken back and pushed again once.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from typing import Any, ClassVar

from tocsin import Event, Firing, RuleConfig, get_path, split_path

from .config import ChangeConfig
from .groups import Group
from .numbers import show, show_percent, to_decimal
from .stateful import StatefulKind, ago
from .windows import ValueWindow, expired


@dataclass(slots=True, kw_only=True)
class ChangeGroup(Group):
    """The values of a group's field within the window."""

    values: ValueWindow


class ChangeKind(StatefulKind[ChangeGroup]):
    """Fires once per move of ``field`` by ``by`` within ``window``, per group."""

    name = "change"
    Config: ClassVar[type[RuleConfig]] = ChangeConfig

    def __init__(self, config: RuleConfig) -> None:
        super().__init__(config)
        if not isinstance(config, ChangeConfig):
            raise TypeError("the change kind needs a ChangeConfig")
        self.field = split_path(config.field)
        self.field_name = config.field
        self.by = config.by

    def on_event(self, event: Event, group_key: str, now: float) -> list[Firing]:
        self.begin(now)
        value = to_decimal(get_path(event.data, self.field))
        if value is None:
            self.skipped += 1
            return []
        t = self.moment(event, now)
        if t is None:
            return []
        group = self.table.get(group_key)
        if group is None:
            first = (t, value, str(event.id), False)
            self.admit(group_key, ChangeGroup(values=ValueWindow([first])), now)
            self.settle(group_key, self.table.groups[group_key])
            return []
        self.table.seen(group_key)
        values = group.values
        values.expire(self.window, now)
        newest = values.newest()
        out: list[Firing] = []
        if newest is not None and t < newest[0]:
            self.late += 1  # an older value is not the current one
        elif newest is not None and (
            self.by.reached(values.reference(self.window, now), value)
            or self.by.reached(newest[1], value)
        ):
            values.restart(t, value, str(event.id))
            out.append(Firing("firing", event, (group_key, event.id)))
        else:
            values.add(t, value, str(event.id))
        self.settle(group_key, group)
        return out

    def discard(self, event: Event, group_key: str, now: float) -> None:
        """The provider took ``event`` back: its value no longer counts. If it moved, the
        window is as it was before the move (whose alert is retracted), so the value
        pushed again moves, and fires, again."""
        group = self.table.get(group_key)
        if group is not None and group.values.discard(str(event.id)):
            self.settle(group_key, group)

    def expendable(self, group: ChangeGroup, now: float) -> bool:
        newest = group.values.newest()
        return newest is None or expired(newest[0], self.window, now)

    def wake(self, key: str, group: ChangeGroup, now: float) -> list[Firing]:
        group.values.expire(self.window, now)
        return []

    def next_due(self, group: ChangeGroup) -> float | None:
        return group.values.trimmed_at(self.window)  # only to free what left the window

    def needed(self, group: ChangeGroup) -> bool:
        return len(group.values) > 0

    def encode(self, group: ChangeGroup) -> dict[str, Any]:
        return {"values": group.values.dump()}

    def decode(self, state: dict[str, Any]) -> ChangeGroup:
        raw = state["values"]
        if not isinstance(raw, list):
            raise ValueError("values: expected a list")
        return ChangeGroup(values=ValueWindow(_point(p) for p in raw))

    def explain(self, group_key: str, now: float) -> str:
        group = self.table.get(group_key)
        inside = [] if group is None else group.values.inside(self.window, now)
        newest = None if group is None else group.values.newest()
        if newest is None:
            return f"no value of {self.field_name} yet"
        if not inside:
            return (
                f"no value of {self.field_name} within {self.span()}; fires on a move of"
                f" {self.by} from the last, {newest[1]:f} ({ago(now - newest[0])} ago)"
            )
        first, last = inside[0][1], inside[-1][1]
        if len(inside) == 1:
            return f"{first:f} is the only value within {self.span()}; fires on a move of {self.by}"
        span = f"(from {first:f} to {last:f})"
        size = self.by.size(first, last)
        if size is None:
            return f"no percentage of a reference value of 0 {span}"
        moved = show_percent(size) if self.by.percent else show(size)
        return f"moved {moved} of {self.by} {span}"


def _point(raw: Any) -> tuple[float, Decimal, str, bool]:
    """A saved value: ``[time, value, event id, moved]``; ``[time, value]`` before ids were
    kept."""
    if not isinstance(raw, list) or len(raw) not in (2, 4):
        raise ValueError("values: expected [time, value, event id, moved]")
    if len(raw) == 2:
        return float(raw[0]), Decimal(str(raw[1])), "", False
    if not isinstance(raw[2], str) or not isinstance(raw[3], bool):
        raise ValueError("values: an event id is a string, moved a boolean")
    return float(raw[0]), Decimal(str(raw[1])), raw[2], raw[3]
