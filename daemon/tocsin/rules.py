"""Compiled rules, the index that finds them, and the engine that turns events into alerts.

``RuleIndex`` finds candidate rules by hash lookups on ``match`` values (one per indexed
path), and by ``(source, type)`` for rules without ``match``: an event never scans every
rule. For each rule the index key is its ``match`` key whose value is rarest among all
rules, so 10,000 rules that share ``contract = "eosio.token"`` but differ in ``args.to``
are indexed by ``args.to``.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import Counter
from collections.abc import Callable, Collection, Container, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from .action import Alert
from .config import Config, RuleEntry, collector_paused
from .errors import ConfigError, Problem
from .events import Event, RecentIds, get_path, split_path, stable_id, to_json, utc_iso
from .fields import format_duration
from .plugins import Registry
from .rulekind import Firing, RuleConfig, RuleKind
from .store import FORGET

log = logging.getLogger(__name__)

Path = tuple[str, ...]
_RECENT_ALERTS = 65_536


_SCALARS = (str, int, float)  # bool is an int

# ``match`` keys stand for JSON's true and false, which equal no number: Python's True
# equals (and hashes as) 1, so a set of wanted values holds these instead. Nothing else in
# one is a tuple: an event's lists and objects never match.
_TRUE = ("bool", True)
_FALSE = ("bool", False)


def _hashable(value: Any) -> bool:
    # A tuple, not ``str | int | ...``: the union would be built again at every call
    # (twice per event on the hot path: 0.21 us a call against 0.05, timeit).
    return isinstance(value, _SCALARS) or value is None


def _key(value: Any) -> Any:
    """What a ``match`` value (or an event's value) is looked up as."""
    return _TRUE if value is True else _FALSE if value is False else value


def _show(value: Any) -> str:
    """A value as ``tocsin test`` shows it: JSON, ``missing`` for an absent field."""
    if value is _TRUE or value is _FALSE:
        value = value[1]
    return "missing" if value is None else to_json(value).decode()[:80]


def _any_of(values: Iterable[Any]) -> str:
    return " or ".join(sorted(_show(v) for v in values))


@dataclass(frozen=True, slots=True)
class Step:
    """One check of a rule against an event, as ``tocsin explain`` shows it.

    ``what`` names the check (``"source"``, ``"type"``, ``"match args.to"``, ``"when"``,
    ``"kind"``, ``"throttle"``); ``ok`` is False when it stops the rule; ``detail`` says why.
    """

    what: str
    ok: bool
    detail: str


@dataclass(eq=False)
class Rule:
    """A rule ready to evaluate: names resolved, paths split, templates compiled."""

    config: RuleConfig
    kind: RuleKind
    position: int
    actions: tuple[str, ...]
    sources: frozenset[str] | None
    types: frozenset[str] | None
    match: tuple[tuple[Path, frozenset[Any]], ...]
    group_by: tuple[Path, ...]
    when: Callable[..., Any] | None = None
    title: Callable[[Mapping[str, Any]], str] | None = None
    body: Callable[[Mapping[str, Any]], str] | None = None
    fingerprint: str = ""

    @property
    def name(self) -> str:
        return self.config.name

    def takes(self, event: Event) -> bool:
        """The event's source and type are among the rule's."""
        return (self.sources is None or event.source in self.sources) and (
            self.types is None or event.type in self.types
        )

    def match_results(self, data: Mapping[str, Any]) -> Iterable[tuple[str, str, Any, bool]]:
        """Each ``match`` key against ``data``: ``(path, wanted, actual value, holds)``.

        The slow, explaining twin of ``selects`` (which stays lean: it runs per event).
        """
        for path, values in self.match:
            value = get_path(data, path)
            holds = _hashable(value) and _key(value) in values
            yield ".".join(path), _any_of(values), value, holds

    def selects(self, event: Event) -> bool:
        """Source, type and every ``match`` key hold (``when`` is checked apart)."""
        if not self.takes(event):
            return False
        data = event.data
        for path, values in self.match:
            value = get_path(data, path)
            if value is True or value is False:
                value = _key(value)
            elif not _hashable(value):
                return False
            if value not in values:
                return False
        return True

    def group_key(self, event: Event) -> str:
        if not self.group_by:
            return ""
        values = [get_path(event.data, path) for path in self.group_by]
        return to_json(values).decode()


def compile_rules(config: Config, registry: Registry) -> list[Rule]:
    """The enabled rules of a loaded ``config``, ready for the engine."""
    all_actions = tuple(config.actions)
    rules: list[Rule] = []
    problems: list[Problem] = []
    with collector_paused():
        for position, entry in enumerate(config.rules):
            if not entry.config.enabled:
                continue
            try:
                kind = registry.rule_kind(entry.config.kind)(entry.config)
            except Exception as err:  # a rule kind plugin's bug, or its own refusal
                reason = f"{type(err).__name__}: {err}"  # Problem masks secrets when shown
                problems.append(
                    Problem(
                        entry.file,
                        f"{entry.where}: kind",
                        f"the {entry.config.kind} kind could not take this rule: {reason}",
                    )
                )
                continue
            rules.append(_compile(entry, position, kind, all_actions))
    if problems:
        raise ConfigError(problems)
    return rules


def _compile(entry: RuleEntry, position: int, kind: RuleKind, all_actions: tuple[str, ...]) -> Rule:
    cfg = entry.config
    match = tuple(
        (
            split_path(key),
            frozenset(_key(v) for v in (value if isinstance(value, list) else [value])),
        )
        for key, value in sorted(cfg.match.items())
    )
    return Rule(
        config=cfg,
        kind=kind,
        position=position,
        actions=tuple(cfg.actions) if cfg.actions is not None else all_actions,
        sources=frozenset(cfg.source) if cfg.source else None,
        types=frozenset(cfg.type) if cfg.type else None,
        match=match,
        group_by=tuple(split_path(p) for p in cfg.group_by),
        fingerprint=stable_id(cfg.model_dump_json()),
        **entry.compiled,
    )


class EventFilter:
    """Whether an event may fire any rule: the index's keys without its rules.

    ``RuleIndex`` is one; ``RuleIndex.filter()`` gives a small picklable copy that a
    source running in a process of its own applies before it hands events over.
    """

    def __init__(
        self,
        plain: Container[tuple[str | None, str | None]],
        paths: Sequence[tuple[Path, Container[Any]]],
    ) -> None:
        self._plain = plain
        self._paths = paths

    def may_fire(self, source: str, type: str, data: Mapping[str, Any]) -> bool:
        """Whether the index finds a rule for an event of ``source`` and ``type`` with
        ``data`` (``RuleIndex.candidates`` is not empty), stopping at the first: every
        event asks (before the intake, or a source before it builds the event), and only
        the few it finds are looked up in full. An event it fails on may fire: the
        engine's own path then logs and counts it."""
        plain = self._plain
        if plain and (
            (source, type) in plain
            or (source, None) in plain
            or (None, type) in plain
            or (None, None) in plain
        ):
            return True
        try:
            for path, bucket in self._paths:
                # get_path's answer, subscripting dicts directly first: half its cost, on
                # the path of every event (timeit: 0.18 against 0.32 us for "args.to").
                value: Any = data
                try:
                    for part in path:
                        value = value[part]
                except (KeyError, TypeError, IndexError):
                    value = get_path(data, path)
                if value is True or value is False:
                    value = _key(value)
                elif not _hashable(value):
                    continue
                if value in bucket:
                    return True
        except Exception:  # an odd event
            return True
        return False


class RuleIndex(EventFilter):
    """Finds the rules an event may fire, by hash lookups only."""

    _plain: dict[tuple[str | None, str | None], list[Rule]]
    _paths: list[tuple[Path, dict[Any, list[Rule]]]]

    def __init__(self, rules: Iterable[Rule]) -> None:
        rules = list(rules)
        self.rules = rules
        popularity = Counter((path, v) for r in rules for path, values in r.match for v in values)
        self._by_path: dict[Path, dict[Any, list[Rule]]] = {}
        self._plain = {}
        for rule in rules:
            if rule.match:
                path, values = min(
                    rule.match, key=lambda m: max(popularity[(m[0], v)] for v in m[1])
                )
                bucket = self._by_path.setdefault(path, {})
                for value in values:
                    bucket.setdefault(value, []).append(rule)
            else:
                for source in rule.sources or (None,):
                    for type_ in rule.types or (None,):
                        self._plain.setdefault((source, type_), []).append(rule)
        self._paths = list(self._by_path.items())

    def filter(self) -> EventFilter:
        """``may_fire`` without the rules, for a source's own process (``sourceproc``)."""
        return EventFilter(set(self._plain), [(path, set(b)) for path, b in self._paths])

    def candidates(self, event: Event) -> list[Rule]:
        """Rules that may fire for ``event``, in config order (not yet checked in full)."""
        found: list[Rule] = []
        plain = self._plain
        if plain:
            for key in (
                (event.source, event.type),
                (event.source, None),
                (None, event.type),
                (None, None),
            ):
                found.extend(plain.get(key, ()))
        data = event.data
        for path, bucket in self._paths:
            value = get_path(data, path)
            if value is True or value is False:
                found.extend(bucket.get(_key(value), ()))
            elif _hashable(value):
                found.extend(bucket.get(value, ()))
        if len(found) > 1:
            found.sort(key=lambda r: r.position)
        return found


@dataclass
class PendingAlert:
    """An alert the engine made, to be committed with its deliveries."""

    alert: Alert
    event_id: str
    group: str
    actions: tuple[str, ...]
    retracts: str | None = None  # the firing alert id a retraction answers


@dataclass
class EngineStats:
    """Plain counters of the engine, read by /metrics; a reload carries them over."""

    events: int = 0
    examined: int = 0
    matched: int = 0
    alerts: int = 0
    throttled: int = 0
    duplicates: int = 0
    when_errors: int = 0
    kind_errors: int = 0
    template_errors: int = 0
    event_errors: int = 0  # events the engine failed on as a whole (a bug; see the log)
    per_rule: Counter[str] = field(default_factory=Counter)  # events each rule matched
    evaluated: Counter[str] = field(default_factory=Counter)  # events each rule examined
    alerts_per_rule: Counter[str] = field(default_factory=Counter)
    alerts_per_status: Counter[str] = field(default_factory=Counter)
    last_fired: dict[str, float] = field(default_factory=dict)  # rule -> unix time

    def made(self, rule: str, status: str, at: float) -> None:
        """Count an alert made: one the state database took (``Engine.committed``)."""
        self.alerts += 1
        self.alerts_per_rule[rule] += 1
        self.alerts_per_status[status] += 1
        self.last_fired[rule] = at


def summary(event: Event, limit: int = 300) -> str:
    """A one-line summary of an event, the default alert body."""
    text = f"{event.type} from {event.source}: " + to_json(event.data).decode()
    return text if len(text) <= limit else text[: limit - 1] + "…"


class AnchoredClock:
    """Wall-clock seconds when created, then advancing with the monotonic clock.

    Saved times stay comparable across a restart, and a wall-clock jump while running
    (NTP, a suspended VM) neither stretches nor shrinks a throttle or a window.
    """

    def __init__(self) -> None:
        self._wall = time.time()
        self._mono = time.monotonic()

    def __call__(self) -> float:
        return self._wall + (time.monotonic() - self._mono)


StateWrite = tuple[str, str, str | None]  # (rule, key, value); None deletes the row


class Engine:
    """Evaluates events against the rules and makes alerts; pure CPU, no I/O.

    ``clock`` gives seconds for throttles and rule kinds (an ``AnchoredClock`` unless a
    test injects one); ``wall`` gives unix seconds for the alerts' ``fired_at``.
    """

    def __init__(
        self,
        rules: Iterable[Rule],
        clock: Callable[[], float] | None = None,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.index = RuleIndex(rules)
        self.rules = {r.name: r for r in self.index.rules}
        self.clock: Callable[[], float] = clock or AnchoredClock()
        self.wall = wall
        self.stats = EngineStats()
        self.generations: dict[tuple[str, str], int] = {}
        self._throttle: dict[tuple[str, str], float] = {}  # in the order of last alerts
        self.state_writes: list[StateWrite] = []  # throttles (and deletions) to persist
        self._recent = RecentIds(_RECENT_ALERTS)
        self._warned: set[tuple[str, str]] = set()
        self.ticking = [r for r in self.index.rules if type(r.kind).on_tick is not RuleKind.on_tick]
        self.stateful = {
            r for r in self.index.rules if type(r.kind).state_changes is not RuleKind.state_changes
        }
        self.discarding = [
            r for r in self.index.rules if type(r.kind).discard is not RuleKind.discard
        ]
        for rule in self.index.rules:
            rule.kind.wall = self._wall_now
        self._touched: set[Rule] = set()
        self.suppressed: dict[str, str] = {}  # rule -> why its last firing was not sent
        # (rule, group) of a throttled rule -> whether a firing of the group's current run
        # was sent, until the run resolves (its resolved is sent only if one was); at most
        # _RECENT_ALERTS, the oldest forgotten (then a resolved is sent, as before).
        self._told: dict[tuple[str, str], bool] = {}

    def adopt(self, old: Engine) -> None:
        """Keep the clock, and the state of rules unchanged since ``old`` (a reload)."""
        self.clock = old.clock
        self.stats = old.stats  # counters run on across reloads, as /metrics expects
        same = {
            n
            for n, r in self.rules.items()
            if n in old.rules and old.rules[n].fingerprint == r.fingerprint
        }
        self._throttle = {k: v for k, v in old._throttle.items() if k[0] in same}
        self._told = {k: v for k, v in old._told.items() if k[0] in same}
        self.generations = dict(old.generations)
        self._recent = old._recent
        self.state_writes = old.state_writes + self.state_writes
        for name in same:
            self.rules[name].kind = kind = old.rules[name].kind
            kind.wall = self._wall_now
        self._touched = {self.rules[r.name] for r in old._touched if r.name in same}
        for name, rule in old.rules.items():
            if name not in same:
                # What was saved of the old version (changed, removed or disabled) goes: a
                # reload back to it must not find it again at the next restart (the
                # fingerprint would match).
                self.state_writes.append((name, f"{FORGET}\x1f{rule.fingerprint}", None))
                if self.rules.get(name) in self.stateful:
                    log.info("rule %r changed: its windows and firing alerts start fresh", name)

    def restore(self, rows: Iterable[tuple[str, str, str]]) -> None:
        """Load persisted rule state (throttles, kinds' groups) of rules unchanged since."""
        now = self.clock()
        changed: set[str] = set()
        kept: set[str] = set()  # a reload changed a rule: rows of both versions are here
        for rule_name, key, value in rows:
            what, _, rest = key.partition("\x1f")
            fingerprint, _, group_key = rest.partition("\x1f")
            rule = self.rules.get(rule_name)
            if rule is None or rule.fingerprint != fingerprint:
                self.state_writes.append((rule_name, key, None))  # stale: forget it
                if rule is not None and what == "kind":
                    changed.add(rule_name)
                continue
            if what == "throttle":
                try:
                    last = float(value)
                except ValueError:
                    continue
                if rule.config.throttle is not None and 0 <= now - last < rule.config.throttle:
                    self._throttle[(rule_name, group_key)] = last
            elif what == "kind":
                kept.add(rule_name)
                try:
                    rule.kind.load_state(group_key, orjson.loads(value))
                except Exception as err:  # a plugin's bug, or a row it cannot read
                    self.stats.kind_errors += 1
                    self._error("kind", rule, err)
        # In the order of the groups' last alerts, as _expire_throttles expects.
        self._throttle = dict(sorted(self._throttle.items(), key=lambda item: item[1]))
        for name in sorted(changed - kept):
            log.info("rule %r changed since its state was saved: it starts fresh", name)

    def committed(self, alerts: Iterable[PendingAlert], skipped: Collection[str]) -> None:
        """Count the alerts the state database took; those it already had (``skipped``: a
        fact alerted before a restart, sent again by the provider) are duplicates."""
        now = self.wall()
        for pending in alerts:
            alert = pending.alert
            if alert.id in skipped:
                self.stats.duplicates += 1
            else:
                self.stats.made(alert.rule, alert.status, now)

    def take_state(self) -> list[StateWrite]:
        """Rule state to persist with the alerts made since the last call."""
        writes, self.state_writes = self.state_writes, []
        touched, self._touched = self._touched, set()
        for rule in touched:
            try:
                changes = rule.kind.state_changes()
            except Exception as err:
                self.stats.kind_errors += 1
                self._error("kind", rule, err)
                continue
            prefix = f"kind\x1f{rule.fingerprint}\x1f"
            for group_key, state in changes:
                # The state may carry an event (the one its alert carries): provider data.
                value = None if state is None else to_json(state).decode()
                writes.append((rule.name, prefix + group_key, value))
        return writes

    def wants(self, event: Event) -> bool:
        """Whether ``event`` must reach ``process``: a removal always (it may retract what
        any rule fired), any other event when the index finds a rule it may fire.

        An event no rule can fire on is counted as evaluated here, and the daemon drops it
        before its intake: ``process`` would find no candidate for it either.
        """
        return event.removed or self.may_fire(event.source, event.type, event.data)

    def may_fire(self, source: str, type: str, data: Mapping[str, Any]) -> bool:
        """Whether a rule may fire on an event of ``source`` and ``type`` with ``data``
        (not a removal); one no rule can fire on is counted as evaluated."""
        if self.index.may_fire(source, type, data):
            return True
        self.stats.events += 1
        return False

    def process(self, event: Event) -> list[PendingAlert]:
        """Alerts fired by one (non-removed) event."""
        self.stats.events += 1
        candidates = self.index.candidates(event)
        self.stats.examined += len(candidates)
        if not candidates:
            return []
        out: list[PendingAlert] = []
        context: dict[str, Any] | None = None
        evaluated = self.stats.evaluated
        for rule in candidates:
            evaluated[rule.name] += 1
            if not rule.selects(event):
                continue
            if rule.when is not None:
                if context is None:
                    context = self.context(event)
                try:
                    passed = bool(rule.when(context))
                except Exception as err:
                    self._error("when", rule, err)
                    continue
                if not passed:
                    continue
            self.stats.matched += 1
            self.stats.per_rule[rule.name] += 1
            group_key = rule.group_key(event)
            if rule in self.stateful:
                self._touched.add(rule)
            try:
                firings = rule.kind.on_event(event, group_key, self.clock())
            except Exception as err:  # a plugin's bug costs its rule this event, nothing more
                self.stats.kind_errors += 1
                self._error("kind", rule, err)
                self.suppressed[rule.name] = f"the kind failed: {type(err).__name__}: {err}"
                continue
            for firing in firings:
                pending = self.make_alert(rule, firing, group_key)
                if pending is not None:
                    out.append(pending)
        return out

    def _wall_now(self) -> float:
        return self.wall()  # read at each call: a test or tocsin test may swap self.wall

    def discard(self, event: Event) -> None:
        """The provider took back ``event`` (``removed``, with the fact's data): each rule
        that selects it and whose kind counts events (``RuleKind.discard``) forgets it."""
        if not self.discarding or not event.data:
            return
        candidates = set(self.index.candidates(event))
        context: dict[str, Any] | None = None
        now = self.clock()
        for rule in self.discarding:
            if rule.config.on_removed != "retract":  # "ignore": removals are not its business
                continue
            if rule not in candidates or not rule.selects(event):
                continue
            if rule.when is not None:
                if context is None:
                    context = self.context(event)
                passed, error = self._when(rule, context)
                if error is not None or not passed:
                    continue
            if rule in self.stateful:
                self._touched.add(rule)
            try:
                rule.kind.discard(event, rule.group_key(event), now)
            except Exception as err:
                self.stats.kind_errors += 1
                self._error("kind", rule, err)

    def wakes_at(self) -> float | None:
        """The earliest time a tick may fire something, as far as the kinds say (None:
        none says; see ``RuleKind.wakes_at``)."""
        times = []
        for rule in self.ticking:
            try:
                when = rule.kind.wakes_at()
            except Exception as err:
                self.stats.kind_errors += 1
                self._error("kind", rule, err)
                continue
            if when is not None:
                times.append(when)
        return min(times, default=None)

    def tick(self) -> list[PendingAlert]:
        """Alerts caused by time passing (stateful kinds)."""
        now = self.clock()
        out = []
        for rule in self.ticking:
            if rule in self.stateful:
                self._touched.add(rule)
            try:
                firings = rule.kind.on_tick(now)
            except Exception as err:
                self.stats.kind_errors += 1
                self._error("kind", rule, err)
                continue
            for firing in firings:
                pending = self.make_alert(rule, firing, rule.group_key(firing.event))
                if pending is not None:
                    out.append(pending)
        return out

    def explain(self, event: Event) -> list[tuple[str, str, str]]:
        """Why each rule taking this event's source and type did or did not match it.

        ``(rule, reason, state)``: ``reason`` is the first thing that failed (a ``match``
        key, ``when``), empty when the rule matched; ``state`` is the kind's account of the
        event's group (``"3 of 5 within 10m"``). For ``tocsin test``; no state changes.
        """
        out = []
        context: dict[str, Any] | None = None
        now = self.clock()
        for rule in self.index.rules:
            if not rule.takes(event):
                continue
            reason = ""
            for path, wanted, value, ok in rule.match_results(event.data):
                if not ok:
                    reason = f"match {path} is {_show(value)}, not {wanted}"
                    break
            if not reason and rule.when is not None:
                if context is None:
                    context = self.context(event)
                passed, error = self._when(rule, context)
                if error is not None:
                    reason = f"when failed: {type(error).__name__}: {error}"
                elif not passed:
                    reason = "when is false"
            state = ""
            if not reason:
                state = self._kind_state(rule, event, now)
            out.append((rule.name, reason, state))
        return out

    def trace(self, rule: Rule, event: Event) -> list[Step]:
        """Every check of ``rule`` on ``event``, in the engine's order; no state changes.

        Unlike ``process`` it goes on after a failing check, so each one is shown: source,
        type, each ``match`` key, ``when`` (its value or its error), the kind's state of the
        event's group before the event, and the throttle.
        """

        def among(field: str, value: str, allowed: frozenset[str] | None) -> Step:
            if allowed is None:
                return Step(field, True, f"any {field} (the event's: {_show(value)})")
            listed = _any_of(allowed)
            if value in allowed:
                return Step(field, True, f"{_show(value)} is {listed}")
            return Step(field, False, f"{_show(value)} is not {listed}")

        steps = [
            among("source", event.source, rule.sources),
            among("type", event.type, rule.types),
        ]
        for path, wanted, value, ok in rule.match_results(event.data):
            steps.append(Step(f"match {path}", ok, f"wanted {wanted}, got {_show(value)}"))
        if rule.when is None:
            steps.append(Step("when", True, "none"))
        else:
            passed, error = self._when(rule, self.context(event))
            expression = rule.config.when
            if error is not None:
                detail = f"{expression} failed: {type(error).__name__}: {error}"
                steps.append(Step("when", False, detail))
            else:
                steps.append(Step("when", bool(passed), f"{expression} is {_show(passed)}"))
        now = self.clock()
        group_key = rule.group_key(event)
        state = self._kind_state(rule, event, now)
        kind = rule.config.kind
        steps.append(Step("kind", True, f"{kind}: {state}" if state else kind))
        throttle = rule.config.throttle
        last = self._throttle.get((rule.name, group_key))
        if throttle is None:
            steps.append(Step("throttle", True, "none"))
        elif last is not None and now - last < throttle:
            detail = (
                f"throttled: the group's last alert was {format_duration(now - last)} ago,"
                f" one per {format_duration(throttle)}"
            )
            steps.append(Step("throttle", False, detail))
        else:
            steps.append(
                Step("throttle", True, f"not throttled (one alert per {format_duration(throttle)})")
            )
        return steps

    def _when(self, rule: Rule, context: dict[str, Any]) -> tuple[Any, Exception | None]:
        """``rule.when``'s value in ``context``, or the error it raised."""
        assert rule.when is not None
        try:
            return rule.when(context), None
        except Exception as err:
            return None, err

    def _kind_state(self, rule: Rule, event: Event, now: float) -> str:
        try:
            return rule.kind.explain(rule.group_key(event), now)
        except Exception as err:
            return f"the kind cannot explain: {type(err).__name__}"

    def context(self, event: Event) -> dict[str, Any]:
        """Names a rule's ``when``, ``title`` and ``body`` see: the data, and ``event``."""
        context = dict(event.data)
        context["event"] = event.envelope()
        return context

    def make_alert(self, rule: Rule, firing: Firing, group_key: str) -> PendingAlert | None:
        """Render, dedup and throttle one firing; None when it is not to be sent."""
        event = firing.event
        parts: tuple[Any, ...] = firing.id_parts
        generation = self.generations.get((rule.name, event.id), 0)
        if generation:
            parts = (*parts, generation)
        alert_id = stable_id(rule.name, *parts)
        if alert_id in self._recent:
            self.stats.duplicates += 1
            self.suppressed[rule.name] = "a duplicate of an alert already made"
            return None
        if firing.status == "resolved" and not self._told.pop((rule.name, group_key), True):
            # The end of a firing the throttle kept back: nobody was told it began.
            self.stats.throttled += 1
            self.suppressed[rule.name] = "the end of a firing the throttle kept back"
            return None
        if rule.config.throttle is not None and firing.status == "firing":
            now = self.clock()
            last = self._throttle.get((rule.name, group_key))
            if last is not None and now - last < rule.config.throttle:
                self.stats.throttled += 1
                self.suppressed[rule.name] = (
                    f"throttled (one alert per {format_duration(rule.config.throttle)} per group)"
                )
                self._tell(rule.name, group_key, sent=False)
                return None
            # Moved to the end: the table stays in the order of the groups' last alerts.
            self._throttle.pop((rule.name, group_key), None)
            self._throttle[(rule.name, group_key)] = now
            self.state_writes.append(
                (rule.name, f"throttle\x1f{rule.fingerprint}\x1f{group_key}", repr(now))
            )
            if len(self._throttle) > _RECENT_ALERTS:
                self._expire_throttles(now)
        self._recent.seen(alert_id)
        if firing.status == "firing" and rule.config.throttle is not None:
            self._tell(rule.name, group_key, sent=True)
        return PendingAlert(
            alert=self.render(rule, firing.status, event, alert_id),
            event_id=event.id,
            group=f"{rule.name}\x1f{group_key}",
            actions=rule.actions,
        )

    def _tell(self, rule: str, group_key: str, *, sent: bool) -> None:
        """A firing of a throttled rule's group was sent, or held back: the run counts as
        told once one of its firings was (a later held-back repeat does not undo it)."""
        if sent:
            self._told[(rule, group_key)] = True
        else:
            self._told.setdefault((rule, group_key), False)
        if len(self._told) > _RECENT_ALERTS:
            del self._told[next(iter(self._told))]  # the oldest

    def retraction(
        self, rule_name: str, firing_id: str, group: str, event: Event
    ) -> PendingAlert | None:
        """The ``retracted`` alert answering a sent firing whose fact the provider took back."""
        rule = self.rules.get(rule_name)
        if rule is None or rule.config.on_removed != "retract":
            return None
        _, _, group_key = group.partition("\x1f")
        try:
            rule.kind.on_removed(event, group_key, self.clock())
        except Exception:
            log.exception("rule %r: the %s kind failed on a removal", rule_name, rule.config.kind)
        key = (rule_name, event.id)
        self.generations[key] = self.generations.get(key, 0) + 1
        alert_id = stable_id(rule_name, firing_id, "retracted")
        self._recent.seen(alert_id)
        return PendingAlert(
            alert=self.render(rule, "retracted", event, alert_id),
            event_id=event.id,
            group=group,
            actions=rule.actions,
            retracts=firing_id,
        )

    def render(self, rule: Rule, status: str, event: Event, alert_id: str) -> Alert:
        # The event's data comes first, as in ``when`` (a ckex or eWallet event has a
        # ``status`` of its own); the alert's status, rule and id fill in the names the data
        # leaves free: ``status``, ``rule``, and ``alert`` holding all three.
        context = self.context(event)
        context.setdefault("status", status)
        context.setdefault("rule", rule.name)
        context.setdefault("alert", {"status": status, "rule": rule.name, "id": alert_id})
        title = self._render(rule, "title", context) or rule.name
        body = self._render(rule, "body", context) or summary(event)
        if status != "firing":
            title = f"[{status}] {title}"
        return Alert(
            id=alert_id,
            status=status,
            rule=rule.name,
            title=title,
            body=body,
            fired_at=utc_iso(self.wall()),
            event=event.envelope(),
        )

    def _render(self, rule: Rule, key: str, context: dict[str, Any]) -> str:
        template = getattr(rule, key)
        if template is None:
            return ""
        try:
            return str(template(context)).strip()
        except Exception as err:
            self.stats.template_errors += 1
            self._error(key, rule, err)
            return f"({key} could not be rendered: {type(err).__name__})"

    def _error(self, what: str, rule: Rule, err: Exception) -> None:
        if what == "when":
            self.stats.when_errors += 1
        level = logging.DEBUG if (rule.name, what) in self._warned else logging.WARNING
        self._warned.add((rule.name, what))
        log.log(level, "rule %r: %s failed: %s: %s", rule.name, what, type(err).__name__, err)

    def _expire_throttles(self, now: float) -> None:
        """Forget the throttles that have run out; if that is not enough, the oldest too.

        Bounded memory, and amortized work: the table is brought down to three quarters
        of ``_RECENT_ALERTS``, so the next pass comes a quarter of it later (before, with
        every group still throttled, each alert walked the whole table).
        """
        for key, last in list(self._throttle.items()):
            rule = self.rules.get(key[0])
            if rule is None or rule.config.throttle is None or now - last >= rule.config.throttle:
                del self._throttle[key]
        excess = len(self._throttle) - _RECENT_ALERTS * 3 // 4
        if excess <= 0:
            return
        if ("", "throttles") not in self._warned:  # once, as the rules' own failures
            self._warned.add(("", "throttles"))
            log.warning(
                "more than %d groups are throttled at once: the %d that alerted longest ago"
                " are forgotten, and may alert again before their throttle ends; check the"
                " rules' group_by",
                _RECENT_ALERTS,
                excess,
            )
        for key in list(itertools.islice(self._throttle, excess)):  # the oldest first
            del self._throttle[key]
