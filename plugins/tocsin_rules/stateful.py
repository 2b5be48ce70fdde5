"""The base of the stateful kinds: groups, deadlines, event time, persistence.

A subclass says what a group is and what happens to it (``on_event``, ``wake`` when its
deadline comes, ``next_due``, ``needed``) and how it is saved (``encode``/``decode``);
this class runs the ticks, keeps the table of groups bounded and feeds the engine's state
database through ``state_changes``/``load_state``.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any, ClassVar, Generic

from tocsin import Event, Firing, RuleConfig, RuleKind, format_duration

from .config import WindowedConfig
from .groups import G, GroupTable
from .windows import expired

log = logging.getLogger(__name__)

STATE_VERSION = 1
_MAX_TIME_LEN = 64


def event_timestamp(text: object) -> float | None:
    """Unix seconds from an event's ISO-8601 ``time`` (UTC when it names no zone), else None."""
    if not isinstance(text, str) or not text or len(text) > _MAX_TIME_LEN:
        return None
    try:
        moment = datetime.fromisoformat(text)
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
        return moment.timestamp()
    except (ValueError, OverflowError, OSError):
        return None


def check_version(state: Any) -> dict[str, Any]:
    """A saved group's state as a dict, if this version of the plugin wrote it."""
    if not isinstance(state, dict) or state.get("v") != STATE_VERSION:
        raise ValueError(f"unknown saved state format: {str(state)[:60]}")
    return state


class StatefulKind(RuleKind, Generic[G]):
    """A rule kind keeping state per group over a sliding ``window``.

    Counters for the curious (and the tests): ``untimed`` events whose own time could
    not be read (their receipt time was used), ``late`` events older than the window
    (ignored), ``skipped`` events whose field is not a usable number, and
    ``table.evicted`` groups forgotten to stay within ``max_groups``.
    """

    Config: ClassVar[type[RuleConfig]] = WindowedConfig

    def __init__(self, config: RuleConfig) -> None:
        super().__init__(config)
        if not isinstance(config, WindowedConfig):
            raise TypeError(f"the {self.name} kind needs a {type(self).Config.__name__}")
        self.rule = config.name
        self.window = config.window
        self.use_event_time = config.time_field == "event"
        self.table: GroupTable[G] = GroupTable(config.max_groups)
        self.untimed = 0
        self.late = 0
        self.skipped = 0
        self._started = False
        self._warned: set[str] = set()

    # -- what a subclass provides ------------------------------------------------------

    def start(self, now: float) -> None:
        """Called once, before the first event or tick, with restored groups in place."""

    def wake(self, key: str, group: G, now: float) -> list[Firing]:
        """The group's deadline has come: update it; alerts that time alone caused."""
        raise NotImplementedError

    def next_due(self, group: G) -> float | None:
        """When the group next needs ``wake`` (None: only an event can change it)."""
        raise NotImplementedError

    def needed(self, group: G) -> bool:
        """False when the group holds nothing worth keeping: it is forgotten."""
        raise NotImplementedError

    def encode(self, group: G) -> dict[str, Any]:
        """The group's state as JSON-able data (``"v"`` is added by the caller)."""
        raise NotImplementedError

    def decode(self, state: dict[str, Any]) -> G:
        """A group from ``encode``'s data; raises on anything else."""
        raise NotImplementedError

    # -- the machinery -----------------------------------------------------------------

    def begin(self, now: float) -> None:
        """Run ``start`` on the first event or tick."""
        if not self._started:
            self._started = True
            self.start(now)

    def moment(self, event: Event, now: float) -> float | None:
        """The time ``event`` counts at in the window, or None when it is older than the
        window (late: ignored). Receipt time is ``now``; an event's own time is ``now``
        less its age (``self.wall()``, the engine's wall clock, less its time), never
        later than ``now`` (a provider's clock running ahead cannot stretch a window)."""
        if not self.use_event_time:
            return now
        t = event_timestamp(event.time)
        if t is None:
            self.untimed += 1
            self.warn_once(
                "time",
                "rule %r: event %s has no readable time (%r): its receipt time is used",
                self.rule,
                event.id,
                str(event.time)[:40],
            )
            return now
        # Its age now (both times on the wall clock), counted back from ``now`` on the
        # engine's clock: a wall-clock step since start-up (NTP correcting a clock that was
        # off at boot) must not make every event look late, or early; and an event that
        # waited in the intake is as old as it is.
        t = now - max(0.0, self.wall() - t)
        if expired(t, self.window, now):
            self.late += 1
            return None
        return t

    def spare(self, group: G) -> bool:
        """Whether ``max_groups`` should rather forget another group than this one."""
        return False

    def expendable(self, group: G, now: float) -> bool:
        """Whether forgetting ``group`` for room at ``now`` loses nothing within the window
        (no warning then: ``max_groups`` working as meant, not a ``group_by`` to check)."""
        return False

    def admit(self, key: str, group: G, now: float) -> None:
        """Add a new group; forget the least recently seen one beyond ``max_groups``
        (sparing firing ones while others can go)."""
        evicted = self.table.add(key, group, self.spare)
        if evicted is not None and not self.expendable(evicted, now):
            self.warn_once(
                "evict",
                "rule %r: more than %d groups (max_groups): the least recently seen are"
                " forgotten (firing ones last); check its group_by",
                self.rule,
                self.table.max_groups,
            )

    def catch_up(self, key: str, group: G, now: float) -> list[Firing]:
        """Run a deadline that passed before this moment (before the tick got to it), so an
        event at ``now`` sees the group as it is at ``now``."""
        if group.due is not None and group.due <= now:
            return self.wake(key, group, now)
        return []

    def settle(self, key: str, group: G) -> None:
        """After a change: save the group and file its next deadline, or forget it."""
        if self.table.get(key) is not group:
            return  # evicted meanwhile
        if not self.needed(group):
            self.table.drop(key)
            return
        self.table.mark(key)
        self.table.schedule(key, group, self.next_due(group))

    def on_tick(self, now: float) -> list[Firing]:
        self.begin(now)
        out: list[Firing] = []
        for key in self.table.due(now):
            group = self.table.get(key)
            if group is not None:
                out.extend(self.wake(key, group, now))
                self.settle(key, group)
        return out

    def wakes_at(self) -> float | None:
        return self.table.next_wake()

    def state_changes(self) -> list[tuple[str, Any]]:
        return self.table.changes(lambda group: {"v": STATE_VERSION, **self.encode(group)})

    def load_state(self, group_key: str, state: Any) -> None:
        group = self.decode(check_version(state))
        if not self.needed(group):
            self.table.changed[group_key] = None  # nothing worth keeping: delete the row
            return
        self.table.restore(group_key, group)
        self.table.schedule(group_key, group, self.next_due(group))

    def warn_once(self, what: str, message: str, *args: object) -> None:
        """Log a warning the first time, then at debug: one line per rule, not per event."""
        level = logging.DEBUG if what in self._warned else logging.WARNING
        self._warned.add(what)
        log.log(level, message, *args)

    def span(self) -> str:
        return format_duration(self.window)


def ago(seconds: float) -> str:
    """``40`` -> ``"40s"``; under a second: ``"0s"``."""
    return format_duration(max(0.0, seconds)) if seconds >= 1 else "0s"
