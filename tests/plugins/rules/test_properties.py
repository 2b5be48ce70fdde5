"""Property tests: the kinds, driven through their API by random events and ticks, make
exactly the alerts of a brute-force reference that recomputes every window from the
whole history at every step (no deques, no deadlines, no heap)."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from tocsin_rules import (
    AbsenceConfig,
    AbsenceKind,
    ChangeConfig,
    ChangeKind,
    ThresholdConfig,
    ThresholdKind,
)

from tocsin import Event, Firing, RuleKind, utc_iso

START = 1_800_000_000.0
KEYS = ("a", "b")

# One step: ("event", seconds since the last step, key, value, event-time lag) or
# ("tick", seconds since the last step). Small steps, zero included: bounds get hit.
gaps = st.sampled_from([0.0, 0.25, 0.5, 1.0, 1.0, 2.0, 3.0, 5.0, 7.5, 12.0])
values = st.one_of(
    st.integers(-300, 3000).map(lambda cents: f"{Decimal(cents) / 100:.2f}"),
    # Few distinct values, so repeats, exact bounds and returns to a value are common.
    st.sampled_from(["n/a", "0", "0.00", "1.00", "1.03", "1.10", "9.70", "10", "10.50"]),
)
lags = st.sampled_from([0.0, 0.0, 0.5, 2.0, 4.0, 9.0, 20.0, -3.0, None])  # None: no time
steps = st.lists(
    st.one_of(
        st.tuples(st.just("event"), gaps, st.sampled_from(KEYS), values, lags),
        st.tuples(st.just("tick"), gaps),
    ),
    max_size=60,
)

Record = tuple[int, str, str, str, int, int]  # step, key, status, event id, firing no., repeat


def expired(t: float, window: float, now: float) -> bool:
    return t + window <= now


def number(value: str) -> Decimal | None:
    return None if value == "n/a" else Decimal(value)


WALL_STEPS = [0.0, 3600.0, -1800.0]
"""The wall clock minus the engine's, event by event in turn."""


def run(kind: RuleKind, plan: list[tuple[Any, ...]]) -> list[Record]:
    """Drive the real kind; firing numbers (the ms-based sequence) become 1, 2, ..."""
    now, out = START, []
    ordinals: dict[tuple[str, int], int] = {}
    for i, step in enumerate(plan):
        now += step[1]
        firings: list[Firing]
        if step[0] == "tick":
            firings = kind.on_tick(now)
        else:
            _, _, key, value, lag = step
            # The wall clock, which event times and receipt are on, is stepped from the
            # engine's (NTP after start-up): only an event's age may count.
            wall = now + WALL_STEPS[i % len(WALL_STEPS)]
            kind.wall = lambda wall=wall: wall  # type: ignore[misc]
            time = "no time" if lag is None else utc_iso(wall - lag)
            e = Event(id=f"e{i}", source="s", provider="p", type="t", data={"v": value}, time=time)
            firings = kind.on_event(e, key, now)
        for f in firings:
            key, *rest = f.id_parts
            if len(rest) == 1:  # change: (key, event id)
                out.append((i, key, f.status, f.event.id, 0, 0))
                continue
            seq, status, repeat = rest
            assert status == f.status
            number_ = ordinals.setdefault((key, seq), len({k for k in ordinals if k[0] == key}) + 1)
            out.append((i, key, f.status, f.event.id, number_, repeat))
    return out


def moment(now: float, lag: float | None, window: float, event_time: bool) -> float | None:
    """When an event counts: receipt time, or its own (never later than now, None: late)."""
    if not event_time or lag is None:
        return now
    t = min(now - lag, now)
    return None if expired(t, window, now) else t


@dataclass
class Alert:
    """The reference's alert state of one key."""

    firing: bool = False
    number: int = 0
    repeat: int = 0
    next: float | None = None
    carried: str = ""


