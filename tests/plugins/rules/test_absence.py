"""``kind = "absence"``: a dead man's switch per key seen, or for the whole rule."""

from __future__ import annotations

from pathlib import Path

from tocsin_rules.absence import AbsenceKind

from tocsin import Event, utc_iso
from tocsin.rules import Engine
from tocsin.store import Store

from .conftest import (
    START,
    Clock,
    build,
    event,
    persist,
    removed,
    restart,
    saved_groups,
    seen,
)

PER_MARKET = """
[[rules]]
name = "market quiet"
kind = "absence"
group_by = ["market"]
window = "1m"
title = "market {{{{ market }}}} stopped quoting"
{extra}
"""

WHOLE = """
[sources.s]
plugin = "testpush"
url = "ws://127.0.0.1:9/feed"
token = "test-token"

[[rules]]
name = "no data"
kind = "absence"
source = "s"
window = "2m"
"""


def quote(n: int, market: str = "219") -> Event:
    return event(f"q{n}", market=market, price="2.10")


def kind_of(engine: Engine, name: str) -> AbsenceKind:
    kind = engine.rules[name].kind
    assert isinstance(kind, AbsenceKind)
    return kind


def test_a_key_seen_before_fires_after_the_window_and_resolves_when_it_returns(
    tmp_path: Path,
) -> None:
    clock = Clock().at(0)
    engine = build(tmp_path, PER_MARKET.format(extra=""), clock)
    assert engine.tick() == []
    assert engine.process(quote(1)) == []
    clock.at(30)
    assert engine.process(quote(2)) == []
    clock.at(89)
    assert engine.tick() == []
    assert kind_of(engine, "market quiet").explain('["219"]', clock.now) == (
        "last event 59s ago; fires after 1m"
    )
    clock.at(90)
    (fired,) = engine.tick()
    assert seen([fired]) == [("firing", "q2")]  # the last event seen
    assert fired.alert.title == "market 219 stopped quoting"
    clock.at(200)
    assert engine.tick() == []  # fires once
    assert kind_of(engine, "market quiet").explain('["219"]', clock.now) == (
        "no event for 2m50s (window 1m); firing"
    )
    (resolved,) = engine.process(quote(3))
    assert seen([resolved]) == [("resolved", "q3")]  # the event that came back
    assert resolved.alert.title == "[resolved] market 219 stopped quoting"
    assert resolved.alert.id != fired.alert.id
    clock.at(259)
    assert engine.tick() == []
    clock.at(260)
    (again,) = engine.tick()
    assert again.alert.status == "firing"
    assert again.alert.id not in {fired.alert.id, resolved.alert.id}


def test_a_key_never_seen_never_fires(tmp_path: Path) -> None:
    clock = Clock().at(0)
    engine = build(tmp_path, PER_MARKET.format(extra=""), clock)
    engine.process(quote(1, market="1"))
    clock.at(3600)
    assert [p.alert.event["data"]["market"] for p in engine.tick()] == ["1"]
    assert (
        engine.rules["market quiet"]
        .kind.explain('["2"]', clock.now)
        .startswith("no event seen for this group yet")
    )


def test_without_group_by_the_rule_is_watched_from_the_start(tmp_path: Path) -> None:
    clock = Clock().at(0)
    engine = build(tmp_path, WHOLE, clock)
    assert engine.tick() == []  # loaded: the watch begins
    clock.at(119)
    assert engine.tick() == []
    assert kind_of(engine, "no data").explain("", clock.now) == (
        "no event since the rule started 1m59s ago; fires after 2m"
    )
    clock.at(120)
    (fired,) = engine.tick()
    carried = fired.alert.event
    assert fired.alert.status == "firing"
    assert (carried["provider"], carried["type"], carried["source"]) == ("tocsin", "absence", "s")
    assert carried["data"]["window"] == "2m"
    clock.at(125)
    (resolved,) = engine.process(event("x1", anything=1))
    assert seen([resolved]) == [("resolved", "x1")]


