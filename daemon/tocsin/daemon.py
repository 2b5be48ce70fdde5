"""The running daemon: one supervisor over sources, the rule engine, the outbox workers.

Events flow from sources through one bounded memory stream into the engine loop (a
source may hand over the events of one read as a list: one item, bounded by its events),
which evaluates them in batches, commits the alerts (and any source cursors that follow them)
in one transaction, and wakes the action workers. ``stop()`` stops intake, drains what
was received, lets in-flight deliveries finish within ``drain_timeout``, and returns;
what is not delivered stays in the outbox for the next start.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import gc
import logging
import subprocess
import time
from collections import Counter, deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import anyio
from anyio.abc import TaskGroup, TaskStatus
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from .action import Action, ActionConfig, Target
from .config import Config, load_config
from .dispatcher import Dispatcher, Lane
from .errors import ConfigError, PluginError, StateError
from .events import Event, stable_id, utc_iso
from .fields import format_duration, secret_registry
from .notify import Notifier, Progress, Watchdog
from .plugins import Registry
from .rules import Engine, PendingAlert, compile_rules
from .source import Backoff, EventFactory, Source, SourceConfig, keep_running
from .sourceproc import ChildProcess, end, importable, spawn
from .store import NewAlert, Store

if TYPE_CHECKING:
    from .http import HTTPEndpoint

log = logging.getLogger(__name__)

BATCH = 512
ALERTS_PER_COMMIT = 256
"""A batch's alerts are committed at most this many at a time."""
INLINE_ALERTS = 16
INLINE_STATE = 64 * 1024
"""A commit of at most INLINE_ALERTS alerts and rule-state writes, the writes of at most
INLINE_STATE characters, goes on the event loop's thread (``Store.run``)."""
SOURCE_START_WAIT = 5.0
PURGE_EVERY = 600.0
STATUS_EVERY = 5.0
"""Under systemd, ``STATUS=`` is refreshed this often (and at each watchdog ping)."""
HEALTHY = 60.0
"""Seconds a connection stays up before its outage is over (as ``Backoff`` resets)."""
RESTART_KEYS = (
    "state_dir",
    "fsync",
    "queue_size",
    "http",
    "http_allow_remote",
    "source_processes",
)
"""``[daemon]`` keys a reload does not apply (it says so); the others apply at once."""


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """A source cursor to save once every event before it is committed."""

    source: str
    key: str
    value: str


Intake = Event | Checkpoint | list[Event]
"""An item of the intake stream: an event, a cursor, or the events of ``emit_many``."""


class _Started:
    """A TaskStatus that records the source said it is up, without blocking anything."""

    def __init__(self) -> None:
        self.event = anyio.Event()

    def started(self, value: object = None) -> None:
        self.event.set()


