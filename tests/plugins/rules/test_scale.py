"""10,000 groups: ticks cost what is due, state expires after the window (a change's last
value stays), memory is bounded, and a runaway ``group_by`` is capped by ``max_groups``."""

from __future__ import annotations

import gc
import logging
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from tocsin_rules import (
    AbsenceConfig,
    AbsenceKind,
    ChangeConfig,
    ChangeKind,
    ThresholdConfig,
    ThresholdKind,
)
from tocsin_rules.stateful import StatefulKind

from tocsin import Event, Firing, RuleKind
from tocsin.rules import Engine, PendingAlert

from .conftest import Clock, build, event, seen

GROUPS = 10_000

RULES = """
[[rules]]
name = "threshold"
kind = "threshold"
group_by = ["key"]
window = "10s"
count = 2

[[rules]]
name = "change"
kind = "change"
group_by = ["key"]
field = "value"
by = "5%"
window = "10s"

[[rules]]
name = "absence"
kind = "absence"
group_by = ["key"]
window = "10s"
max_groups = {cap}
"""


def kinds(engine: Engine) -> dict[str, StatefulKind]:  # type: ignore[type-arg]
    out = {}
    for name, rule in engine.rules.items():
        assert isinstance(rule.kind, StatefulKind)
        out[name] = rule.kind
    return out


def count_wakes(kind: RuleKind) -> Callable[[], int]:
    """Count the kind's ``wake`` calls (the work a tick does)."""
    assert isinstance(kind, StatefulKind)
    calls = [0]
    wake = kind.wake

    def counting(key: str, group: Any, now: float) -> list[Firing]:
        calls[0] += 1
        return wake(key, group, now)

    kind.wake = counting  # type: ignore[method-assign]
    return lambda: calls[0]


def feed(engine: Engine, round_: int, keys: range) -> int:
    alerts = 0
    for n in keys:
        e = Event(
            id=f"{round_}-{n}",
            source="s",
            provider="p",
            type="t",
            data={"key": n, "value": 100 + round_},
            time="2027-01-01T00:00:00Z",
        )
        alerts += len(engine.process(e))
    return alerts


def test_ten_thousand_groups_expire_and_ticks_only_touch_what_is_due(tmp_path: Path) -> None:
    clock = Clock().at(0)
    engine = build(tmp_path, RULES.format(cap=100_000), clock)
    by_name = kinds(engine)
    wakes = {name: count_wakes(kind) for name, kind in by_name.items()}
    feed(engine, 0, range(GROUPS))
    assert {name: len(k.table) for name, k in by_name.items()} == dict.fromkeys(by_name, GROUPS)
    for second in range(1, 10):
        clock.at(second)
        assert engine.tick() == []
    assert sum(w() for w in wakes.values()) == 0  # 9 ticks over 30,000 groups: no work
    assert len(engine.take_state()) == 3 * GROUPS
    clock.at(10)
    fired = engine.tick()
    assert len(fired) == GROUPS and {p.alert.rule for p in fired} == {"absence"}
    assert len(by_name["threshold"].table) == 0
    assert len(by_name["change"].table) == GROUPS  # a last value is a reference, however old
    assert len(by_name["absence"].table) == GROUPS  # keys seen stay while they may resolve
    deleted = [w for w in engine.take_state() if w[2] is None]
    assert len(deleted) == GROUPS  # expired groups leave the state database too
    for kind in by_name.values():
        assert kind.table.heap_size() <= len(kind.table) + 64


def rule_kinds() -> dict[str, StatefulKind]:  # type: ignore[type-arg]
    """The three kinds alone: the engine's rendering would dominate under tracemalloc."""
    window = {"window": "10s", "group_by": ["key"]}
    return {
        "threshold": ThresholdKind(
            ThresholdConfig.model_validate({"name": "t", "kind": "threshold", "count": 2, **window})
        ),
        "change": ChangeKind(
            ChangeConfig.model_validate(
                {
                    "name": "c",
                    "kind": "change",
                    "field": "value",
                    "by": "5%",
                    "max_groups": GROUPS,
                    **window,
                }
            )
        ),
        "absence": AbsenceKind(
            AbsenceConfig.model_validate(
                {"name": "a", "kind": "absence", "max_groups": GROUPS, **window}
            )
        ),
    }


def fresh_keys(kinds: list[StatefulKind], n: int) -> None:  # type: ignore[type-arg]
    """Round ``n``: 10,000 keys never seen before, each once; 10 s later, the ticks."""
    now = n * 20.0
    e = Event(id=f"{n}", source="s", provider="p", type="t", data={"value": 100 + n})
    for key in range(n * GROUPS, (n + 1) * GROUPS):
        for kind in kinds:
            kind.on_event(e, f"[{key}]", now)
    for kind in kinds:
        kind.state_changes()
        kind.on_tick(now + 10)
        kind.state_changes()