def test_an_event_after_a_silence_but_before_the_tick_fires_then_resolves(
    tmp_path: Path,
) -> None:
    clock = Clock().at(0)
    engine = build(tmp_path, PER_MARKET.format(extra=""), clock)
    engine.process(quote(1))
    clock.at(61)  # silent for 61 s; the tick has not run yet
    assert seen(engine.process(quote(2))) == [("firing", "q1"), ("resolved", "q2")]


def test_realert_while_silent_with_backoff(tmp_path: Path) -> None:
    clock = Clock().at(0)
    engine = build(
        tmp_path, PER_MARKET.format(extra='realert = "30s"\nrealert_backoff = true'), clock
    )
    engine.process(quote(1))
    sent = []
    for second in range(1, 400):
        clock.at(second)
        sent += [(second, p.alert.status) for p in engine.tick()]
    assert sent == [(60, "firing"), (90, "firing"), (150, "firing"), (270, "firing")]
    (resolved,) = engine.process(quote(2))
    assert resolved.alert.status == "resolved"
    clock.at(1000)
    assert [p.alert.status for p in engine.tick()] == ["firing"]  # a new firing, new repeats


def test_firing_survives_a_restart_and_quiet_keys_count_from_the_restart(
    tmp_path: Path,
) -> None:
    text = PER_MARKET.format(extra="")
    clock = Clock().at(0)
    store = Store.open(tmp_path / "state")
    try:
        first = build(tmp_path, text, clock)
        first.process(quote(1, market="219"))
        clock.at(50)
        first.process(quote(2, market="33"))
        clock.at(60)
        (fired,) = first.tick()
        assert fired.alert.event["data"]["market"] == "219"
        persist(store, first)
        assert set(saved_groups(store)) == {'["219"]', '["33"]'}

        clock.at(500)  # down for 440 s: "33" was quiet as far as we know, but so were we
        second = restart(store, tmp_path, text, clock)
        assert second.tick() == []
        clock.at(559)
        assert second.tick() == []
        clock.at(560)  # a window after the restart
        (quiet,) = second.tick()
        assert quiet.alert.event["data"]["market"] == "33"
        (resolved,) = second.process(quote(3, market="219"))  # "219" fired before: resolves
        assert seen([resolved]) == [("resolved", "q3")]
        assert len({fired.alert.id, quiet.alert.id, resolved.alert.id}) == 3
        persist(store, second)

        clock.at(561)
        third = restart(store, tmp_path, text, clock)
        assert third.process(quote(4, market="219")) == []  # resolved once, not again
        assert seen(third.process(quote(5, market="33"))) == [("resolved", "q5")]
    finally:
        store.close()


def test_reload_keeps_the_watch_of_an_unchanged_rule(tmp_path: Path) -> None:
    clock = Clock().at(0)
    old = build(tmp_path, WHOLE, clock)
    old.tick()
    clock.at(100)
    new = build(tmp_path, WHOLE, clock)
    new.adopt(old)
    clock.at(120)
    assert [p.alert.status for p in new.tick()] == ["firing"]  # 2m after the first load
    changed = build(tmp_path, WHOLE.replace('"2m"', '"3m"'), clock)
    changed.adopt(new)
    changed.tick()  # a changed rule is watched from its own load
    clock.at(120 + 179)
    assert changed.tick() == []
    clock.at(120 + 180)
    assert [p.alert.status for p in changed.tick()] == ["firing"]


def test_a_retracted_last_event_ends_the_firing_and_the_watch_starts_again(
    tmp_path: Path,
) -> None:
    clock = Clock().at(0)
    engine = build(tmp_path, PER_MARKET.format(extra='realert = "10s"'), clock)
    assert engine.process(quote(1)) == []
    clock.at(61)
    (firing,) = engine.tick()
    assert seen([firing]) == [("firing", "q1")]
    removal = removed(event("q1", market="219", price="2.10"))
    (retracted,) = [
        p
        for p in [engine.retraction("market quiet", firing.alert.id, firing.group, removal)]
        if p is not None
    ]
    assert seen([retracted]) == [("retracted", "q1")]
    # No repeat of the retracted firing, and no new firing before a whole window of silence.
    for second in range(62, 121):
        clock.at(second)
        assert engine.tick() == []
    clock.at(122)
    (again,) = engine.tick()
    assert again.alert.status == "firing" and again.alert.id != firing.alert.id


