"""Firing, resolved and realert: the life of an alert of a rule that can end.

Shared by ``threshold`` and ``absence``. A group fires (a new sequence number), may repeat
while it stays firing (``realert``, doubled each time with ``realert_backoff``), then
resolves (sent unless ``send_resolved = false``). Alert ids come from
``(group key, sequence number, status, repeat number)``, so each firing, each repeat and
each resolution has its own id.

Sequence numbers must never repeat for a group, also after its state expired or the
rule was changed (a new rule state starts from nothing, and an id already delivered is
never delivered again). So a new one is the engine clock in milliseconds, or one more
than the last one when that is higher: it grows across restarts without a counter kept
forever.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Generic, TypeVar

from tocsin import Event, Firing, RuleConfig

from .config import LifecycleConfig
from .groups import Group
from .stateful import StatefulKind

_MAX_DOUBLINGS = 40  # 2**40 realert intervals: far beyond any useful repeat


@dataclass(slots=True)
class Alerting(Group):
    """A group's alert: whether it fires, its sequence number, its repeats, and the event
    its alerts carry."""

    firing: bool = False
    seq: int = 0
    repeat: int = 0
    next_repeat: float | None = None
    event: Event | None = None


A = TypeVar("A", bound=Alerting)


class LifecycleKind(StatefulKind[A], Generic[A]):
    """A stateful kind whose alerts fire, repeat and resolve."""

    Config: ClassVar[type[RuleConfig]] = LifecycleConfig

    def __init__(self, config: RuleConfig) -> None:
        super().__init__(config)
        if not isinstance(config, LifecycleConfig):
            raise TypeError(f"the {self.name} kind needs a {type(self).Config.__name__}")
        self.send_resolved = config.send_resolved
        self.realert = config.realert
        self.backoff = config.realert_backoff
        self.last_seq = 0

    def spare(self, group: A) -> bool:
        return group.firing  # forgotten, its resolved would never be sent

    def fire(self, key: str, group: A, event: Event, now: float) -> list[Firing]:
        """The group starts firing, carrying ``event``."""
        seq = max(group.seq + 1, self.last_seq + 1, int(now * 1000))
        self.last_seq = group.seq = seq
        group.firing = True
        group.repeat = 0
        group.event = event
        group.next_repeat = None if self.realert is None else now + self.realert
        return [Firing("firing", event, (key, seq, "firing", 0))]

    def resolve(self, key: str, group: A, event: Event) -> list[Firing]:
        """The group stops firing; the resolved alert carries ``event``."""
        group.firing = False
        group.repeat = 0
        group.next_repeat = None
        if not self.send_resolved:
            return []
        return [Firing("resolved", event, (key, group.seq, "resolved", 0))]

    def repeat_if_due(self, key: str, group: A, now: float) -> list[Firing]:
        """A realert of a still-firing group whose interval has passed."""
        if (
            not group.firing
            or group.next_repeat is None
            or group.next_repeat > now
            or group.event is None
            or self.realert is None
        ):
            return []
        group.repeat += 1
        interval = self.realert
        if self.backoff:
            interval *= 2.0 ** min(group.repeat, _MAX_DOUBLINGS)
        group.next_repeat = now + interval
        return [Firing("firing", group.event, (key, group.seq, "firing", group.repeat))]

    def on_removed(self, event: Event, group_key: str, now: float) -> None:
        """The event the group's alert carries was taken back (and its firing retracted):
        the alert ends there, with no resolved and no repeat carrying a retracted fact.
        The group fires again, with a new sequence number, on the next event that finds
        the bound still reached."""
        group = self.table.get(group_key)
        if group is None or not group.firing or group.event is None:
            return
        if group.event.id != event.id:
            return
        group.firing = False
        group.repeat = 0
        group.next_repeat = None
        group.event = None
        self.settle(group_key, group)

    def encode_alerting(self, group: A) -> dict[str, Any]:
        return {
            "firing": group.firing,
            "seq": group.seq,
            "repeat": group.repeat,
            "next": group.next_repeat,
            "event": None if group.event is None else group.event.envelope(),
        }

    def decode_alerting(self, group: A, state: dict[str, Any]) -> A:
        """Fill ``group``'s alert from saved ``state``; remembers the highest sequence."""
        group.firing = bool(state["firing"])
        group.seq = int(state["seq"])
        group.repeat = int(state["repeat"])
        group.next_repeat = None if state["next"] is None else float(state["next"])
        event = state["event"]
        group.event = None if event is None else Event.from_envelope(event)
        if group.firing and group.event is None:
            raise ValueError("a firing group without its event")
        self.last_seq = max(self.last_seq, group.seq)
        return group
