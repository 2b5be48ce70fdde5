"""Rule state: kinds' groups persisted with the alerts, restored after a restart, dropped
when the rule changed; the engine's clock; ``Engine.explain``."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from support import make_registry, write_config
from tocsin import Event, Firing, RuleConfig, RuleKind, hookimpl
from tocsin.config import load_config
from tocsin.rules import AnchoredClock, Engine, compile_rules
from tocsin.store import Store


class TallyConfig(RuleConfig):
    every: int = 2


class Tally(RuleKind):
    """Test kind: fires on every ``every``-th event of a group; forgets a group after 10 s."""

    name = "tally"
    Config = TallyConfig

    def __init__(self, config: RuleConfig) -> None:
        super().__init__(config)
        assert isinstance(config, TallyConfig)
        self.every = config.every
        self.groups: dict[str, list[float]] = {}  # key -> [count, last seen]
        self.changed: set[str] = set()

    def on_event(self, event: Event, group_key: str, now: float) -> list[Firing]:
        count, _ = self.groups.get(group_key, [0, now])
        self.groups[group_key] = [count + 1, now]
        self.changed.add(group_key)
        if (count + 1) % self.every:
            return []
        return [Firing("firing", event, (group_key, count + 1))]

    def on_tick(self, now: float) -> list[Firing]:
        for key, (_, seen) in list(self.groups.items()):
            if now - seen >= 10:
                del self.groups[key]
                self.changed.add(key)
        return []

    def state_changes(self) -> list[tuple[str, Any]]:
        changes = [(k, self.groups.get(k)) for k in sorted(self.changed)]
        self.changed.clear()
        return changes

    def load_state(self, group_key: str, state: Any) -> None:
        self.groups[group_key] = list(state)

    def explain(self, group_key: str, now: float) -> str:
        count = int(self.groups.get(group_key, [0, 0])[0])
        return f"{count % self.every} of {self.every}"


class TallyPlugin:
    @staticmethod
    @hookimpl
    def register_rule_kinds(register: Callable[[type[RuleKind]], None]) -> None:
        register(Tally)


RULES = """
[daemon]
state_dir = "state"
[actions.console]
plugin = "log"
[[rules]]
name = "pairs"
kind = "tally"
every = {every}
group_by = ["who"]
match = {{ kind = "ping" }}
"""


class Clock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def engine(tmp_path: Path, clock: Callable[[], float], every: int = 2) -> Engine:
    path = write_config(tmp_path / "tocsin.toml", RULES.format(every=every))
    registry = make_registry(TallyPlugin())
    return Engine(compile_rules(load_config(path, registry), registry), clock=clock)


def ping(who: str, n: int, kind: str = "ping") -> Event:
    return Event(
        id=f"{who}-{n}", source="s", provider="p", type="t", data={"who": who, "kind": kind}
    )


def commit(store: Store, eng: Engine) -> None:
    store.call_sync(Store.commit_alerts, [], [], eng.take_state())


def saved(store: Store) -> dict[str, str]:
    return {
        key.rpartition("\x1f")[2]: value for _, key, value in store.call_sync(Store.load_rule_state)
    }


def test_a_rule_removed_and_put_back_by_reloads_does_not_get_its_old_state_back(
    tmp_path: Path,
) -> None:
    # A reload without the rule left its rows; the reload that put it back unchanged made
    # their fingerprint match again, and the next restart restored what the running
    # daemon had dropped (the audit's repro: a resolved alert for a firing long gone).
    clock = Clock()
    store = Store.open(tmp_path / "state")
    registry = make_registry(TallyPlugin())
    try:
        first = engine(tmp_path, clock, every=2)
        first.process(ping("ann", 1))
        commit(store, first)
        assert saved(store) == {'["ann"]': "[1,1000000.0]"}
        path = write_config(tmp_path / "none.toml", RULES.partition("[[rules]]")[0])
        removed = Engine(compile_rules(load_config(path, registry), registry), clock=clock)
        removed.adopt(first)
        commit(store, removed)
        assert saved(store) == {}
        back = engine(tmp_path, clock, every=2)
        back.adopt(removed)  # starts fresh: none of the first version's state
        commit(store, back)
        restarted = engine(tmp_path, clock, every=2)
        restarted.restore(store.call_sync(Store.load_rule_state))
        assert restarted.process(ping("ann", 2)) == []  # ann's 1 did not come back
    finally:
        store.close()


def test_group_state_survives_a_restart_and_expires(tmp_path: Path) -> None:
    clock = Clock()
    store = Store.open(tmp_path / "state")
    try:
        first = engine(tmp_path, clock)
        assert first.process(ping("ann", 1)) == []
        assert first.process(ping("bob", 1)) == []
        commit(store, first)
        assert set(saved(store)) == {'["ann"]', '["bob"]'}

        second = engine(tmp_path, clock)  # a restart: a new engine on the same database
        second.restore(store.call_sync(Store.load_rule_state))
        (alert,) = second.process(ping("ann", 2))  # the second of a pair: the count came back
        assert alert.alert.rule == "pairs"
        clock.now += 11
        assert second.tick() == []
        commit(store, second)
        assert saved(store) == {}  # expired groups are deleted, not kept forever
    finally:
        store.close()


def test_a_changed_rule_starts_fresh_and_says_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    clock = Clock()
    store = Store.open(tmp_path / "state")
    try:
        first = engine(tmp_path, clock, every=2)
        first.process(ping("ann", 1))
        commit(store, first)
        changed = engine(tmp_path, clock, every=3)
        with caplog.at_level(logging.INFO, logger="tocsin.rules"):
            changed.restore(store.call_sync(Store.load_rule_state))
        assert "rule 'pairs' changed since its state was saved: it starts fresh" in caplog.text
        assert changed.process(ping("ann", 2)) == []  # count 1, not 2
        commit(store, changed)
        assert saved(store) == {'["ann"]': "[1,1000000.0]"}  # the old row is gone
    finally:
        store.close()


def test_a_restart_after_a_reload_that_changed_a_rule_restores_it_without_a_word(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    clock = Clock()
    store = Store.open(tmp_path / "state")
    try:
        first = engine(tmp_path, clock, every=2)
        first.process(ping("ann", 1))
        commit(store, first)  # a row of the rule as it was
        reloaded = engine(tmp_path, clock, every=3)
        reloaded.adopt(first)  # the reload: the changed rule starts fresh, and says so
        reloaded.process(ping("bob", 1))
        commit(store, reloaded)  # a row of the rule as it is now, beside the old one
        restarted = engine(tmp_path, clock, every=3)
        with caplog.at_level(logging.INFO, logger="tocsin.rules"):
            restarted.restore(store.call_sync(Store.load_rule_state))
        assert "starts fresh" not in caplog.text  # its current state is restored
        assert restarted.process(ping("bob", 2)) == []
        assert len(restarted.process(ping("bob", 3))) == 1  # the third of three: bob's 1 came back
        commit(store, restarted)
        assert set(saved(store)) == {'["bob"]'}  # the old version's row is gone
    finally:
        store.close()


def test_reload_keeps_unchanged_kinds_and_their_pending_state(tmp_path: Path) -> None:
    clock = Clock()
    old = engine(tmp_path, clock)
    old.process(ping("ann", 1))
    new = engine(tmp_path, Clock(0))
    new.adopt(old)
    assert new.clock is clock  # the clock carries over: no jump on reload
    assert [w[2] for w in new.take_state()] == ["[1,1000000.0]"]
    assert len(new.process(ping("ann", 2))) == 1


def test_explain_says_which_key_failed_and_the_kind_state(tmp_path: Path) -> None:
    eng = engine(tmp_path, Clock())
    eng.process(ping("ann", 1))
    assert eng.explain(ping("ann", 2, kind="pong")) == [
        ("pairs", 'match kind is "pong", not "ping"', "")
    ]
    assert eng.explain(ping("ann", 2)) == [("pairs", "", "1 of 2")]
    other = Event(id="x", source="s", provider="p", type="t", data={})
    assert eng.explain(other) == [("pairs", 'match kind is missing, not "ping"', "")]


def test_anchored_clock_starts_at_wall_time_and_runs_monotonically() -> None:
    clock = AnchoredClock()
    first = clock()
    assert abs(first - time.time()) < 5
    assert clock() >= first


def test_a_wall_clock_jump_does_not_move_throttles_or_windows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fault 9: NTP steps the clock an hour forward, then two hours back, while running."""
    real = time.time
    eng = engine(tmp_path, AnchoredClock())
    first = eng.clock()
    monkeypatch.setattr(time, "time", lambda: real() + 3600)
    assert eng.clock() - first < 5  # not an hour later: the windows did not all expire
    monkeypatch.setattr(time, "time", lambda: real() - 3600)
    assert eng.clock() >= first  # and never backwards
    eng.process(ping("ann", 1))
    assert len(eng.process(ping("ann", 2))) == 1  # the pair still counts as one window


def test_a_rule_changed_and_changed_back_by_reloads_does_not_get_its_old_state_back(
    tmp_path: Path,
) -> None:
    # The rows of the first version stayed; a reload back to it made their fingerprint
    # match again, and the restart after restored a count the running daemon had dropped.
    clock = Clock()
    store = Store.open(tmp_path / "state")
    try:
        first = engine(tmp_path, clock, every=2)
        first.process(ping("ann", 1))
        commit(store, first)
        changed = engine(tmp_path, clock, every=3)
        changed.adopt(first)  # starts fresh
        commit(store, changed)
        back = engine(tmp_path, clock, every=2)
        back.adopt(changed)  # starts fresh again: same rule as first, none of its state
        commit(store, back)
        assert saved(store) == {}
        restarted = engine(tmp_path, clock, every=2)
        restarted.restore(store.call_sync(Store.load_rule_state))
        assert restarted.process(ping("ann", 2)) == []  # ann's 1 did not come back
    finally:
        store.close()
