"""``kind = "absence"``: a dead man's switch. Fires when a group seen before (or, without
``group_by``, the rule since it was loaded) has had no matching event for ``window``;
resolves when events return.

A group stays while it may fire or resolve, so memory is one small record per key ever
seen, capped by ``max_groups``. After a restart, the groups that were not firing count
their silence again from the restart: the daemon heard nothing while it was down, which
says nothing about the provider. Firing groups stay firing and resolve when events return.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import orjson

from tocsin import Event, Firing, RuleConfig, split_path, stable_id, utc_iso

from .config import AbsenceConfig
from .lifecycle import Alerting, LifecycleKind
from .stateful import ago
from .windows import expired


@dataclass(slots=True, kw_only=True)
class AbsenceGroup(Alerting):
    """When a group's last event came (or its watch began), and its alert; ``event`` is
    the last event seen (None: none yet, or ``taken_back``)."""

    last: float
    taken_back: bool = False


class AbsenceKind(LifecycleKind[AbsenceGroup]):
    """Fires when a group falls silent for ``window``; resolves on its next event."""

    name = "absence"
    Config: ClassVar[type[RuleConfig]] = AbsenceConfig

    def __init__(self, config: RuleConfig) -> None:
        super().__init__(config)
        self.whole_rule = not config.group_by  # one group, watched from the start
        self.group_by = list(config.group_by)
        self.sources = ",".join(config.source or [])

    def start(self, now: float) -> None:
        for key, group in self.table.groups.items():
            if not group.firing and group.last < now:
                group.last = now
                self.settle(key, group)
        if self.whole_rule and "" not in self.table:
            group = AbsenceGroup(last=now)
            self.admit("", group, now)
            self.settle("", group)

    def on_event(self, event: Event, group_key: str, now: float) -> list[Firing]:
        self.begin(now)
        t = self.moment(event, now)
        if t is None:
            return []
        group = self.table.get(group_key)
        if group is None:
            group = AbsenceGroup(last=t, event=event)
            self.admit(group_key, group, now)
            self.settle(group_key, group)
            return []
        self.table.seen(group_key)
        out = self.catch_up(group_key, group, now)
        if t >= group.last:
            group.last = t
            group.event = event
            group.taken_back = False
        if group.firing:  # an accepted event is never older than the window: it is back
            out.extend(self.resolve(group_key, group, event))
        self.settle(group_key, group)
        return out

    def wake(self, key: str, group: AbsenceGroup, now: float) -> list[Firing]:
        if group.firing:
            return self.repeat_if_due(key, group, now)
        if not expired(group.last, self.window, now):
            return []
        return self.fire(key, group, group.event or self.placeholder(key, group, now), now)

    def discard(self, event: Event, group_key: str, now: float) -> None:
        """The last event seen, which the group's alert would carry, was taken back: the
        alert carries none (the placeholder) unless another comes. The silence still counts
        from that event's time (the one before it is not kept): a group fires late rather
        than falsely. A firing group's event is ``on_removed``'s to end."""
        group = self.table.get(group_key)
        if group is None or group.firing or group.event is None or group.event.id != event.id:
            return
        group.event = None
        group.taken_back = True
        self.settle(group_key, group)

    def on_removed(self, event: Event, group_key: str, now: float) -> None:
        """The last event, which the firing carried, was taken back: the firing is
        retracted and ends, and the group is watched again from now (else it would fire
        again at once, with a placeholder)."""
        group = self.table.get(group_key)
        carried = group is not None and group.firing and group.event is not None
        super().on_removed(event, group_key, now)
        if carried and group is not None and not group.firing:
            group.last = max(group.last, now)
            self.settle(group_key, group)

    def placeholder(self, key: str, group: AbsenceGroup, now: float) -> Event:
        """The event an alert carries when the rule has seen none since it was loaded, or
        the provider took back the last one: the rule, window and since, and the group's
        ``group_by`` values where the events had them (``market`` for a title's
        ``{{ market }}``; a list where a path indexes one)."""
        since = utc_iso(group.last)
        data: dict[str, Any] = {}
        try:
            values = orjson.loads(key) if key else []
        except orjson.JSONDecodeError:
            values = []
        for path, value in zip(self.group_by, values, strict=False):
            put_path(data, split_path(path), value)
        data.update({"rule": self.rule, "window": self.span(), "since": since})
        return Event(
            id=stable_id(self.rule, "absence", key, since)
            if key
            else stable_id(self.rule, "absence", since),
            source=self.sources,
            provider="tocsin",
            type="absence",
            data=data,
            time=utc_iso(now),
        )

    def next_due(self, group: AbsenceGroup) -> float | None:
        return group.next_repeat if group.firing else group.last + self.window

    def needed(self, group: AbsenceGroup) -> bool:
        return True

    def encode(self, group: AbsenceGroup) -> dict[str, Any]:
        return {"last": group.last, **self.encode_alerting(group)}

    def decode(self, state: dict[str, Any]) -> AbsenceGroup:
        return self.decode_alerting(AbsenceGroup(last=float(state["last"])), state)

    def explain(self, group_key: str, now: float) -> str:
        group = self.table.get(group_key)
        if group is None:
            return "no event seen for this group yet; it is watched from its first one"
        silent = ago(now - group.last)
        if group.firing:
            return f"no event for {silent} (window {self.span()}); firing"
        if group.taken_back:
            return f"last event {silent} ago, taken back since; fires after {self.span()}"
        if group.event is None:
            return f"no event since the rule started {silent} ago; fires after {self.span()}"
        return f"last event {silent} ago; fires after {self.span()}"


def put_path(data: dict[str, Any], parts: tuple[str, ...], value: Any) -> None:
    """Place ``value`` at ``parts`` in ``data`` as ``get_path`` reads it: a digit part is a
    list index (``authorization.0.actor``), with None before it. What is there already
    stays (another ``group_by`` path put it); a path it does not fit is left out."""
    if value is None and any(_index(part) is not None for part in parts):
        return  # missing in the events, whose lists may never reach that index
    at: Any = data
    for part, after in zip(parts, (*parts[1:], None), strict=True):
        new = value if after is None else [] if _index(after) is not None else {}
        index = _index(part)
        if isinstance(at, dict):
            at = at.setdefault(part, new)
        elif isinstance(at, list) and index is not None:
            at.extend([None] * (index + 1 - len(at)))
            if at[index] is None:
                at[index] = new
            at = at[index]
        else:
            return


def _index(part: str) -> int | None:
    """A path part as a list index, if it is one (ASCII digits: ``int`` refuses ``"²"``)."""
    return int(part) if part.isascii() and part.isdigit() else None
