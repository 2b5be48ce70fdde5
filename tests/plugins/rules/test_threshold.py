"""``kind = "threshold"``: fires at the bound, resolves on time, realerts, survives a
restart and a reload; windows driven by an injected clock."""

from __future__ import annotations

import logging
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from tocsin_rules import ThresholdConfig
from tocsin_rules.numbers import parse_move
from tocsin_rules.threshold import ThresholdKind

from tocsin import Event
from tocsin.rules import Engine
from tocsin.store import Store

from .conftest import Clock, build, event, persist, removed, restart, saved_groups, seen

RULE = """
[[rules]]
name = "burst"
kind = "threshold"
match = {{ kind = "out" }}
group_by = ["who"]
title = "{{{{ who }}}} sent {{{{ amount }}}}"
window = "10s"
count = 3
{extra}
"""


def out(n: int, who: str = "ann", **data: Any) -> Event:
    return event(f"e{n}", kind="out", who=who, **data)


def kind_of(engine: Engine, name: str = "burst") -> ThresholdKind:
    kind = engine.rules[name].kind
    assert isinstance(kind, ThresholdKind)
    return kind


def test_fires_at_the_bound_and_resolves_on_time_with_no_event(tmp_path: Path) -> None:
    clock = Clock().at(0)
    engine = build(tmp_path, RULE.format(extra=""), clock)
    assert engine.process(out(1)) == []
    clock.at(1)
    assert engine.process(out(2)) == []
    clock.at(2)
    (fired,) = engine.process(out(3, amount=7))
    assert seen([fired]) == [("firing", "e3")]  # the event that crossed the bound
    assert fired.alert.title == "ann sent 7"
    clock.at(9.9)
    assert engine.tick() == []
    clock.at(10)  # e1 leaves the window: 2 of 3, resolved with no further event
    (resolved,) = engine.tick()
    assert seen([resolved]) == [("resolved", "e3")]
    assert resolved.alert.title == "[resolved] ann sent 7"
    assert resolved.alert.id != fired.alert.id
    assert kind_of(engine).table.groups  # two events still in the window
    clock.at(12)
    assert engine.tick() == []
    assert len(kind_of(engine).table) == 0  # window empty, not firing: forgotten


def test_groups_are_separate_and_a_new_crossing_fires_again_with_a_new_id(
    tmp_path: Path,
) -> None:
    clock = Clock().at(0)
    engine = build(tmp_path, RULE.format(extra=""), clock)
    ids = []
    for n in range(3):
        clock.at(n)
        if n < 2:
            assert engine.process(out(100 + n, who="bob")) == []  # other group: no effect
        ids += [p.alert.id for p in engine.process(out(n))]
    clock.at(10)
    ids += [p.alert.id for p in engine.tick()]
    clock.at(10.5)
    (again,) = engine.process(out(9))  # e1, e2 and e9 within 10s: 3 again
    assert again.alert.status == "firing"
    assert len({*ids, again.alert.id}) == 3


def test_sum_of_eos_amounts_reaches_the_bound_exactly(tmp_path: Path) -> None:
    rule = """
[[rules]]
name = "big outflow"
kind = "threshold"
match = { kind = "out" }
window = "1h"
field = "amount"
sum = 10000
"""
    clock = Clock().at(0)
    engine = build(tmp_path, rule, clock)
    kind = kind_of(engine, "big outflow")
    for n, amount in enumerate(["4000.0000 EOS", "oops", -5000, None, 3999.9]):
        assert engine.process(out(n, amount=amount)) == []
    assert kind.skipped == 3  # "oops", a negative value and a missing field count nothing
    assert kind.explain("", clock.now) == "sum 7999.9 of 10000 within 1h"
    (fired,) = engine.process(out(9, amount="2000.1"))  # 10000.0: the bound, exactly
    assert seen([fired]) == [("firing", "e9")]
    assert kind.explain("", clock.now) == "sum 10000 of 10000 within 1h; firing"
    clock.at(3600)
    (resolved,) = engine.tick()
    assert seen([resolved]) == [("resolved", "e9")]