@dataclass
class Reference:
    """Brute force: every check recomputes from the whole history."""

    window: float
    event_time: bool = False
    send_resolved: bool = True
    realert: float | None = None
    backoff: bool = False
    out: list[Record] = field(default_factory=list)
    alerts: dict[str, Alert] = field(default_factory=lambda: defaultdict(Alert))

    def fire(self, i: int, key: str, carried: str, now: float) -> None:
        a = self.alerts[key]
        a.firing, a.number, a.repeat, a.carried = True, a.number + 1, 0, carried
        a.next = None if self.realert is None else now + self.realert
        self.out.append((i, key, "firing", carried, a.number, 0))

    def resolve(self, i: int, key: str, carried: str) -> None:
        a = self.alerts[key]
        a.firing, a.repeat, a.next = False, 0, None
        if self.send_resolved:
            self.out.append((i, key, "resolved", carried, a.number, 0))

    def repeat_if_due(self, i: int, key: str, now: float) -> None:
        a = self.alerts[key]
        if a.firing and a.next is not None and a.next <= now:
            assert self.realert is not None
            a.repeat += 1
            interval = self.realert * (2.0 ** min(a.repeat, 40) if self.backoff else 1)
            a.next = now + interval
            self.out.append((i, key, "firing", a.carried, a.number, a.repeat))


@dataclass
class ThresholdReference(Reference):
    count: int | None = None
    bound: Decimal | None = None
    history: dict[str, list[tuple[float, Decimal]]] = field(
        default_factory=lambda: defaultdict(list)
    )

    def holds(self, key: str, now: float) -> bool:
        inside = [v for t, v in self.history[key] if not expired(t, self.window, now)]
        if self.count is not None:
            return len(inside) >= self.count
        assert self.bound is not None
        return sum(inside, Decimal(0)) >= self.bound

    def check(self, i: int, key: str, now: float) -> None:
        a = self.alerts[key]
        if a.firing and not self.holds(key, now):
            self.resolve(i, key, a.carried)
        else:
            self.repeat_if_due(i, key, now)

    def run(self, plan: list[tuple[Any, ...]]) -> list[Record]:
        now = START
        for i, step in enumerate(plan):
            now += step[1]
            if step[0] == "tick":
                for key in KEYS:
                    self.check(i, key, now)
                continue
            _, _, key, raw, lag = step
            value = number(raw) if self.bound is not None else Decimal(1)
            if value is None or value <= 0:
                continue
            t = moment(now, lag, self.window, self.event_time)
            if t is None:
                continue
            self.check(i, key, now)
            self.history[key].append((t, value))
            if not self.alerts[key].firing and self.holds(key, now):
                self.fire(i, key, f"e{i}", now)
        return self.out


@dataclass
class AbsenceReference(Reference):
    last: dict[str, tuple[float, str]] = field(default_factory=dict)

    def check(self, i: int, key: str, now: float) -> None:
        a, (last, carried) = self.alerts[key], self.last[key]
        if not a.firing and expired(last, self.window, now):
            self.fire(i, key, carried, now)
        else:
            self.repeat_if_due(i, key, now)

    def run(self, plan: list[tuple[Any, ...]]) -> list[Record]:
        now = START
        for i, step in enumerate(plan):
            now += step[1]
            if step[0] == "tick":
                for key in sorted(self.last, key=lambda k: self.last[k][0]):
                    self.check(i, key, now)
                continue
            _, _, key, _, lag = step
            t = moment(now, lag, self.window, self.event_time)
            if t is None:
                continue
            if key not in self.last:
                self.last[key] = (t, f"e{i}")
                continue
            self.check(i, key, now)
            if t >= self.last[key][0]:
                self.last[key] = (t, f"e{i}")
            if self.alerts[key].firing:
                self.resolve(i, key, f"e{i}")
        return self.out


@dataclass
class ChangeReference:
    window: float
    by: Decimal
    percent: bool
    event_time: bool = False
    history: dict[str, list[tuple[float, Decimal]]] = field(
        default_factory=lambda: defaultdict(list)
    )

    def moved(self, reference: Decimal, value: Decimal) -> bool:
        if not self.percent:
            return abs(value - reference) >= self.by
        return reference != 0 and abs(value - reference) / abs(reference) * 100 >= self.by

    def run(self, plan: list[tuple[Any, ...]]) -> list[Record]:
        now, out = START, []
        for i, step in enumerate(plan):
            now += step[1]
            if step[0] == "tick":
                continue
            _, _, key, raw, lag = step
            value = number(raw)
            t = moment(now, lag, self.window, self.event_time)
            if value is None or t is None:
                continue
            history = self.history[key]
            inside = [p for p in history if not expired(p[0], self.window, now)]
            if not inside and history:  # the last value is a reference however old
                inside = [history[-1]]  # appended in time order (late ones are skipped)
            if inside and t < max(p[0] for p in inside):
                continue
            if inside and (self.moved(inside[0][1], value) or self.moved(inside[-1][1], value)):
                self.history[key] = [(t, value)]
                out.append((i, key, "firing", f"e{i}", 0, 0))
            else:
                self.history[key].append((t, value))
        return out


