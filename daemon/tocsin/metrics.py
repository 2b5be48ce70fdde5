"""Prometheus metrics of a running daemon, read at scrape time from its plain counters.

Nothing here runs per event: sources, the engine and the dispatcher count with plain int
and dict increments (``SourceRunner.types``, ``EngineStats``, ``Dispatcher.outcomes``), and
``DaemonCollector.collect()`` turns those into metric families when ``/metrics`` is scraped,
on a ``CollectorRegistry`` of the daemon's own (never prometheus-client's global one).

``collect()`` is synchronous, so what needs the state database (the outbox depth) is
probed by the HTTP handler just before (``OutboxProbe``), at most once per ``FRESH``
seconds and without waiting on a stuck database for longer than ``ANSWER_WITHIN``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from collections import deque
from collections.abc import Iterator
from typing import TYPE_CHECKING, TypeVar

import anyio
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from . import __version__
from .fields import secret_registry
from .store import Store

if TYPE_CHECKING:
    from .daemon import Daemon

T = TypeVar("T")

SOURCE_STATES = ("starting", "up", "down", "stale")
REJECT_REASONS = 20
"""Rejection reasons shown per source (the most frequent); the rest count as ``other``."""
OUTCOMES = {"delivered": "delivered", "retry": "retried", "dead": "dead"}


def answer(future: concurrent.futures.Future[T]) -> asyncio.Future[T]:
    """An awaitable for a store operation whose error is read even if nobody waits any
    more (asyncio would log it as never retrieved)."""
    wrapped = asyncio.wrap_future(future)
    wrapped.add_done_callback(lambda done: done.cancelled() or done.exception())
    return wrapped


class OutboxProbe:
    """The outbox depth (``Store.depth``) as the daemon last counted it, refreshed on demand.

    The daemon's ``outbox`` attribute holds the count (its notify loop refreshes it too);
    ``error`` says why the last probe failed or did not answer, ``""`` when it did.
    """

    FRESH = 2.0
    ANSWER_WITHIN = 1.0

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.error = ""
        self._at = float("-inf")
        self._pending: asyncio.Future[tuple[int, int, float | None]] | None = None
        self._submitted = 0.0

    async def refresh(self) -> None:
        """Count the outbox again unless the count is fresh; one query in flight at most."""
        if time.monotonic() - self._at < self.FRESH:
            return
        if self._pending is None:
            self._pending = answer(self.daemon.store.submit(Store.depth))
            self._submitted = time.monotonic()
        pending = self._pending
        with anyio.move_on_after(self.ANSWER_WITHIN):
            await asyncio.wait([pending])  # never cancels the query: a later call reads it
        if not pending.done():
            waited = time.monotonic() - self._submitted
            self.error = f"the state database has not answered for {waited:.1f}s"
            return
        self._pending = None
        self._at = time.monotonic()
        try:
            self.daemon.outbox = pending.result()
            self.error = ""
        except Exception as err:  # a StateError (disk full, locked): reported, not raised
            self.error = secret_registry.scrub(str(err))


class LoopLag:
    """How late the event loop wakes a task that sleeps ``INTERVAL``: its last and worst
    oversleep over the last minute (a blocked loop shows here first)."""

    INTERVAL = 0.25

    def __init__(self, window: float = 60.0) -> None:
        self.last = 0.0
        self._recent: deque[float] = deque(maxlen=int(window / self.INTERVAL))

    @property
    def worst(self) -> float:
        return max(self._recent, default=0.0)

    async def run(self) -> None:
        while True:
            start = time.monotonic()
            await anyio.sleep(self.INTERVAL)
            self.last = max(0.0, time.monotonic() - start - self.INTERVAL)
            self._recent.append(self.last)


def _rejections(rejected: dict[str, int]) -> Iterator[tuple[str, int]]:
    """The most frequent reasons, scrubbed and cut short, and ``other`` for the rest: a
    reason may carry a parser's message, and labels must stay few."""
    ranked = sorted(rejected.items(), key=lambda item: -item[1])
    for reason, n in ranked[:REJECT_REASONS]:
        yield secret_registry.scrub(reason)[:120], n
    rest = sum(n for _, n in ranked[REJECT_REASONS:])
    if rest:
        yield "other", rest