def test_realert_repeats_while_firing_and_backoff_doubles(tmp_path: Path) -> None:
    extra = 'realert = "1m"\nrealert_backoff = true'
    clock = Clock().at(0)
    rule = RULE.format(extra=extra).replace('window = "10s"', 'window = "1h"')
    engine = build(tmp_path, rule, clock)
    ids = []
    for n in range(3):
        ids += [p.alert.id for p in engine.process(out(n))]
    repeats = []
    for second in range(1, 1000):
        clock.at(second)
        for pending in engine.tick():
            assert seen([pending]) == [("firing", "e2")]  # a repeat carries the crossing
            repeats.append(second)
            ids.append(pending.alert.id)
    assert repeats == [60, 180, 420, 900]  # 1m, then 2m, 4m, 8m
    assert len(set(ids)) == len(ids) == 5


def test_realert_without_backoff_and_no_resolved_alert_when_not_wanted(
    tmp_path: Path,
) -> None:
    clock = Clock().at(0)
    engine = build(tmp_path, RULE.format(extra='realert = "4s"\nsend_resolved = false'), clock)
    fired = [p for n in range(3) for p in engine.process(out(n))]
    assert len(fired) == 1
    sent = []
    for second in range(1, 20):
        clock.at(second)
        sent += [(second, p.alert.status) for p in engine.tick()]
    assert sent == [(4, "firing"), (8, "firing")]  # resolved at 10, silently
    assert not kind_of(engine).table.get('["ann"]')
    clock.at(20)
    again = [p for n in range(10, 13) for p in engine.process(out(n))]
    assert seen(again) == [("firing", "e12")]  # it tracked the resolution: fires anew
    assert again[0].alert.id != fired[0].alert.id