def traced(round_: Callable[[], None]) -> tuple[int, int]:
    """Memory allocated by ``round_`` and still held after it, and the peak during it."""
    gc.collect()
    tracemalloc.start()
    try:
        round_()
        gc.collect()
        return tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()


def test_windows_leave_nothing_behind_after_ten_thousand_fresh_keys() -> None:
    threshold = rule_kinds()["threshold"]
    fresh_keys([threshold], 0)  # the tables' and the heap's capacity grow once
    held, peak = traced(lambda: fresh_keys([threshold], 1))
    assert len(threshold.table) == 0
    assert held < 64 * 1024, held  # all expired: nothing left, not even table capacity
    # At the peak: 10,000 groups and one batch of their saved state.
    assert peak < 30 * 1024 * 1024, peak


@pytest.mark.parametrize("name", ["absence", "change"])
def test_absence_keys_and_last_values_stay_within_max_groups(name: str) -> None:
    kind = rule_kinds()[name]
    fresh_keys([kind], 0)
    rounds: list[tuple[int, int]] = []

    def two_rounds() -> None:
        for n in (1, 2):
            fresh_keys([kind], n)
            gc.collect()
            rounds.append(tracemalloc.get_traced_memory())

    traced(two_rounds)
    assert len(kind.table) == GROUPS and kind.table.evicted == 2 * GROUPS
    (first, _), (second, peak) = rounds
    # Each round's 10,000 new keys replace the last round's: no growth (an absence key
    # costs about 350 bytes, the event they share counted once; a last value less).
    assert first < GROUPS * 1024, first
    assert abs(second - first) < 256 * 1024, (first, second)
    assert peak < 30 * 1024 * 1024, peak


def test_max_groups_forgets_the_least_recently_seen_with_one_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    clock = Clock().at(0)
    engine = build(tmp_path, RULES.format(cap=100), clock)
    absence = kinds(engine)["absence"]
    feed(engine, 0, range(100))
    with caplog.at_level(logging.WARNING, logger="tocsin_rules"):
        feed(engine, 1, range(1))  # key 0 is seen again: the most recent
        feed(engine, 2, range(100, 150))
    assert len(absence.table) == 100 and absence.table.evicted == 50
    assert "[0]" in absence.table and "[1]" not in absence.table and "[51]" in absence.table
    warnings = [r for r in caplog.records if "max_groups" in r.getMessage()]
    assert len(warnings) == 1 and "'absence'" in warnings[0].getMessage()
    deleted = {w[1].rpartition("\x1f")[2] for w in engine.take_state() if w[2] is None}
    assert deleted == {f"[{n}]" for n in range(1, 51)}


def test_max_groups_forgets_a_quiet_group_before_a_firing_one(tmp_path: Path) -> None:
    # The rules audit: the idle firing group was evicted first, so its resolved never came.
    clock = Clock().at(0)
    engine = build(
        tmp_path, RULES.format(cap=100).replace("count = 2", "count = 2\nmax_groups = 2"), clock
    )
    threshold = kinds(engine)["threshold"]
    feed(engine, 0, range(1))
    assert seen(feed_alerts(engine, 1, range(1))) == [("firing", "1-0")]  # key 0 fires
    clock.at(1)
    feed(engine, 2, range(1, 2))
    clock.at(2)
    feed(engine, 3, range(2, 3))  # a third key: quiet key 1 goes, not firing key 0
    assert list(threshold.table) == ["[0]", "[2]"] and threshold.table.evicted == 1
    clock.at(10)
    assert [p.alert.status for p in engine.tick() if p.alert.rule == "threshold"] == ["resolved"]


def feed_alerts(engine: Engine, round_: int, keys: range) -> list[PendingAlert]:
    return [
        p
        for n in keys
        for p in engine.process(
            Event(id=f"{round_}-{n}", source="s", provider="p", type="t", data={"key": n})
        )
        if p.alert.rule == "threshold"
    ]


def test_evictions_leave_no_pile_of_stale_deadlines() -> None:
    absence = rule_kinds()["absence"]
    absence.table.max_groups = 100
    e = Event(id="x", source="s", provider="p", type="t", data={})
    for key in range(GROUPS):  # each new key evicts one: its heap entry goes stale
        absence.on_event(e, f"[{key}]", float(key) / 1000)
        assert absence.table.heap_size() <= 2 * 100 + 64
    fired = absence.on_tick(GROUPS / 1000 + 10)
    assert sorted(f.id_parts[0] for f in fired) == sorted(f"[{k}]" for k in range(9900, GROUPS))


def test_a_kind_only_sees_its_own_events(tmp_path: Path) -> None:
    clock = Clock().at(0)
    engine = build(tmp_path, RULES.format(cap=10), clock)
    e = event("x", other=1)  # no key, no value: every rule still matches (no match keys)
    engine.process(e)
    assert len(kinds(engine)["threshold"].table) == 1  # group_by gives [null]
    assert kinds(engine)["change"].skipped == 1
