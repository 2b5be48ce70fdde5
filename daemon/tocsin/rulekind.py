"""The base class of rule kinds, the keys every rule takes, and what a kind returns."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BeforeValidator, Field, field_validator

from .events import Event
from .fields import ConfigModel, Duration

Scalar = str | int | float | bool


def _one_or_many(value: object) -> object:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and not all(isinstance(v, str) for v in value):
        raise ValueError("expected a name or a list of names")
    if isinstance(value, list) and not value:
        raise ValueError("an empty list selects nothing; leave the key out to select all")
    return value


Names = Annotated[list[str] | None, BeforeValidator(_one_or_many)]


class RuleConfig(ConfigModel):
    """Keys of every ``[[rules]]`` entry (SPEC section 3); kinds subclass it with their own."""

    name: str = Field(min_length=1)
    kind: str = "match"
    source: Names = None
    type: Names = None
    match: dict[str, Any] = {}
    when: str | None = None
    actions: list[str] | None = None
    title: str | None = None
    body: str | None = None
    throttle: Duration | None = None
    group_by: list[str] = []
    enabled: bool = True
    on_removed: Literal["retract", "ignore"] = "retract"

    @field_validator("match")
    @classmethod
    def _scalars(cls, value: dict[str, Any]) -> dict[str, Any]:
        for key, item in value.items():
            items = item if isinstance(item, list) else [item]
            if not all(isinstance(v, str | int | float | bool) for v in items):
                raise ValueError(
                    f"{key}: expected a value or a list of values (strings, numbers, booleans)"
                )
        return value

    @field_validator("throttle")
    @classmethod
    def _positive(cls, value: float | None) -> float | None:
        if value is not None and value <= 0:
            raise ValueError("throttle must be longer than 0s")
        return value


@dataclass(frozen=True, slots=True)
class Firing:
    """An alert a kind wants to send: the engine renders, throttles, commits and delivers it.

    ``id_parts`` make the alert id together with the rule name (a stable hash): the same
    parts always give the same id, so a repeated fact never alerts twice.
    """

    status: str
    event: Event
    id_parts: tuple[Any, ...]


class RuleKind:
    """How a rule turns matching events into alerts.

    The engine has already checked ``source``, ``type``, every ``match`` key and ``when``
    before ``on_event`` is called; ``group_key`` is the rule's ``group_by`` values.
    ``now`` is the engine's clock in seconds: wall-clock time at start-up that then runs
    monotonically, so it survives a restart (it is comparable with saved times) and a
    wall-clock jump never stretches or shrinks a window. Tests inject their own clock.

    A kind holding state over time also overrides:

    - ``on_tick``, called about once a second, for what time alone causes (a window
      draining, silence);
    - ``state_changes`` and ``load_state``, so the engine persists each group's state in
      the state database with the alerts it caused, and gives it back after a restart
      (only while the rule is unchanged; a changed rule starts fresh);
    - ``explain``, a short account of a group's state for ``tocsin test``.
    """

    name: ClassVar[str]
    Config: ClassVar[type[RuleConfig]] = RuleConfig

    def __init__(self, config: RuleConfig) -> None:
        self.config = config
        # The wall clock (unix seconds) the engine runs on beside ``now``, which it sets:
        # an event's own ``time`` is ``wall() - time`` old, whatever the wall clock did
        # since start-up (``now`` does not follow its steps).
        self.wall: Callable[[], float] = time.time

    def on_event(self, event: Event, group_key: str, now: float) -> list[Firing]:
        """Alerts caused by one matching event."""
        raise NotImplementedError

    def on_tick(self, now: float) -> list[Firing]:
        """Alerts caused by time passing (a window closing, silence); none by default."""
        return []

    def wakes_at(self) -> float | None:
        """The earliest time ``on_tick`` may fire something, if the kind knows it (None:
        it does not say). The daemon ticks every second whatever this says; ``tocsin
        test``, replaying hours of events in their own time, ticks at these times, so a
        repeat due between two events is shown. Never later than the real next one."""
        return None

    def discard(self, event: Event, group_key: str, now: float) -> None:
        """The provider took back ``event`` (``removed``: a rollback), and this rule selects
        it, whether or not an alert carried it: a kind that counts events should no longer
        count it (and count it once if it is pushed again). Called before ``on_removed``.
        Nothing by default."""

    def on_removed(self, event: Event, group_key: str, now: float) -> None:
        """The provider took back ``event``, which a sent firing of this group carried;
        its ``retracted`` alert is on its way. A kind whose alerts repeat or resolve stops
        carrying the event here. Nothing by default."""

    def state_changes(self) -> list[tuple[str, Any]]:
        """``(group_key, state)`` for every group changed since the last call.

        ``state`` is anything ``orjson`` can encode, or ``None`` when the group's state is
        gone (expired): its saved row is deleted. Called after each batch of events and
        each tick, so the saved state commits together with the alerts it caused.
        """
        return []

    def load_state(self, group_key: str, state: Any) -> None:
        """Take back a group's saved ``state`` at start-up (before any event or tick)."""

    def explain(self, group_key: str, now: float) -> str:
        """A short account of a group's state (``"3 of 5 within 10m"``); empty by default."""
        return ""