def by_key(records: list[Record]) -> dict[str, list[Record]]:
    """Per key, in order: groups due at the same tick may come in any order across keys."""
    out: dict[str, list[Record]] = defaultdict(list)
    for record in records:
        out[record[1]].append(record)
    return dict(out)


common = {"name": "r", "group_by": ["k"]}
windows = st.sampled_from([1.0, 2.5, 5.0, 10.0])
realerts = st.sampled_from([None, 1.0, 3.0, 7.0])
time_fields = st.sampled_from(["receipt", "event"])


@settings(max_examples=300, deadline=None)
@given(
    plan=steps,
    window=windows,
    count=st.integers(1, 4),
    realert=realerts,
    backoff=st.booleans(),
    send_resolved=st.booleans(),
    time_field=time_fields,
)
def test_threshold_count_matches_the_reference(
    plan: list[tuple[Any, ...]],
    window: float,
    count: int,
    realert: float | None,
    backoff: bool,
    send_resolved: bool,
    time_field: str,
) -> None:
    config = ThresholdConfig.model_validate(
        {
            **common,
            "kind": "threshold",
            "window": window,
            "count": count,
            "realert": realert,
            "realert_backoff": backoff and realert is not None,
            "send_resolved": send_resolved,
            "time_field": time_field,
        }
    )
    reference = ThresholdReference(
        window,
        event_time=time_field == "event",
        send_resolved=send_resolved,
        realert=realert,
        backoff=backoff and realert is not None,
        count=count,
    )
    assert by_key(run(ThresholdKind(config), plan)) == by_key(reference.run(plan))


@settings(max_examples=300, deadline=None)
@given(
    plan=steps,
    window=windows,
    bound=st.sampled_from([Decimal("0.01"), Decimal("10"), Decimal("25.5"), Decimal("40")]),
    realert=realerts,
    time_field=time_fields,
)
def test_threshold_sum_matches_the_reference(
    plan: list[tuple[Any, ...]],
    window: float,
    bound: Decimal,
    realert: float | None,
    time_field: str,
) -> None:
    config = ThresholdConfig.model_validate(
        {
            **common,
            "kind": "threshold",
            "window": window,
            "field": "v",
            "sum": float(bound),
            "realert": realert,
            "time_field": time_field,
        }
    )
    reference = ThresholdReference(
        window, event_time=time_field == "event", realert=realert, bound=bound
    )
    assert by_key(run(ThresholdKind(config), plan)) == by_key(reference.run(plan))


@settings(max_examples=300, deadline=None)
@given(
    plan=steps,
    window=windows,
    realert=realerts,
    backoff=st.booleans(),
    time_field=time_fields,
)
def test_absence_matches_the_reference(
    plan: list[tuple[Any, ...]],
    window: float,
    realert: float | None,
    backoff: bool,
    time_field: str,
) -> None:
    config = AbsenceConfig.model_validate(
        {
            **common,
            "kind": "absence",
            "window": window,
            "realert": realert,
            "realert_backoff": backoff and realert is not None,
            "time_field": time_field,
        }
    )
    reference = AbsenceReference(
        window,
        event_time=time_field == "event",
        realert=realert,
        backoff=backoff and realert is not None,
    )
    assert by_key(run(AbsenceKind(config), plan)) == by_key(reference.run(plan))


@settings(max_examples=300, deadline=None)
@given(
    plan=steps,
    window=windows,
    by=st.sampled_from(["0.5", "3", "10%", "3%", "50%"]),
    time_field=time_fields,
)
def test_change_matches_the_reference(
    plan: list[tuple[Any, ...]], window: float, by: str, time_field: str
) -> None:
    percent = by.endswith("%")
    config = ChangeConfig.model_validate(
        {
            **common,
            "kind": "change",
            "window": window,
            "field": "v",
            "by": by if percent else float(by),
            "time_field": time_field,
        }
    )
    reference = ChangeReference(
        window, Decimal(by.rstrip("%")), percent, event_time=time_field == "event"
    )
    assert by_key(run(ChangeKind(config), plan)) == by_key(reference.run(plan))
