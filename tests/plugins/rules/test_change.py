"""``kind = "change"``: one alert per move of a field, from the oldest value in the
window or from the last value; the window starts again from the value that fired."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from tocsin_rules.change import ChangeKind

from tocsin import Event
from tocsin.rules import Engine, PendingAlert
from tocsin.store import Store

from .conftest import Clock, build, event, persist, removed, restart, saved_groups, seen

RULE = """
[[rules]]
name = "odds moved"
kind = "change"
match = {{ open = true }}
group_by = ["product"]
field = "price"
by = {by}
window = "5m"
title = "odds {{{{ price }}}}"
"""


def odds(n: int, price: object, product: str = "1") -> Event:
    return event(f"o{n}", price=price, product=product, open=True)


def kind_of(engine: Engine) -> ChangeKind:
    kind = engine.rules["odds moved"].kind
    assert isinstance(kind, ChangeKind)
    return kind


def test_a_percentage_move_fires_once_and_the_window_starts_again(tmp_path: Path) -> None:
    clock = Clock().at(0)
    engine = build(tmp_path, RULE.format(by='"3%"'), clock)
    kind = kind_of(engine)
    assert engine.process(odds(1, "2.10")) == []
    assert kind.explain('["1"]', clock.now) == (
        "2.10 is the only value within 5m; fires on a move of 3%"
    )
    clock.at(10)
    assert engine.process(odds(2, "2.125")) == []
    assert kind.explain('["1"]', clock.now) == "moved 1.19% of 3% (from 2.10 to 2.125)"
    clock.at(20)
    (fired,) = engine.process(odds(3, "2.163"))  # exactly 3% above 2.10
    assert seen([fired]) == [("firing", "o3")]
    assert fired.alert.title == "odds 2.163"
    clock.at(30)
    assert engine.process(odds(4, "2.2")) == []  # 1.7% from 2.163, where it starts again
    clock.at(40)
    assert engine.process(odds(5, "2.163")) == []
    clock.at(50)
    (down,) = engine.process(odds(6, "2.09"))  # 3.4% below 2.163, the oldest
    assert seen([down]) == [("firing", "o6")]
    assert down.alert.id != fired.alert.id


def test_a_jump_from_the_last_value_fires_when_the_oldest_is_close(tmp_path: Path) -> None:
    clock = Clock().at(0)
    engine = build(tmp_path, RULE.format(by='"3%"'), clock)
    engine.process(odds(1, 100))
    clock.at(1)
    assert engine.process(odds(2, 102.9)) == []  # 2.9% from 100
    clock.at(2)
    assert seen(engine.process(odds(3, 99.8))) == [("firing", "o3")]  # 0.2% from 100, 3% from 102.9


def test_values_within_the_window_and_the_last_value_are_references(tmp_path: Path) -> None:
    clock = Clock().at(0)
    engine = build(tmp_path, RULE.format(by="0.5"), clock)
    kind = kind_of(engine)
    engine.process(odds(1, 10))
    clock.at(100)
    engine.process(odds(2, 10.3))
    clock.at(301)  # 10 has left the window; 10.3 is the oldest
    assert engine.process(odds(3, 10.6)) == []
    clock.at(302)
    assert seen(engine.process(odds(4, 10.8))) == [("firing", "o4")]  # 0.5 from 10.3
    clock.at(302 + 300)  # everything has left the window but the last value, 10.8
    assert kind.explain('["1"]', clock.now) == (
        "no value of price within 5m; fires on a move of 0.5 from the last, 10.8 (5m ago)"
    )
    assert engine.process(odds(5, 10.9)) == []
    clock.at(302 + 3600)  # odds that hold for an hour, then jump: a move from the last
    assert seen(engine.process(odds(6, 50))) == [("firing", "o6")]
    values = kind.table.get('["1"]').values  # type: ignore[union-attr]
    assert len(kind.table) == 1 and len(values) == 2  # and the value it moved from, 10.9
    clock.at(302 + 3600 + 300)
    engine.tick()
    assert len(values) == 1  # the move has left the window: only the last value stays


def test_a_zero_reference_gives_no_percentage_and_odd_values_are_ignored(
    tmp_path: Path,
) -> None:
    clock = Clock().at(0)
    engine = build(tmp_path, RULE.format(by='"3%"'), clock)
    kind = kind_of(engine)
    engine.process(odds(1, "0"))
    assert engine.process(odds(2, "5")) == []
    assert (
        kind.explain('["1"]', clock.now) == "no percentage of a reference value of 0 (from 0 to 5)"
    )
    for n, price in enumerate(["SUSPENDED", None, True, "nan", {"x": 1}], 10):
        assert engine.process(odds(n, price)) == []
    assert kind.skipped == 5
    assert seen(engine.process(odds(3, "5.2"))) == [("firing", "o3")]  # 4% from the last, 5


def test_the_last_value_survives_the_window_and_a_restart(tmp_path: Path) -> None:
    text = RULE.format(by='"10%"')
    clock = Clock().at(0)
    store = Store.open(tmp_path / "state")
    try:
        first = build(tmp_path, text, clock)
        first.process(odds(1, "2.00"))
        first.process(odds(2, "2.00", product="2"))
        persist(store, first)
        assert saved_groups(store)['["1"]'] == (
            '{"v":1,"values":[[1800000000.0,"2.00","o1",false]]}'  # time, value, id, moved
        )
        # Saved before ids were kept: [time, value].
        old = '{"v":1,"values":[[1800000000.0,"2.00"]]}'
        fingerprint = first.rules["odds moved"].fingerprint
        store.call_sync(
            Store.commit_alerts, [], [], [("odds moved", f'kind\x1f{fingerprint}\x1f["1"]', old)]
        )

        clock.at(60)
        second = restart(store, tmp_path, text, clock)
        assert seen(second.process(odds(3, "2.20"))) == [("firing", "o3")]  # 10% across it
        clock.at(300)  # product 2's value has left the window: it stays, as the last
        assert second.tick() == []
        assert list(kind_of(second).table) == ['["2"]', '["1"]']
        persist(store, second)
        clock.at(3600)
        third = restart(store, tmp_path, text, clock)
        assert seen(third.process(odds(4, "2.20", product="2"))) == [("firing", "o4")]
        assert third.process(odds(5, "2.21")) == []  # 0.5% from 2.20, product 1's last
        persist(store, third)
        assert saved_groups(store)['["2"]'] == (  # the move, and the value it moved from
            '{"v":1,"values":[[1800000000.0,"2.00","o2",false],[1800003600.0,"2.20","o4",true]]}'
        )
    finally:
        store.close()


def test_a_change_window_keeps_a_bounded_number_of_values() -> None:
    from decimal import Decimal

    from tocsin_rules.windows import MAX_VALUE_POINTS, ValueWindow

    window = ValueWindow()
    for n in range(3 * MAX_VALUE_POINTS):  # a new value every 10 ms, never the same twice
        window.add(n / 100, Decimal(n))
        assert len(window) <= MAX_VALUE_POINTS
    # The oldest value and the newest, which a move is measured from, are still there.
    assert window.points[0][:2] == (0.0, Decimal(0))
    newest = window.newest()
    assert newest is not None
    assert newest[:2] == ((3 * MAX_VALUE_POINTS - 1) / 100, Decimal(3 * MAX_VALUE_POINTS - 1))


def test_max_groups_forgets_a_stale_last_value_without_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A product the feed stopped quoting leaves only its last value: forgetting it for
    # room is what max_groups is for, not a group_by to check (review of ea5c80a).
    clock = Clock().at(0)
    engine = build(tmp_path, RULE.format(by='"3%"') + "max_groups = 2\n", clock)
    kind = kind_of(engine)
    engine.process(odds(1, "2.10", product="a"))
    engine.process(odds(2, "2.10", product="b"))
    clock.at(300)  # a and b are a window old
    with caplog.at_level(logging.WARNING, logger="tocsin_rules"):
        engine.process(odds(3, "2.10", product="c"))  # a goes
        engine.process(odds(4, "2.10", product="d"))  # b goes
        assert not [r for r in caplog.records if "max_groups" in r.getMessage()]
        assert list(kind.table) == ['["c"]', '["d"]'] and kind.table.evicted == 2
        engine.process(odds(5, "2.10", product="e"))  # c goes, with a value in the window
    (warning,) = [r for r in caplog.records if "max_groups" in r.getMessage()]
    assert "'odds moved'" in warning.getMessage()


def test_a_value_taken_back_no_longer_counts(tmp_path: Path) -> None:
    # change had no discard: a value the provider took back (a rollback) stayed in the
    # window and as the last value, and a move from it fired (the rules audit).
    clock = Clock().at(0)
    engine = build(tmp_path, RULE.format(by="0.5"), clock)
    kind = kind_of(engine)
    engine.process(odds(1, 10))
    clock.at(400)  # 10 has left the window: the last value
    assert engine.process(odds(2, "10.4")) == []
    engine.discard(removed(odds(2, "10.4")))
    assert kind.explain('["1"]', clock.now) == (
        "no value of price within 5m; fires on a move of 0.5 from the last, 10 (6m40s ago)"
    )
    assert engine.process(odds(3, "9.9")) == []  # 0.5 from 10.4, taken back; 0.1 from 10
    for n in (4, 5):  # a value two events in a row gave stays when one is taken back
        engine.process(odds(n, "10.2"))
    engine.discard(removed(odds(5, "10.2")))
    engine.discard(removed(odds(8, "10.2")))  # a fact the group never counted: nothing
    assert kind.explain('["1"]', clock.now) == "moved 0.3 of 0.5 (from 9.9 to 10.2)"
    engine.discard(removed(odds(6, "10.2", product="2")))  # no such group: nothing


def take_back(engine: Engine, e: Event, fired: PendingAlert) -> None:
    """What the daemon does when the provider takes ``e`` back: the rules stop counting
    it, and the alert it fired is retracted."""
    engine.discard(removed(e))
    retraction = engine.retraction("odds moved", fired.alert.id, fired.group, removed(e))
    assert retraction is not None and seen([retraction]) == [("retracted", e.id)]


def test_a_move_taken_back_is_undone_and_fires_again_when_pushed_again(
    tmp_path: Path,
) -> None:
    clock = Clock().at(0)
    store = Store.open(tmp_path / "state")
    text = RULE.format(by='"10%"')
    try:
        engine = build(tmp_path, text, clock)
        engine.process(odds(1, "2.00"))
        clock.at(10)
        engine.process(odds(2, "2.10"))
        clock.at(20)
        (moved,) = engine.process(odds(3, "2.20"))  # 10% from 2.00
        clock.at(30)
        assert engine.process(odds(4, "2.25")) == []  # 2.3% from 2.20, where it starts again
        persist(store, engine)
        engine = restart(store, tmp_path, text, clock)  # saved with event ids and moves
        kind = kind_of(engine)
        # A rollback takes the move back: the window is as it was before the move (2.00
        # its oldest value again), with 2.25 in it.
        take_back(engine, odds(3, "2.20"), moved)
        assert kind.explain('["1"]', clock.now) == "moved 12.5% of 10% (from 2.00 to 2.25)"
        clock.at(40)
        (again,) = engine.process(odds(3, "2.20"))  # pushed again: it moves again
        assert seen([again]) == [("firing", "o3")] and again.alert.id != moved.alert.id
        assert engine.process(odds(5, "2.30")) == []  # 4.5% from 2.20: started again
    finally:
        store.close()


def test_a_move_long_after_the_last_value_is_undone_to_it(tmp_path: Path) -> None:
    clock = Clock().at(0)
    engine = build(tmp_path, RULE.format(by='"10%"'), clock)
    kind = kind_of(engine)
    engine.process(odds(1, "2.00"))
    clock.at(3600)
    (moved,) = engine.process(odds(2, "3.00"))  # 50% from the last value, 2.00
    clock.at(3601)
    engine.tick()
    take_back(engine, odds(2, "3.00"), moved)
    assert kind.explain('["1"]', clock.now) == (
        "no value of price within 5m; fires on a move of 10% from the last, 2.00 (1h1s ago)"
    )
    assert seen(engine.process(odds(2, "3.00"))) == [("firing", "o2")]


def test_a_rule_that_ignores_removals_keeps_a_value_taken_back(tmp_path: Path) -> None:
    clock = Clock().at(0)
    engine = build(tmp_path, RULE.format(by="0.5") + 'on_removed = "ignore"\n', clock)
    engine.process(odds(1, 10))
    engine.process(odds(2, "10.4"))
    engine.discard(removed(odds(2, "10.4")))
    assert seen(engine.process(odds(3, "9.9"))) == [("firing", "o3")]  # 0.5 from 10.4