def test_event_time_windows_ignore_late_events_and_count_unreadable_times(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    clock = Clock().at(100)
    engine = build(tmp_path, RULE.format(extra='time_field = "event"'), clock)
    kind = kind_of(engine)
    assert engine.process(event("late", 89.5, kind="out", who="ann")) == []
    assert kind.late == 1 and len(kind.table) == 0  # older than the window: ignored
    with caplog.at_level(logging.WARNING, logger="tocsin_rules"):
        assert engine.process(event("a", "yesterday", kind="out", who="ann")) == []
        assert engine.process(event("b", "2027-13-01T00:00:00Z", kind="out", who="ann")) == []
    assert kind.untimed == 2  # counted at receipt time (100)
    assert caplog.text.count("has no readable time") == 1  # one line per rule, not per event
    (fired,) = engine.process(event("c", 95.0, kind="out", who="ann"))  # 5 s old, in window
    assert fired.alert.status == "firing"
    clock.at(105)  # the event-time point (95) leaves at 105, before the receipt ones
    (resolved,) = engine.tick()
    assert seen([resolved]) == [("resolved", "c")]


def test_future_event_times_count_as_now(tmp_path: Path) -> None:
    clock = Clock().at(0)
    engine = build(tmp_path, RULE.format(extra='time_field = "event"'), clock)
    for n in range(3):
        engine.process(event(f"f{n}", 3600.0, kind="out", who="ann"))  # a clock an hour ahead
    clock.at(10)
    assert seen(engine.tick()) == [("resolved", "f2")]  # not an hour later


def test_event_times_count_by_their_age_when_the_wall_clock_stepped(tmp_path: Path) -> None:
    # The wall clock was an hour fast when the daemon started (the engine's clock is
    # anchored there), then NTP set it right: events a second old looked an hour old, so
    # every one was late, and an event-time threshold never fired.
    clock = Clock().at(3600)
    engine = build(tmp_path, RULE.format(extra='time_field = "event"'), clock)
    engine.wall = lambda: clock.now - 3600  # set right: an hour behind the engine's clock
    kind = kind_of(engine)
    fired = []
    for n in range(3):
        clock.at(3600 + n)
        fired += engine.process(event(f"s{n}", n - 1.0, kind="out", who="ann"))  # 1 s old
    assert kind.late == 0 and seen(fired) == [("firing", "s2")]
    clock.at(3600 + 9)  # s0 counted at 3599 (1 s old when it came): leaves at 3609
    assert seen(engine.tick()) == [("resolved", "s2")]


def test_an_event_that_waited_before_it_was_evaluated_is_as_old_as_it_is(
    tmp_path: Path,
) -> None:
    # Events received at 0, 20 and 40 s and evaluated at 100 s (the intake paused for a
    # full disk): placed by their age when received, they counted as fresh and fired
    # (review of fa78a5d); 60 to 100 s old, they are late for a 10 s window.
    clock = Clock().at(100)
    engine = build(tmp_path, RULE.format(extra='time_field = "event"'), clock)
    for n, t in enumerate((0.0, 20.0, 40.0)):
        assert engine.process(event(f"w{n}", t, kind="out", who="ann")) == []
    assert kind_of(engine).late == 3


def test_a_firing_threshold_survives_a_restart_and_resolves_once(tmp_path: Path) -> None:
    text = RULE.format(extra='realert = "5s"')
    clock = Clock().at(0)
    store = Store.open(tmp_path / "state")
    try:
        first = build(tmp_path, text, clock)
        fired = []
        for n in range(3):
            clock.at(n)
            fired += first.process(out(n))
        persist(store, first)
        assert '"firing":true' in saved_groups(store)['["ann"]']

        clock.at(7)  # a restart: a new engine on the same database
        second = restart(store, tmp_path, text, clock)
        (repeat,) = second.tick()  # the realert time (2 + 5 s) came back too
        assert repeat.alert.status == "firing" and repeat.alert.id != fired[0].alert.id
        persist(store, second)
        clock.at(9)
        third = restart(store, tmp_path, text, clock)
        assert third.tick() == []
        clock.at(10)  # e0 leaves the window
        (resolved,) = third.tick()
        assert seen([resolved]) == [("resolved", "e2")]
        assert third.tick() == []
        persist(store, third)
        assert '"firing":false' in saved_groups(store)['["ann"]']  # e1, e2 still count
        clock.at(12)
        assert third.tick() == []
        persist(store, third)
        assert saved_groups(store) == {}  # expired state is deleted

        clock.at(20)  # after yet another restart, the next firing has a new id
        fourth = restart(store, tmp_path, text, clock)
        again = [p for n in range(20, 23) for p in fourth.process(out(n))]
        ids = [fired[0].alert.id, repeat.alert.id, resolved.alert.id, again[0].alert.id]
        assert len(set(ids)) == 4
    finally:
        store.close()


def test_reload_keeps_unchanged_rules_and_starts_changed_ones_fresh(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    clock = Clock().at(0)
    text = RULE.format(extra="")
    old = build(tmp_path, text, clock)
    for n in range(2):
        old.process(out(n))
    same = build(tmp_path, text, clock)
    same.adopt(old)
    assert seen(same.process(out(2))) == [("firing", "e2")]  # kept its 2 of 3

    changed = build(tmp_path, text.replace("count = 3", "count = 4"), clock)
    with caplog.at_level(logging.INFO, logger="tocsin.rules"):
        changed.adopt(same)
    assert "rule 'burst' changed: its windows and firing alerts start fresh" in caplog.text
    assert changed.process(out(3)) == []
    assert kind_of(changed).explain('["ann"]', clock.now) == "1 of 4 within 10s"


def test_explain_gives_the_window_count(tmp_path: Path) -> None:
    clock = Clock().at(0)
    engine = build(tmp_path, RULE.format(extra=""), clock)
    engine.process(out(1))
    assert engine.explain(out(2)) == [("burst", "", "1 of 3 within 10s")]
    assert engine.explain(out(2, who="bob")) == [("burst", "", "0 of 3 within 10s")]
    clock.at(10)
    assert engine.explain(out(2)) == [("burst", "", "0 of 3 within 10s")]


def test_a_sum_window_keeps_a_bounded_number_of_points_and_its_total() -> None:
    from decimal import Decimal

    from tocsin_rules.windows import MAX_SUM_POINTS, SumWindow

    window = SumWindow()
    for n in range(3 * MAX_SUM_POINTS):  # one point every 10 ms: 123 s of them
        window.add(n / 100, Decimal("0.01"))
        assert len(window) <= MAX_SUM_POINTS
    assert window.sum(3600, 123.0) == Decimal("0.01") * 3 * MAX_SUM_POINTS  # exact
    # Merged points keep no id: taking back an event with none leaves them alone.
    assert not window.discard("") and window.total == Decimal("0.01") * 3 * MAX_SUM_POINTS
    # A 60 s window at t = 123 s holds the last 6,000 points (60.00 of them); merged
    # neighbours may keep a value up to a few hundredths of a second longer.
    assert Decimal("59.9") <= window.sum(60, 122.87) <= Decimal("60.1")
    window.expire(60, 200.0)
    assert len(window) == 0 and window.total == 0


def test_a_firing_the_throttle_held_back_gets_no_resolved(
    tmp_path: Path,
) -> None:
    # Before, the kind marked the group firing and the engine threw the firing away: the
    # receiver got "[resolved] ..." of a firing it never saw (rules audit).
    clock = Clock().at(0)
    engine = build(
        tmp_path, RULE.format(extra='throttle = "1h"').replace("count = 3", "count = 1"), clock
    )
    (first,) = engine.process(out(1))
    clock.at(10)
    (resolved,) = engine.tick()  # the first run ends: it was sent, so is its end
    clock.at(30)
    assert engine.process(out(2)) == []  # a new run, within the hour: throttled
    clock.at(40)
    assert engine.tick() == []  # its end: nobody was told it began
    assert engine.stats.throttled == 2
    assert seen([first, resolved]) == [("firing", "e1"), ("resolved", "e1")]
    clock.at(4000)  # an hour on: a run is sent, and so is its end
    (again,) = engine.process(out(3))
    clock.at(4010)
    assert seen([again, *engine.tick()]) == [("firing", "e3"), ("resolved", "e3")]


def test_a_throttled_repeat_of_a_sent_firing_keeps_its_resolved(tmp_path: Path) -> None:
    # A repeat held back by the throttle marked the run as unsent: the resolved alert of
    # a firing the receiver had got was dropped (review of the fix above).
    clock = Clock().at(0)
    rule = RULE.format(extra='throttle = "1h"\nrealert = "5s"').replace("count = 3", "count = 1")
    engine = build(tmp_path, rule, clock)
    (first,) = engine.process(out(1))
    for second in range(1, 10):  # repeats due every 5 s: all throttled
        clock.at(second)
        assert engine.tick() == []
    clock.at(10)  # e1 leaves the 10 s window: the run ends
    assert seen([first, *engine.tick()]) == [("firing", "e1"), ("resolved", "e1")]


def test_a_fact_taken_back_is_no_longer_counted_and_a_firing_resolves(tmp_path: Path) -> None:
    clock = Clock().at(0)
    engine = build(tmp_path, RULE.format(extra=""), clock)
    kind = kind_of(engine)
    for n in (1, 2, 3):
        fired = engine.process(out(n))
    assert seen(fired) == [("firing", "e3")]
    engine.discard(removed(out(2)))  # not the event the firing carries: no retraction
    assert kind.explain('["ann"]', clock.now) == "2 of 3 within 10s; firing"
    clock.at(0.5)
    assert seen(engine.tick()) == [("resolved", "e3")]  # below the bound: at the next tick
    assert seen(engine.process(out(2))) == [("firing", "e2")]  # taken back, pushed again
    engine.discard(removed(out(9, who="bob")))  # a fact no group counted: nothing
    assert kind.explain('["ann"]', clock.now) == "3 of 3 within 10s; firing"


def test_a_sum_takes_out_a_value_taken_back_and_reads_points_saved_without_ids(
    tmp_path: Path,
) -> None:
    clock = Clock().at(0)
    text = RULE.format(extra='field = "amount"\nsum = 10').replace("count = 3\n", "")
    store = Store.open(tmp_path / "state")
    try:
        engine = build(tmp_path, text, clock)
        engine.process(out(1, amount=4))
        engine.process(out(2, amount=5))
        engine.discard(removed(out(1, amount=4)))
        assert engine.process(out(3, amount=4)) == []  # 5 + 4: the 4 taken back is out
        assert kind_of(engine).explain('["ann"]', clock.now) == "sum 9 of 10 within 10s"
        persist(store, engine)
        assert saved_groups(store)['["ann"]'].startswith(
            '{"v":1,"points":[[1800000000.0,"5","e2"],[1800000000.0,"4","e3"]]'
        )
        # Saved before ids were kept: [time, value] (a sum), a bare time (a count).
        old_sum = '{"v":1,"points":[[1800000000.0,"5"]],"firing":false,"seq":0,"repeat":0,"next":null,"event":null}'
        store.call_sync(
            Store.commit_alerts,
            [],
            [],
            [("burst", f'kind\x1f{engine.rules["burst"].fingerprint}\x1f["ann"]', old_sum)],
        )
        again = restart(store, tmp_path, text, clock)
        assert kind_of(again).explain('["ann"]', clock.now) == "sum 5 of 10 within 10s"
        assert seen(again.process(out(4, amount=5))) == [("firing", "e4")]
    finally:
        store.close()
    count = ThresholdKind(
        ThresholdConfig.model_validate({"name": "c", "kind": "threshold", "count": 2, "window": 10})
    )
    group = count.decode({"points": [1.0, 2.0], "firing": False, "seq": 0, "repeat": 0,
                          "next": None, "event": None})  # fmt: skip
    assert group.points.count(10, 5.0) == 2


def test_sums_and_moves_are_exact_beyond_28_digits(tmp_path: Path) -> None:
    # Decimal's default context keeps 28 digits and rounds the rest: a sum just below its
    # bound rounded up to it and fired, and taking a value back out of a sum left a
    # residue (the rules audit; token amounts carry up to 18 decimals).
    clock = Clock().at(0)
    text = RULE.format(extra='field = "amount"\nsum = 1000000000000000000')
    engine = build(tmp_path, text.replace("count = 3\n", ""), clock)
    assert engine.process(out(1, amount="999999999999999999.9999999999999")) == []
    assert seen(engine.process(out(2, amount="0.0000000000001"))) == [("firing", "e2")]
    from tocsin_rules.windows import SumWindow

    window = SumWindow()
    window.add(0.0, Decimal("0.000000000000000001"), "a")
    window.add(0.0, Decimal(10**30), "b")
    assert window.discard("b") and window.total == Decimal("0.000000000000000001")
    move = parse_move("3%")
    assert move.reached(Decimal(10**30), Decimal(10**30) + Decimal(3 * 10**28))
    assert not move.reached(Decimal(10**30), Decimal(10**30 + 3 * 10**28 - 1))


def test_a_sum_bound_beyond_a_toml_integer_is_exact(tmp_path: Path) -> None:
    # Written as a string: a TOML integer stops at 2**63 - 1 (the rules audit).
    clock = Clock().at(0)
    text = RULE.format(extra=f'field = "amount"\nsum = "{2**64 + 1}"')
    engine = build(tmp_path, text.replace("count = 3\n", ""), clock)
    assert engine.process(out(1, amount=str(2**63))) == []
    assert engine.process(out(2, amount=str(2**63))) == []  # 2**64: one short
    assert kind_of(engine).explain('["ann"]', clock.now) == (
        f"sum {2**64} of {2**64 + 1} within 10s"
    )
    assert seen(engine.process(out(3, amount=1))) == [("firing", "e3")]


def test_a_rule_that_ignores_removals_keeps_counting_what_was_taken_back(tmp_path: Path) -> None:
    # on_removed = "ignore": a removal is not the rule's business. discard resolved the
    # group early, carrying the retracted fact (review of d65e74e).
    clock = Clock().at(0)
    engine = build(tmp_path, RULE.format(extra='on_removed = "ignore"'), clock)
    fired = [p for n in (1, 2, 3) for p in engine.process(out(n))]
    assert seen(fired) == [("firing", "e3")]
    engine.discard(removed(out(2)))
    clock.at(1)
    assert engine.tick() == []
    assert kind_of(engine).explain('["ann"]', clock.now) == "3 of 3 within 10s; firing"