class SourceRunner(EventFactory):
    """Runs one source and is its ``SourceContext``: emits, tracks state, counts."""

    def __init__(self, daemon: Daemon, name: str, config: SourceConfig, cls: type[Source]) -> None:
        self.daemon = daemon
        self.source = name
        self.provider = cls.name
        self.config = config
        self.cls = cls
        self.logger = logging.getLogger(f"tocsin.source.{name}")
        self.state = "starting"
        self.since = utc_iso()
        self.last_event: float | None = None
        self.events = 0
        self.types: Counter[str] = Counter()  # events emitted per type, for /metrics
        self.rejected: Counter[str] = Counter()
        self.reconnects = 0
        self.scope: anyio.CancelScope | None = None
        self.child: ChildProcess | None = None  # the source's own process, if it has one
        self.spare: subprocess.Popen[bytes] | None = None  # that process, spawned early
        self._down_reason = ""
        # The outage being logged (SPEC section 3: a warning when it starts or its reason
        # changes, then debug). It ends once a connection has stayed up for HEALTHY
        # seconds, not at every reconnect: a server that accepts and then falls silent
        # would otherwise log a warning per retry.
        self._outage = ""
        self._gap_logged = False
        self._up_at: float | None = None

    # -- SourceContext -------------------------------------------------------------------

    # An event no rule can fire on (the engine's index finds no candidate) is counted and
    # goes no further: the intake, the engine's batches and its loop cost about 2 us of CPU
    # per event for nothing (paired runs with 1% matching: 24.6 -> 22.4 us). It is judged
    # by the rules in force when it arrives; at a reload, the events already in the intake
    # go to the new engine.

    async def emit(self, event: Event) -> None:
        self.events += 1
        self.types[event.type] += 1
        self.last_event = time.time()
        if self.daemon.engine.wants(event):
            await self.daemon.intake(event)

    async def emit_many(self, events: Iterable[Event]) -> None:
        batch = list(events)  # the source may reuse its list
        if not batch:
            return
        self.events += len(batch)
        self.types.update(event.type for event in batch)
        self.last_event = time.time()
        wants = self.daemon.engine.wants
        batch = [event for event in batch if wants(event)]
        if batch:
            await self.daemon.intake_many(batch)

    def sift(self, type: str, data: dict[str, Any]) -> bool:
        if self.daemon.engine.may_fire(self.source, type, data):
            return True
        self.events += 1
        self.types[type] += 1
        self.last_event = time.time()
        return False

    async def _status(self, state: str, type_: str, reason: str, **extra: str) -> None:
        since = self.since if state == self.state else utc_iso()
        self.state, self.since = state, since
        data = {"source": self.source, "reason": reason, "since": since, **extra}
        self.types[type_] += 1
        await self.daemon.intake(
            self.event(type_, data, id=stable_id(self.source, type_, since, *extra.values()))
        )

    async def up(self) -> None:
        self._down_reason = ""
        self._up_at = time.monotonic()
        if self.state != "up":
            if self.state in ("down", "stale"):
                self.reconnects += 1
            await self._status("up", "source.up", "connected")

    def _outage_ended(self) -> None:
        """Forget the outage once a connection has stayed up for ``HEALTHY`` seconds."""
        if self._up_at is not None and time.monotonic() - self._up_at >= HEALTHY:
            self._outage, self._gap_logged = "", False

    def _failing(self, reason: str) -> int:
        """The level to log a failure at: warning when an outage starts or its reason
        changes, then debug, so a day-long outage is a few lines, not one per retry."""
        self._outage_ended()
        self._up_at = None
        level = logging.WARNING if reason != self._outage else logging.DEBUG
        self._outage = reason
        return level

    async def down(self, reason: str) -> None:
        self._down_reason = reason
        self.logger.log(self._failing(reason), "source %r is down: %s", self.source, reason)
        if self.state != "down":
            await self._status("down", "source.down", reason)

    async def stale(self, reason: str) -> None:
        if self.state != "stale":
            level = self._failing(f"stale: {reason}")
            self.logger.log(level, "source %r is stale: %s", self.source, reason)
            await self._status("stale", "source.stale", reason)

    async def gap(
        self,
        reason: str,
        since: str,
        until: str = "",
        *,
        detail: Mapping[str, str | int] | None = None,
    ) -> None:
        extra = dict(detail or {})
        data: dict[str, Any] = {
            **extra,
            "source": self.source,
            "reason": reason,
            "since": since,
            "until": until or utc_iso(),
        }
        # Once per outage at warning: a source reconnecting again and again reports a
        # gap each time (the rules get every one), the log only the first.
        self._outage_ended()
        level = logging.DEBUG if self._outage and self._gap_logged else logging.WARNING
        self._gap_logged = bool(self._outage)
        self.logger.log(level, "source %r: events may be missing: %s", self.source, reason)
        key = stable_id(self.source, "gap", since, data["until"], *map(str, extra.values()))
        self.types["source.gap"] += 1
        await self.daemon.intake(self.event("source.gap", data, id=key))

    @property
    def down_reason(self) -> str:
        """Why the source is down (its last ``down()``), ``""`` while it is up."""
        return self._down_reason

    def carry_counts(self, old: SourceRunner) -> None:
        """Go on counting from ``old``, the runner this one replaces (a reload changed it)."""
        self.events += old.events
        self.types.update(old.types)
        self.rejected.update(old.rejected)
        self.reconnects += old.reconnects

    def reject(self, reason: str) -> None:
        self.rejected[reason] += 1
        level = logging.WARNING if self.rejected[reason] == 1 else logging.DEBUG
        self.logger.log(level, "source %r: frame rejected: %s", self.source, reason)

    def received(self, frame: str | bytes) -> None:
        pass  # only ``tocsin record`` keeps raw frames

    async def load_cursor(self, key: str) -> str | None:
        return await self.daemon.store.call(Store.get_cursor, self.source, key)

    async def save_cursor(self, key: str, value: str) -> None:
        await self.daemon.intake(Checkpoint(self.source, key, value))

    # -- supervision ---------------------------------------------------------------------

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Run the source until cancelled; a crash is logged and restarted with backoff."""
        backoff = Backoff(maximum=self.config.max_backoff)
        with anyio.CancelScope() as self.scope:
            async with anyio.create_task_group() as tg:
                first = _Started()
                tg.start_soon(self._keep_running, backoff, first)
                with anyio.move_on_after(SOURCE_START_WAIT):
                    await first.event.wait()
                task_status.started()

    async def _keep_running(self, backoff: Backoff, first: _Started) -> None:
        if self.daemon.runs_apart(self.cls):
            self.child = ChildProcess(self, self.spare)
            self.spare = None
            await self.child.run(first)
        else:
            await keep_running(self.cls, self.config, self, backoff, first)


class Daemon:
    """The daemon for one config file. ``await run()`` until ``stop()``."""

    def __init__(
        self,
        config_path: str,
        registry: Registry,
        *,
        environ: Mapping[str, str] | None = None,
        notifier: Notifier | None = None,
    ) -> None:
        self.config_path = config_path
        self.registry = registry
        self.environ = environ
        self.notifier = notifier or Notifier("")
        self.config: Config = load_config(config_path, registry, environ)
        # As started (a restart key): a reload that changes it leaves every source as is.
        self.source_processes = self.config.daemon.source_processes
        # Sources in processes of their own start now: their start-up overlaps compiling.
        self._spares = self._spawn_sources()
        try:
            self.engine = Engine(compile_rules(self.config, registry))
        except BaseException:
            self._end_spares()
            raise
        self.store: Store = None  # type: ignore[assignment]  # opened by run()
        self.dispatcher: Dispatcher = None  # type: ignore[assignment]
        self.sources: dict[str, SourceRunner] = {}
        self._replaced: dict[str, SourceRunner] = {}  # by a reload: their counts carry over
        self.actions: dict[str, Action] = {}
        self._action_scopes: dict[str, anyio.CancelScope] = {}
        self.ready = anyio.Event()
        self.stopped = anyio.Event()
        self._stop = anyio.Event()
        self._engine_done = anyio.Event()
        self._tg: TaskGroup | None = None
        self._send: MemoryObjectSendStream[Intake] | None = None
        # The intake's bound is in events and cursors, not in stream items (a list of
        # events is one item): how many wait, and the sources waiting for room, first
        # come first served (each with how many it brings, and the event that says go).
        self._limit = self.config.daemon.queue_size  # as the stream was made (not reloaded)
        self._waiting = 0
        self._waiters: deque[tuple[int, anyio.Event]] = deque()
        self._closed = False  # intake is over: waiting sources give up
        self._line_empty: anyio.Event | None = None  # set when the last waiting source left
        self._carry: list[Event] = []  # the rest of a list a batch had no room for
        self._full_waits: set[anyio.CancelScope] = set()  # sources waiting on a full intake
        self._committing = anyio.Lock(fast_acquire=True)  # no yield when nobody else holds it
        self.paused = ""
        # For STATUS= and the watchdog (notify.py): events and cursors the engine took off the
        # intake, when the batch it works on was received, the outbox as last counted.
        self.taken = 0
        self.busy = False  # the engine holds a batch it has not finished
        self.batch_received = 0.0
        self.outbox: tuple[int, int, float | None] | None = None
        self._reload_note = ""
        address = self.config.daemon.http_address()
        self.http: HTTPEndpoint | None = None
        if address is not None:
            # Imported only when configured: aiohttp's web server takes 0.18 s to import,
            # a tenth of the start-up with 10,000 rules (make bench).
            from .http import HTTPEndpoint

            self.http = HTTPEndpoint(self, *address)

    # -- intake --------------------------------------------------------------------------

    async def intake(self, item: Event | Checkpoint) -> None:
        """Hand an event or a cursor to the engine; waits while the intake is full."""
        await self._hand_over(item, 1)

    async def intake_many(self, events: list[Event]) -> None:
        """Hand events to the engine as one item (in slices of at most ``queue_size``)."""
        limit = self._limit
        if len(events) <= limit:
            await self._hand_over(events, len(events))
            return
        for start in range(0, len(events), limit):
            piece = events[start : start + limit]
            if not await self._hand_over(piece, len(piece)):
                return  # intake is over (stopping): the rest goes nowhere either

    async def _hand_over(self, item: Intake, count: int) -> bool:
        """Put ``item`` (``count`` events and cursors) in the intake, waiting for room
        behind any source that already waits; False if intake is over."""
        send = self._send
        if send is None or self._closed:
            return False
        if not self._waiters and self._waiting + count <= self._limit:
            # While there is room, hand the item over without a checkpoint: the source
            # yields at its next read anyway, and anyio's checkpoint in send() was a tenth
            # of the event loop's time per event (make bench). The stream never refuses
            # it for room: it holds fewer items than events.
            try:
                send.send_nowait(item)
            except (anyio.ClosedResourceError, anyio.BrokenResourceError):
                return False  # closed while stopping: intake is over
            self._waiting += count
            return True
        return await self._intake_full(send, item, count)

    async def _intake_full(
        self, send: MemoryObjectSendStream[Intake], item: Intake, count: int
    ) -> bool:
        # The source waits its turn (bounded intake, first come first served: a large
        # hand-over is not overtaken for ever by a busy neighbour's small ones). Shielded,
        # so a source's own timeout (stale, ack) never drops an event it has handed over;
        # the daemon ends these waits itself when it stops.
        go = anyio.Event()
        turn = (count, go)
        self._waiters.append(turn)
        handed = False
        with anyio.CancelScope(shield=True) as waiting:
            self._full_waits.add(waiting)
            try:
                self._wake()
                await go.wait()
                if not self._closed:
                    send.send_nowait(item)
                    self._waiting += count
                    handed = True
            except (anyio.ClosedResourceError, anyio.BrokenResourceError):
                pass
            finally:
                self._full_waits.discard(waiting)
                self._waiters.remove(turn)
                self._wake()  # the next in line, if it fits now
                if not self._waiters and self._line_empty is not None:
                    self._line_empty.set()
                    self._line_empty = None
        return handed

    def _wake(self) -> None:
        """Let the first waiting source in if its items fit (all of them once closed)."""
        if self._closed:
            for _, go in self._waiters:
                go.set()
        elif self._waiters:
            count, go = self._waiters[0]
            if self._waiting + count <= self._limit:
                go.set()

    def _close_intake(self) -> None:
        """Intake is over: sources waiting for room give up (what they hold is dropped,
        as what the provider has not sent yet)."""
        self._closed = True
        self._wake()

    async def _engine_loop(self, receive: MemoryObjectReceiveStream[Intake]) -> None:
        try:
            await self._evaluate(receive)
        finally:
            self._engine_done.set()

    async def _evaluate(self, receive: MemoryObjectReceiveStream[Intake]) -> None:
        async with receive:
            while True:
                if self._carry:
                    item: Intake = self._carry
                    self._carry = []
                else:
                    try:
                        item = await receive.receive()
                    except anyio.EndOfStream:
                        return
                batch: list[Event | Checkpoint] = []
                while True:
                    if isinstance(item, list):
                        room = BATCH - len(batch)
                        if len(item) > room:
                            # At most BATCH in hand: the rest stays counted in the intake,
                            # so what is held in memory stays within queue_size + BATCH.
                            batch += item[:room]
                            self._carry = item[room:]
                            break
                        batch += item
                    else:
                        batch.append(item)
                    if len(batch) >= BATCH:
                        break
                    try:
                        item = receive.receive_nowait()
                    except (anyio.WouldBlock, anyio.EndOfStream):
                        break
                self._took(batch)
                self.busy = True
                await self._process(batch)
                self.busy = False

    def _took(self, batch: list[Event | Checkpoint]) -> None:
        """The engine took ``batch`` off the intake: room for more."""
        self._waiting -= len(batch)
        self.taken += len(batch)
        if self._waiters:
            self._wake()
        first = next((item for item in batch if isinstance(item, Event)), None)
        self.batch_received = first.received if first is not None else time.time()

    async def _process(self, batch: list[Event | Checkpoint]) -> None:
        alerts: list[PendingAlert] = []
        cursors: list[tuple[str, str, str]] = []
        for item in batch:
            if isinstance(item, Checkpoint):
                cursors.append((item.source, item.key, item.value))
            elif item.removed:
                await self._commit(alerts, cursors)  # a retraction must see what came before
                alerts, cursors = [], []
                await self._commit(await self._retractions(item), [])
            else:
                try:
                    alerts.extend(self.engine.process(item))
                except Exception:  # a bug on an odd event costs that event, not the daemon
                    self.engine.stats.event_errors += 1
                    log.exception(
                        "event %s of source %r could not be evaluated", item.id, item.source
                    )
                if len(alerts) >= ALERTS_PER_COMMIT:
                    # Many rules firing on every event: commit as they come (each commit
                    # lets the event loop serve deliveries and /metrics), in bounded memory.
                    await self._commit(alerts, cursors)
                    alerts, cursors = [], []
        await self._commit(alerts, cursors)

    async def _retractions(self, event: Event) -> list[PendingAlert]:
        fired = await self.store.call(Store.firing_alerts_for, event.id)
        if fired and not event.data:
            # A source that no longer holds the fact (a rollback found after a restart)
            # retracts it by id: the retraction carries the fact's data, as SPEC says.
            data = await self.store.call(Store.fact_data, event.id)
            if data is not None:
                event = dataclasses.replace(event, data=data)
        self.engine.discard(event)  # counted by a threshold, fired or not: no longer
        out = []
        for alert_id, rule, group in fired:
            pending = self.engine.retraction(rule, alert_id, group, event)
            if pending is not None:
                out.append(pending)
        return out

    async def _commit(
        self, alerts: list[PendingAlert], cursors: list[tuple[str, str, str]]
    ) -> None:
        # One commit at a time (the engine's and the ticker's), in the order their state
        # was taken: a commit that must wait for the disk is not overtaken by a later one,
        # whose newer rule state the older would then overwrite.
        async with self._committing:
            state = self.engine.take_state()
            if not alerts and not cursors and not state:
                return
            rows = [self._new_alert(p) for p in alerts]
            # A few alerts and a little rule state are committed on the event loop's thread
            # (Store.run); a burst (up to 256 alerts, 150-220 us each; windows of
            # thousands of points) in the writer, not to hold the loop up.
            small = len(rows) <= INLINE_ALERTS and len(state) <= INLINE_ALERTS
            if small and sum(len(value or "") for _, _, value in state) > INLINE_STATE:
                small = False
            commit = self.store.run if small else self.store.call
            delay = 0.1
            while True:
                skipped: list[str] = []
                try:
                    ready = await commit(Store.commit_alerts, rows, cursors, state, skipped)
                    break
                except StateError as err:
                    # Intake pauses (the stream fills, sources wait) until the disk takes it.
                    self.paused = str(err)
                    log.error("cannot commit %d alert(s), intake paused: %s", len(rows), err)
                    await anyio.sleep(delay)
                    delay = min(delay * 2, 10.0)
            self.paused = ""
            self.engine.committed(alerts, skipped)
            self.dispatcher.offer(ready)

    def _targets(self, name: str) -> list[Target]:
        try:
            return self.actions[name].targets()
        except Exception:
            # Keep the alert deliverable: one entry for the action, which fails and retries
            # (or dead-letters) in the outbox with the action's own error.
            log.exception("action %r: targets() failed", name)
            return [Target("", name)]

    def _new_alert(self, pending: PendingAlert) -> NewAlert:
        deliveries = tuple(
            # The label is kept and shown by tocsin outbox: a secret URL's parts masked.
            (name, target.key, secret_registry.scrub(target.label))
            for name in pending.actions
            if name in self.actions
            for target in self._targets(name)
        )
        alert = pending.alert
        return NewAlert(
            id=alert.id,
            rule=alert.rule,
            event_id=pending.event_id,
            status=alert.status,
            group=pending.group,
            payload=alert.payload(),
            deliveries=deliveries,
            retracts=pending.retracts,
        )

    # -- lifecycle -----------------------------------------------------------------------

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Open the state, start everything, run until ``stop()``, then drain and return."""
        state_dir = self.config.daemon.resolved_state_dir(self.environ)
        self.store = Store.open(state_dir, fsync=self.config.daemon.fsync)
        try:
            self.engine.generations = await self.store.call(Store.load_generations)
            self.engine.restore(await self.store.call(Store.load_rule_state))
            self.dispatcher = Dispatcher(self.store)
            self._limit = self.config.daemon.queue_size
            send, receive = anyio.create_memory_object_stream[Intake](self._limit)
            self._send = send
            async with anyio.create_task_group() as tg:
                try:
                    await self._serve(tg, receive, state_dir, task_status)
                finally:
                    self._close_intake()
                    for waiting in list(self._full_waits):
                        waiting.cancel()  # shielded from the task group: end them here
        finally:
            self._end_spares()  # of sources that never started (start-up cut short)
            if self._send is not None:
                self._send.close()  # also when cancelled rather than stopped
            await self._close_all(self.actions)
            self.store.close()
            self.stopped.set()

    async def _serve(
        self,
        tg: TaskGroup,
        receive: MemoryObjectReceiveStream[Intake],
        state_dir: object,
        task_status: TaskStatus[None],
    ) -> None:
        """Start the engine, actions and sources; wait for ``stop()``; drain."""
        self._tg = tg
        tg.start_soon(self._engine_loop, receive)
        if self.http is not None:
            await tg.start(self.http.serve)  # /readyz says "starting" from here on
        for name in self.config.actions:
            await self._start_action(name)
        await self._dead_letter_unconfigured()
        await self._start_sources(self.config.sources)
        tg.start_soon(self._ticker)
        tg.start_soon(self._purger)
        if self.notifier.enabled:
            tg.start_soon(self._notify_loop)
            with contextlib.suppress(StateError):
                self.outbox = await self.store.call(Store.depth)
        # What start-up built (rules, indexes, plugins) lives until exit: keep it out of
        # the collector's full passes, which otherwise walk it every few thousand events.
        gc.freeze()
        self.ready.set()
        self.notifier.ready(self.status_line())
        log.info(
            "tocsin running: %d source(s), %d rule(s), %d action(s); state in %s",
            len(self.sources),
            len(self.engine.rules),
            len(self.actions),
            state_dir,
        )
        task_status.started()
        await self._stop.wait()
        self.notifier.stopping(self.status_line())
        await self._shutdown(tg)

    def stop(self) -> None:
        """Ask the daemon to stop (safe to call more than once)."""
        self._stop.set()

    @property
    def intake_waiting(self) -> int:
        """Events and cursors received and not yet taken by the engine."""
        return self._waiting

    @property
    def stopping(self) -> bool:
        """``stop()`` was called: intake is closing or closed."""
        return self._stop.is_set()

    async def _shutdown(self, tg: TaskGroup) -> None:
        for runner in self.sources.values():
            if runner.scope is not None:
                runner.scope.cancel()
        drain_until = anyio.current_time() + self.config.daemon.drain_timeout
        with anyio.move_on_at(drain_until):
            # A source stopped while it waited for room still holds events it received:
            # they get in as the engine makes room, then intake closes.
            while self._waiters:
                if self._line_empty is None:
                    self._line_empty = anyio.Event()
                await self._line_empty.wait()
        if self._send is not None:
            await self._send.aclose()  # the engine loop drains what is buffered, then ends
        self._close_intake()
        self.dispatcher.stop()
        with anyio.move_on_at(drain_until) as drain:
            # Events already received are evaluated and their alerts committed (delivered
            # at the next start if not now), then in-flight deliveries finish.
            await self._engine_done.wait()
            await self.dispatcher.idle()
        if drain.cancelled_caught:
            log.warning(
                "stopping after the drain timeout (%s): %s",
                format_duration(self.config.daemon.drain_timeout),
                "events were still being evaluated"
                if not self._engine_done.is_set()
                else f"{self.dispatcher.inflight} delivery(ies) in flight stay queued",
            )
        tg.cancel_scope.cancel()

    async def _start_sources(self, names: Iterable[str]) -> None:
        """Start sources side by side: each may take up to ``SOURCE_START_WAIT`` to connect,
        and one that cannot must not hold up the others, nor READY, by as much again."""
        async with anyio.create_task_group() as starting:
            for name in names:
                starting.start_soon(self._start_source, name)

    async def _start_source(self, name: str) -> None:
        assert self._tg is not None
        config = self.config.sources[name]
        if not config.enabled:
            return
        runner = SourceRunner(self, name, config, self.registry.source(config.plugin))
        runner.spare = self._spares.pop(name, None)  # spawned with this config (start-up)
        replaced = self._replaced.pop(name, None)
        if replaced is not None:
            runner.carry_counts(replaced)
        self.sources[name] = runner
        await self._tg.start(runner.run)

    def _spawn_sources(self) -> dict[str, subprocess.Popen[bytes]]:
        """The processes of the sources that will run in one (``source_processes``)."""
        spares = {}
        for name, config in self.config.sources.items():
            cls = self.registry.source(config.plugin)
            if config.enabled and self.runs_apart(cls):
                spares[name] = spawn(cls)
        return spares

    def runs_apart(self, cls: type[Source]) -> bool:
        """Whether a source of class ``cls`` runs in a process of its own."""
        return self.source_processes and importable(cls)

    def _end_spares(self) -> None:
        for process in self._spares.values():
            end(process)
        self._spares.clear()

    async def _dead_letter_unconfigured(self) -> None:
        """What waits in the outbox for an action no longer configured is dead-lettered
        (SPEC section 5): counted and listed, not pending for ever."""
        try:
            found = await self.store.call(Store.dead_letter_unconfigured, list(self.actions))
        except StateError as err:
            log.error("cannot check the outbox for removed actions: %s", err)
            return
        for action, count in sorted(found.items()):
            log.warning(
                "action %r is no longer configured: its %d pending deliver%s dead-lettered"
                " (tocsin outbox retry sends them again once it is back)",
                action,
                count,
                "y is" if count == 1 else "ies are",
            )

    async def _make_action(self, name: str, config: ActionConfig) -> Action:
        """The action ``name``, built and started; a plugin's failure is a ``PluginError``
        naming the action and its plugin."""
        try:
            action = self.registry.action(config.plugin)(name, config)
            await action.start()
        except Exception as err:  # told by tocsin run, or logged by a reload: both mask secrets
            raise PluginError(
                f"action {name!r} (plugin {config.plugin!r}) could not start:"
                f" {type(err).__name__}: {err}"
            ) from err
        return action

    async def _start_action(self, name: str) -> None:
        """Start the action ``name`` of the config and run it."""
        self._run_action(name, await self._make_action(name, self.config.actions[name]))

    def _run_action(self, name: str, action: Action) -> None:
        """Run ``action`` (started) as ``name``: its deliveries go from now on."""
        assert self._tg is not None
        self.actions[name] = action
        scope = self._action_scopes[name] = anyio.CancelScope()

        async def worker() -> None:
            with scope:
                await self.dispatcher.run_action(name, action)

        self._tg.start_soon(worker)

    async def _ticker(self) -> None:
        while True:
            await anyio.sleep(1.0)
            if self.engine.ticking:
                await self._commit(self.engine.tick(), [])

    async def _purger(self) -> None:
        while True:
            try:
                removed = await self.store.call(Store.purge, self.config.daemon.dedup_horizon)
                if removed:
                    log.info("forgot %d alert(s) older than the dedup horizon", removed)
            except StateError as err:
                log.warning("purge failed: %s", err)
            await anyio.sleep(PURGE_EVERY)

    # -- reload --------------------------------------------------------------------------

    async def reload(self) -> bool:
        """Re-read the config; on any problem keep the running one and return False.

        Once the daemon is stopping, a reload would restart sources during the drain and
        tell systemd READY=1 after STOPPING=1: it is ignored."""
        if self.stopping:
            log.warning("reload ignored: the daemon is stopping")
            return False
        self.notifier.reloading()
        try:
            try:
                config = load_config(self.config_path, self.registry, self.environ)
                engine = Engine(compile_rules(config, self.registry))
            except ConfigError as err:
                count = len(err.problems)
                log.error(
                    "reload refused, the running config stays: %d problem%s",
                    count,
                    "" if count == 1 else "s",
                )
                for problem in err.problems:
                    log.error("reload refused: %s", problem)
                self._reload_note = "the last reload was refused (see the log)"
                return False
            except Exception as err:  # a plugin's bug: never let a reload end the daemon
                log.exception("reload refused, the running config stays: %s", type(err).__name__)
                self._reload_note = "the last reload was refused (see the log)"
                return False
            # New and changed actions start before anything changes: one that cannot
            # start refuses the reload, with the running config intact.
            fresh: dict[str, Action] = {}
            try:
                for name, action_config in config.actions.items():
                    if action_config != self.config.actions.get(name):
                        fresh[name] = await self._make_action(name, action_config)
            except PluginError as err:
                await self._close_all(fresh)
                log.error("reload refused, the running config stays: %s", err)
                self._reload_note = "the last reload was refused (see the log)"
                return False
            if self._stop.is_set():  # stop() came while the new actions started
                await self._close_all(fresh)
                log.warning("reload abandoned: the daemon is stopping")
                return False
            await self._apply(config, engine, fresh)
            self._reload_note = ""
            log.info("config reloaded: %d rule(s)", len(engine.rules))
            return True
        finally:
            if not self._stop.is_set():  # never READY=1 after STOPPING=1
                self.notifier.ready(self.status_line())

    async def _retire(
        self, name: str, scope: anyio.CancelScope, action: Action, lane: Lane | None
    ) -> None:
        """A changed action's old instance: the deliveries it has in flight end (each
        within the action's own timeout; at most ``drain_timeout``), then it is closed.
        Meanwhile the new instance leaves them alone, so a receiver never gets one alert
        twice at once (the new lane takes them if they fail, or outlast the wait)."""
        try:
            if lane is not None:
                with anyio.move_on_after(self.config.daemon.drain_timeout):
                    await lane.drained.wait()
        finally:
            scope.cancel()
            await self._close_all({name: action}, "closing the replaced action")

    @staticmethod
    async def _close_all(actions: dict[str, Action], what: str = "closing it") -> None:
        """Close ``actions`` (at exit, replaced or removed by a reload, or started for a
        reload that does not happen); a plugin's failure is logged as ``what`` failed."""
        for name, action in actions.items():
            with anyio.CancelScope(shield=True):
                try:
                    await action.aclose()
                except Exception:  # a plugin's bug: the others still close, the daemon goes on
                    log.exception("action %r: %s failed", name, what)

    async def _apply(self, config: Config, engine: Engine, fresh: dict[str, Action]) -> None:
        """Switch to ``config``; ``fresh`` holds its new and changed actions, started."""
        old = self.config
        self.config = config
        for key in RESTART_KEYS:
            if getattr(config.daemon, key) != getattr(old.daemon, key):
                log.warning("[daemon] %s changed: the new value applies after a restart", key)
        # Swapped with no await in between: an alert committed meanwhile (the engine runs
        # on) must find every configured action, or it would get no delivery to it.
        closing = []
        for name in list(self.actions):
            if name in fresh:  # changed: what it has in flight ends first (_retire)
                lane = self.dispatcher.retire(name)
                scope, action = self._action_scopes.pop(name), self.actions.pop(name)
                assert self._tg is not None
                self._tg.start_soon(self._retire, name, scope, action, lane)
            elif name not in config.actions:  # gone
                self._action_scopes.pop(name).cancel()
                closing.append((name, self.actions.pop(name)))
        for name, action in fresh.items():
            self._run_action(name, action)
        await self._close_all(dict(closing), "closing the replaced action")
        await self._dead_letter_unconfigured()
        for name, runner in list(self.sources.items()):
            if config.sources.get(name) != old.sources.get(name):
                if runner.scope is not None:
                    runner.scope.cancel()
                self._replaced[name] = self.sources.pop(name)
        await self._start_sources([n for n in config.sources if n not in self.sources])
        engine.adopt(self.engine)
        self.engine = engine
        wanted = engine.index.filter()
        for runner in self.sources.values():
            if runner.child is not None:
                runner.child.rules_changed(wanted)
        # As at start-up; the old rules' cycles are collected first, not frozen forever.
        gc.unfreeze()
        gc.collect()
        gc.freeze()

    # -- systemd notify (notify.py) -----------------------------------------------------

    async def _notify_loop(self) -> None:
        """Refresh ``STATUS=``, and send ``WATCHDOG=1`` while the daemon makes progress
        (notify.py says what that means), every ``STATUS_EVERY`` or half of
        ``$WATCHDOG_USEC``, whichever is shorter."""
        interval = self.notifier.watchdog_interval
        watchdog = Watchdog(2 * interval) if interval else None
        probe: concurrent.futures.Future[tuple[int, int, float | None]] | None = None
        probe_since = 0.0
        stalled = ""
        while True:
            await anyio.sleep(min(interval or STATUS_EVERY, STATUS_EVERY))
            if probe is not None and probe.done():
                with contextlib.suppress(Exception):  # an error is an answer too
                    self.outbox = probe.result()
                probe = None
            if probe is None:  # the store's writer answers this query like any other
                probe, probe_since = self.store.submit(Store.depth), time.monotonic()
            if watchdog is not None:
                why = watchdog.stalled(
                    Progress(
                        taken=self.taken,
                        waiting=self._waiting,
                        paused=bool(self.paused),
                        busy=self.busy,
                        probe_age=time.monotonic() - probe_since if not probe.done() else None,
                    )
                )
                if why and not stalled:
                    log.error("not pinging the systemd watchdog: %s", why)
                elif stalled and not why:
                    log.warning("pinging the systemd watchdog again")
                stalled = why
                if not why:
                    self.notifier.watchdog()
            self.notifier.status(self.status_line())

    def status_line(self) -> str:
        """One line for ``systemctl status``: sources, outbox, lag, counts."""
        if self._stop.is_set():
            return (
                f"stopping: intake closed, {self.dispatcher.inflight} deliveries in flight,"
                f" draining for up to {format_duration(self.config.daemon.drain_timeout)}"
            )
        up = sum(1 for r in self.sources.values() if r.state == "up")
        parts = [f"{up}/{len(self.sources)} sources connected"]
        if self.outbox is not None:
            pending, dead, oldest = self.outbox
            age = f" (oldest {format_duration(max(0.0, time.time() - oldest))})" if oldest else ""
            parts.append(f"outbox {pending} pending{age}, {dead} dead")
        # Lag: how long the batch the engine works on has waited (0 when it waits for input).
        stats = self._send.statistics() if self._send is not None else None
        busy = stats is not None and not stats.tasks_waiting_receive
        lag = max(0.0, time.time() - self.batch_received) if busy and self.taken else 0.0
        parts.append(f"intake {self._waiting} waiting, lag {lag:.1f}s")
        rejected = sum(sum(r.rejected.values()) for r in self.sources.values())
        reconnects = sum(r.reconnects for r in self.sources.values())
        parts.append(f"{rejected} frames rejected, {reconnects} reconnects")
        if self.paused:
            parts.append(f"intake paused: {self.paused}")
        if self._reload_note:
            parts.append(self._reload_note)
        return secret_registry.scrub("; ".join(parts))