def test_an_absence_alert_carries_no_fact_the_provider_took_back(tmp_path: Path) -> None:
    # Before, the removal reached only rules whose firing carried the fact: the absence
    # fired later carrying the retracted quote (a leftover the rules audit confirmed).
    clock = Clock().at(0)
    engine = build(tmp_path, PER_MARKET.format(extra=""), clock)
    engine.process(quote(1))
    removal = quote(1)
    removal.removed = True
    engine.discard(removal)
    clock.at(30)
    # It said "no event since the rule started" (review of 36e9148).
    assert engine.explain(quote(2)) == [
        ("market quiet", "", "last event 30s ago, taken back since; fires after 1m")
    ]
    clock.at(60)
    (fired,) = engine.tick()
    assert fired.alert.status == "firing"
    assert fired.alert.event["id"] != "q1" and fired.alert.event["provider"] == "tocsin"
    assert fired.alert.event["data"]["window"] == "1m"
    assert fired.alert.title == "market 219 stopped quoting"  # the group's value is there


def test_a_placeholder_has_a_list_where_a_group_by_path_indexes_one(tmp_path: Path) -> None:
    # A digit part of a path indexes a list (get_path): the placeholder built a dict
    # {"1": ...}, where the events have a list, and the title lost the actor (the rules
    # audit).
    rule = """
[[rules]]
name = "signer quiet"
kind = "absence"
group_by = ["authorization.1.actor", "args.to", "authorization.9.actor"]
window = "1m"
title = "{{ authorization[1].actor }} to {{ args.to }} quiet"
"""
    clock = Clock().at(0)
    engine = build(tmp_path, rule, clock)
    signers = [{"actor": "bob"}, {"actor": "ann"}]  # none at index 9: null in the key
    engine.process(event("a1", authorization=signers, args={"to": "eve"}))
    removal = event("a1", authorization=signers, args={"to": "eve"})
    removal.removed = True
    engine.discard(removal)
    clock.at(60)
    (fired,) = engine.tick()
    assert fired.alert.event["provider"] == "tocsin"
    data = fired.alert.event["data"]
    # Nulls before the index; none padded for the missing index 9.
    assert data["authorization"] == [None, {"actor": "ann"}]
    assert data["args"] == {"to": "eve"}
    assert fired.alert.title == "ann to eve quiet"
    assert fired.group == 'signer quiet\x1f["ann","eve",null]'  # the events' own key


def test_the_event_that_ended_a_silence_taken_back_leaves_the_resolved_and_watches_on(
    tmp_path: Path,
) -> None:
    # The resolved stands (only firings are retracted); the silence counts from the event
    # taken back, so a key still silent fires again a window after it (the rules audit).
    clock = Clock().at(0)
    engine = build(tmp_path, PER_MARKET.format(extra=""), clock)
    engine.process(quote(1))
    clock.at(60)
    (fired,) = engine.tick()
    clock.at(70)
    (resolved,) = engine.process(quote(2))
    assert seen([resolved]) == [("resolved", "q2")]
    clock.at(75)
    removal = quote(2)
    removal.removed = True
    engine.discard(removal)
    assert engine.explain(quote(3)) == [
        ("market quiet", "", "last event 5s ago, taken back since; fires after 1m")
    ]
    clock.at(129)
    assert engine.tick() == []
    clock.at(130)  # a window after the event taken back
    (again,) = engine.tick()
    assert again.alert.status == "firing" and again.alert.event["provider"] == "tocsin"
    assert again.alert.event["data"]["since"] == utc_iso(START + 70)
    assert again.alert.title == "market 219 stopped quoting"
    assert again.alert.id not in {fired.alert.id, resolved.alert.id}
