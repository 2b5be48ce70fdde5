"""Helpers for the stateful rule kinds' tests: an engine on an injected clock, events."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import tocsin_rules

from support import make_registry, write_config
from tocsin import Event, utc_iso
from tocsin.config import load_config
from tocsin.rules import Engine, PendingAlert, compile_rules
from tocsin.store import Store

START = 1_800_000_000.0  # the engine clock: wall time at start-up, then monotonic

HEAD = """
[daemon]
state_dir = "state"

[actions.console]
plugin = "log"
"""


class Clock:
    """The engine's clock, moved by the test: no sleeping."""

    def __init__(self, now: float = START) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def at(self, offset: float) -> Clock:
        """Set the time to ``offset`` seconds after START."""
        self.now = START + offset
        return self


def build(tmp_path: Path, rules: str, clock: Clock) -> Engine:
    """An engine for ``rules`` (TOML ``[[rules]]`` text) with this plugin and the built-ins."""
    path = write_config(tmp_path / "tocsin.toml", HEAD + rules)
    registry = make_registry(tocsin_rules)
    # The wall clock is the engine's here (an event's time on it tells its age).
    return Engine(compile_rules(load_config(path, registry), registry), clock=clock, wall=clock)


def event(id: str, time: str | float | None = None, **data: Any) -> Event:
    """An event with ``data``; ``time`` as an ISO string, or seconds after START."""
    if isinstance(time, float | int):
        time = utc_iso(START + time)
    return Event(id=id, source="s", provider="p", type="t", data=data, time=time or "")


def removed(e: Event) -> Event:
    """``e`` taken back by the provider (a rollback): its removal, with its data."""
    return Event(e.id, e.source, e.provider, e.type, e.data, e.time, True)


def seen(alerts: list[PendingAlert]) -> list[tuple[str, str]]:
    """``(status, event id)`` of each alert."""
    return [(p.alert.status, p.alert.event["id"]) for p in alerts]


def persist(store: Store, engine: Engine) -> None:
    """Commit the engine's changed rule state, as the daemon does after each batch."""
    store.call_sync(Store.commit_alerts, [], [], engine.take_state())


def restart(store: Store, tmp_path: Path, rules: str, clock: Clock) -> Engine:
    """A new engine on the same state database, as after a restart."""
    engine = build(tmp_path, rules, clock)
    engine.restore(store.call_sync(Store.load_rule_state))
    return engine


def saved_groups(store: Store) -> dict[str, str]:
    """Group key -> saved JSON state of the kinds' rows."""
    rows = store.call_sync(Store.load_rule_state)
    return {key.rpartition("\x1f")[2]: value for _, key, value in rows if key.startswith("kind")}