class DaemonCollector(Collector):
    """One collector for everything: reads the daemon's counters when scraped (only while
    the daemon runs: its store and dispatcher exist)."""

    def __init__(self, daemon: Daemon, lag: LoopLag) -> None:
        self.daemon = daemon
        self.lag = lag

    def collect(self) -> Iterator[Metric]:
        yield from self._process()
        yield from self._sources()
        yield from self._rules()
        yield from self._delivery()

    def _process(self) -> Iterator[Metric]:
        daemon = self.daemon
        info = GaugeMetricFamily("tocsin_build_info", "tocsin's version", labels=["version"])
        info.add_metric([__version__], 1)
        yield info
        yield GaugeMetricFamily(
            "tocsin_ready",
            "1 once the state is open and the sources are started, while intake is not"
            " paused and until stopping",
            value=int(daemon.ready.is_set() and not daemon.stopping and not daemon.paused),
        )
        yield GaugeMetricFamily(
            "tocsin_intake_waiting",
            "Events and cursors received but not yet taken by the engine",
            value=daemon.intake_waiting,
        )
        yield GaugeMetricFamily(
            "tocsin_state_paused",
            "1 while intake is paused because the state database refuses writes (disk full)",
            value=int(bool(daemon.paused)),
        )
        yield CounterMetricFamily(
            "tocsin_state_write_failures_total",
            "Transactions of the state database that failed (disk full, I/O error, locked)",
            value=daemon.store.failures,
        )
        yield GaugeMetricFamily(
            "tocsin_event_loop_lag_seconds",
            f"How late the event loop last woke a task sleeping {LoopLag.INTERVAL}s",
            value=self.lag.last,
        )
        yield GaugeMetricFamily(
            "tocsin_event_loop_lag_max_seconds",
            "The worst event loop lag over the last minute",
            value=self.lag.worst,
        )

    def _sources(self) -> Iterator[Metric]:
        events = CounterMetricFamily(
            "tocsin_events_total", "Events received, per source and type", labels=["source", "type"]
        )
        rejected = CounterMetricFamily(
            "tocsin_frames_rejected_total",
            "Provider frames a source could not use, per reason",
            labels=["source", "reason"],
        )
        reconnects = CounterMetricFamily(
            "tocsin_reconnects_total",
            "Times a source came back up after being down or stale",
            labels=["source"],
        )
        up = GaugeMetricFamily(
            "tocsin_source_up", "1 while a source is connected", labels=["source"]
        )
        state = GaugeMetricFamily(
            "tocsin_source_state", "1 for the state a source is in", labels=["source", "state"]
        )
        last = GaugeMetricFamily(
            "tocsin_source_last_event_timestamp_seconds",
            "When a source last emitted an event (unix time)",
            labels=["source"],
        )
        for name, runner in list(self.daemon.sources.items()):
            for type_, n in list(runner.types.items()):
                events.add_metric([name, type_], n)
            for reason, n in _rejections(dict(runner.rejected)):
                rejected.add_metric([name, reason], n)
            reconnects.add_metric([name], runner.reconnects)
            up.add_metric([name], int(runner.state == "up"))
            for candidate in SOURCE_STATES:
                state.add_metric([name, candidate], int(runner.state == candidate))
            if runner.last_event is not None:
                last.add_metric([name], runner.last_event)
        yield from (events, rejected, reconnects, up, state, last)

    def _rules(self) -> Iterator[Metric]:
        engine = self.daemon.engine
        stats = engine.stats
        evaluations = CounterMetricFamily(
            "tocsin_rule_evaluations_total",
            "Events a rule was checked against (found by the index)",
            labels=["rule"],
        )
        matches = CounterMetricFamily(
            "tocsin_rule_matches_total",
            "Events that matched a rule (match and when held)",
            labels=["rule"],
        )
        made = CounterMetricFamily(
            "tocsin_rule_alerts_total", "Alerts a rule made", labels=["rule"]
        )
        fired = GaugeMetricFamily(
            "tocsin_rule_last_fired_timestamp_seconds",
            "When a rule last made an alert (unix time)",
            labels=["rule"],
        )
        for name in list(engine.rules):
            evaluations.add_metric([name], stats.evaluated[name])
            matches.add_metric([name], stats.per_rule[name])
            made.add_metric([name], stats.alerts_per_rule[name])
            if name in stats.last_fired:
                fired.add_metric([name], stats.last_fired[name])
        alerts = CounterMetricFamily(
            "tocsin_alerts_total", "Alerts made, per status", labels=["status"]
        )
        for status in sorted({"firing", "resolved", "retracted", *stats.alerts_per_status}):
            alerts.add_metric([status], stats.alerts_per_status[status])
        suppressed = CounterMetricFamily(
            "tocsin_alerts_suppressed_total",
            "Alerts not made: throttled, or a duplicate of one already made",
            labels=["reason"],
        )
        suppressed.add_metric(["throttled"], stats.throttled)
        suppressed.add_metric(["duplicate"], stats.duplicates)
        errors = CounterMetricFamily(
            "tocsin_rule_errors_total",
            "Failures of a rule's when, title/body template or kind, or of a whole event",
            labels=["part"],
        )
        errors.add_metric(["when"], stats.when_errors)
        errors.add_metric(["template"], stats.template_errors)
        errors.add_metric(["kind"], stats.kind_errors)
        errors.add_metric(["event"], stats.event_errors)
        yield from (evaluations, matches, made, fired, alerts, suppressed, errors)

    def _delivery(self) -> Iterator[Metric]:
        daemon = self.daemon
        deliveries = CounterMetricFamily(
            "tocsin_deliveries_total",
            "Delivery tries per action and outcome (delivered, retried, dead)",
            labels=["action", "outcome"],
        )
        dispatcher = daemon.dispatcher
        outcomes = dict(dispatcher.outcomes)
        for action in sorted({*daemon.actions, *(a for a, _ in outcomes)}):
            for key, outcome in OUTCOMES.items():
                deliveries.add_metric([action, outcome], outcomes.get((action, key), 0))
        yield deliveries
        yield GaugeMetricFamily(
            "tocsin_deliveries_in_flight",
            "Deliveries being tried now",
            value=dispatcher.inflight,
        )
        if daemon.outbox is not None:
            pending, dead, oldest = daemon.outbox
            yield GaugeMetricFamily(
                "tocsin_outbox_pending", "Deliveries waiting in the outbox", value=pending
            )
            yield GaugeMetricFamily(
                "tocsin_outbox_dead", "Dead-lettered deliveries (tocsin outbox)", value=dead
            )
            yield GaugeMetricFamily(
                "tocsin_outbox_oldest_pending_age_seconds",
                "Age of the oldest waiting delivery (0 when none waits)",
                value=max(0.0, time.time() - oldest) if oldest is not None else 0.0,
            )


def make_registry(daemon: Daemon, lag: LoopLag) -> CollectorRegistry:
    """A registry of the daemon's own, holding its one collector."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(DaemonCollector(daemon, lag))
    return registry
