"""Delivering committed alerts: one lane per action, fed from the commit and from disk.

The outbox on disk is the truth; memory holds only a bounded queue of what is due next.
Each action has ``concurrency`` workers. A commit hands the deliveries it made ready
straight to their lanes (``offer``), so a fresh alert goes out without reading the outbox
back; a lane reads the disk at start, every ``POLL_INTERVAL``, when a retry falls due, and
when its queue overflowed or a finished delivery let the next of its group go. Memory
stays bounded under any backlog: a lane queues at most ``QUEUE_LIMIT`` deliveries and the
rest wait in the outbox table. A failed try is rescheduled with exponential backoff and
jitter (or the ``Retry-After`` the receiver asked for) until the action's ``retry``
budget ends, then dead-lettered. A slow action only slows itself.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable
from typing import TypeVar

import anyio
import orjson

from .action import Action, Alert, RetryPolicy
from .errors import PermanentDelivery, RetryableDelivery, StateError
from .fields import format_duration, secret_registry
from .store import DEAD, DONE, Delivery, Ready, Store

log = logging.getLogger(__name__)

T = TypeVar("T")

POLL_INTERVAL = 5.0
"""A lane reads the outbox at least this often, woken or not."""

QUEUE_LIMIT = 64
"""Deliveries a lane holds in memory beyond those in flight; more wait on disk."""


def backoff_delay(policy: RetryPolicy, attempts: int) -> float:
    """The wait after ``attempts`` failed tries: ``backoff * 2**(attempts-1)``, capped, jittered."""
    ceiling = min(policy.max_backoff, policy.backoff * 2 ** min(attempts - 1, 32))
    return random.uniform(ceiling / 2, ceiling)


def next_step(
    policy: RetryPolicy, attempts: int, created_at: float, now: float, retry_after: float | None
) -> float | None:
    """When to try again after ``attempts`` failures, or None to dead-letter."""
    if attempts >= policy.attempts:
        return None
    delay = retry_after if retry_after is not None else backoff_delay(policy, attempts)
    due = now + max(delay, 0.0)
    if due - created_at > policy.max_age:
        return None
    return due


class Lane:
    """One action's deliveries on their way out: a bounded queue and the ones in flight.

    Every queued or in-flight delivery is also pending in the outbox. ``seen`` is the
    newest outbox entry the last read of the disk could see: an offer at or below it is
    the disk's to give (queued by that read, or left on disk for the next one).
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.queued: deque[Delivery] = deque()
        self.inflight: set[int] = set()  # seqs handed to a worker
        self.seen = 0
        self.on_disk = True  # due deliveries may wait in the outbox that are not queued here
        self.next_due = math.inf  # when the earliest retry on disk falls due
        self.closed = False  # stopping: take nothing new
        # The in-flight sets of the lanes this one replaced (a reload changed the action):
        # their deliveries are theirs until they end.
        self.elsewhere: list[set[int]] = []
        self.drained = anyio.Event()  # closed, and nothing in flight any more
        self._takers: deque[asyncio.Future[Delivery]] = deque()
        self._wake = anyio.Event()

    def busy(self, seq: int) -> bool:
        """Whether a worker (of this lane, or of one it replaced) holds ``seq``."""
        return seq in self.inflight or any(seq in other for other in self.elsewhere)

    def offer(self, delivery: Delivery) -> None:
        """A commit made ``delivery`` ready."""
        if delivery.seq <= self.seen or self.busy(delivery.seq):
            return
        if len(self.queued) >= QUEUE_LIMIT:
            self.disk_has_work()
            return
        self.queued.append(delivery)
        self._hand_over()

    def fetch_limit(self) -> int:
        """How many to read: in flight ones come back too (they are pending on disk)."""
        return QUEUE_LIMIT + len(self.inflight)

    def refill(self, ready: Ready, limit: int) -> None:
        """What a read of the disk (of at most ``limit``) found replaces what was queued
        before it; offers it could not see stay, after it."""
        self.seen = max(self.seen, ready.newest)
        queue = [d for d in ready.deliveries if not self.busy(d.seq)]
        queue += [d for d in self.queued if d.seq > ready.newest]
        self.queued = deque(queue[:QUEUE_LIMIT])
        self.on_disk = len(ready.deliveries) >= limit or len(queue) > QUEUE_LIMIT
        self.next_due = ready.next_due if ready.next_due is not None else math.inf
        self._hand_over()

    def disk_has_work(self, due: float | None = None) -> None:
        """Read the disk soon: now, or when ``due`` comes."""
        if due is None:
            self.on_disk = True
        else:
            self.next_due = min(self.next_due, due)
        self._wake.set()

    def close(self) -> None:
        self.closed = True
        if not self.inflight:
            self.drained.set()

    async def take(self) -> Delivery:
        """The next delivery for a worker; it counts as in flight from here on."""
        if self.queued and not self.closed and not self._takers:
            return self._pop()
        taker: asyncio.Future[Delivery] = asyncio.get_running_loop().create_future()
        self._takers.append(taker)
        return await taker

    def _hand_over(self) -> None:
        while self.queued and self._takers and not self.closed:
            taker = self._takers.popleft()
            if taker.done():
                continue  # its worker was cancelled
            taker.set_result(self._pop())

    def _pop(self) -> Delivery:
        delivery = self.queued.popleft()
        self.inflight.add(delivery.seq)
        if self.on_disk and len(self.queued) < self.limit:
            self._wake.set()  # the queue runs low while more waits on disk
        return delivery

    async def wait(self, wall: Callable[[], float], since: float) -> None:
        """Until the disk should be read: woken, a retry due, or the poll interval over."""
        while True:
            now = wall()
            deadline = min(since + POLL_INTERVAL, self.next_due)
            if self.closed:
                deadline = math.inf
            elif now >= deadline or (self.on_disk and len(self.queued) < self.limit):
                return
            self._wake = anyio.Event()
            with anyio.move_on_after(max(deadline - now, 0.0) + 0.001):
                await self._wake.wait()


class Dispatcher:
    """Runs one lane per action until cancelled."""

    def __init__(self, store: Store, wall: Callable[[], float] = time.time) -> None:
        self.store = store
        self.wall = wall
        self.outcomes: Counter[tuple[str, str]] = Counter()
        self.lanes: dict[str, Lane] = {}
        # Per action, the in-flight sets of lanes a reload replaced (see ``retire``).
        self.retiring: dict[str, list[set[int]]] = {}
        self.stopping = False
        self.inflight = 0
        self._idle = anyio.Event()
        self._idle.set()

    async def idle(self) -> None:
        """Wait until no delivery is in flight (used when stopping)."""
        while self.inflight:
            self._idle = anyio.Event()
            await self._idle.wait()

    def stop(self) -> None:
        """Finish what is in flight and take nothing new."""
        self.stopping = True
        for lane in self.lanes.values():
            lane.close()

    def offer(self, deliveries: Iterable[Delivery]) -> None:
        """A commit made these deliveries ready: hand them to their lanes."""
        for delivery in deliveries:
            lane = self.lanes.get(delivery.action)
            if lane is not None:
                lane.offer(delivery)

    def wake(self, actions: Iterable[str]) -> None:
        """The outbox may hold new deliveries for these actions: read it now."""
        for name in actions:
            lane = self.lanes.get(name)
            if lane is not None:
                lane.disk_has_work()

    def retire(self, name: str) -> Lane | None:
        """A reload replaces action ``name``: its lane takes nothing new, and the lane that
        follows leaves the deliveries in flight to it until they end (``Lane.drained``):
        one delivery is never sent twice at once."""
        lane = self.lanes.pop(name, None)
        if lane is not None:
            lane.close()
            if lane.inflight:
                self.retiring.setdefault(name, []).append(lane.inflight)
        return lane

    async def run_action(self, name: str, action: Action) -> None:
        """Deliver everything due for ``action``, forever; cancel to stop."""
        lane = Lane(action.config.concurrency)
        lane.elsewhere = self.retiring.setdefault(name, [])
        if self.stopping:
            lane.close()
        self.lanes[name] = lane
        try:
            async with anyio.create_task_group() as tg:
                for _ in range(lane.limit):
                    tg.start_soon(self._worker, name, action, lane)
                await self._read_disk(name, lane)
        finally:
            if self.lanes.get(name) is lane:
                del self.lanes[name]

    async def _read_disk(self, name: str, lane: Lane) -> None:
        since = -math.inf
        while True:
            await lane.wait(self.wall, since)
            since = self.wall()
            limit = lane.fetch_limit()
            try:
                ready = await self.store.run(Store.fetch_ready, name, since, limit)
            except StateError as err:
                log.error("action %r: cannot read the outbox: %s", name, err)
                lane.on_disk = False  # try again at the next poll
                continue
            lane.refill(ready, limit)

    async def _worker(self, name: str, action: Action, lane: Lane) -> None:
        while True:
            delivery = await lane.take()
            self.inflight += 1
            try:
                await self._attempt(name, action, delivery, lane)
            finally:
                lane.inflight.discard(delivery.seq)
                self.inflight -= 1
                if not self.inflight:
                    self._idle.set()
                if lane.closed and not lane.inflight:
                    lane.drained.set()
                    others = self.retiring.get(name, [])
                    others[:] = [o for o in others if o is not lane.inflight]
                current = self.lanes.get(name)
                if current is not None and current is not lane:
                    current.disk_has_work()  # replaced: what this lane held may be due

    async def _attempt(self, name: str, action: Action, delivery: Delivery, lane: Lane) -> None:
        policy = action.config.retry
        age = self.wall() - delivery.created_at
        if age > policy.max_age:
            # Waited past its budget (behind its group, or while the daemon was stopped):
            # SPEC section 5 sends within max_age, then dead-letters.
            error = (
                f"not sent within max_age ({format_duration(policy.max_age)}):"
                f" {format_duration(age)} old"
            )
            await self._finish(name, delivery, lane, DEAD, error)
            log.error("action %r: %s dead-lettered: %s", name, _label(delivery), error)
            return
        alert = Alert(**orjson.loads(delivery.payload))
        retry_after: float | None = None
        try:
            await action.deliver(alert, delivery.target)
        except PermanentDelivery as err:
            await self._finish(name, delivery, lane, DEAD, str(err) or type(err).__name__)
            log.error("action %r: %s dead-lettered: %s", name, _label(delivery), err)
            return
        except RetryableDelivery as err:
            error, retry_after = str(err) or type(err).__name__, err.retry_after
        except Exception as err:
            error = f"{type(err).__name__}: {err}"
        else:
            await self._finish(name, delivery, lane, DONE)
            return
        attempts = delivery.attempts + 1
        due = next_step(policy, attempts, delivery.created_at, self.wall(), retry_after)
        if due is None:
            await self._finish(name, delivery, lane, DEAD, error)
            log.error(
                "action %r: %s dead-lettered after %d tries: %s",
                name,
                _label(delivery),
                attempts,
                error,
            )
            return
        self.outcomes[(name, "retry")] += 1
        level = logging.WARNING if attempts == 1 else logging.INFO
        log.log(
            level,
            "action %r: %s failed (try %d), retrying in %.1fs: %s",
            name,
            _label(delivery),
            attempts,
            due - self.wall(),
            error,
        )
        await self._write(Store.reschedule, delivery.seq, due, secret_registry.scrub(error))
        lane.disk_has_work(due)

    async def _finish(
        self, name: str, delivery: Delivery, lane: Lane, state: int, error: str = ""
    ) -> None:
        self.outcomes[(name, "delivered" if state == DONE else "dead")] += 1
        # Kept in the state database and shown by tocsin outbox, which (reading the
        # [daemon] table only) knows no secret to mask: masked here.
        if await self._write(Store.finish, delivery.seq, state, secret_registry.scrub(error)):
            lane.disk_has_work()  # the next delivery of its group is now due

    async def _write(self, op: Callable[..., T], *args: object) -> T:
        # A delivery outcome must reach the disk; a failed write (disk full) is retried,
        # and meanwhile this delivery stays in flight so it is not sent twice.
        delay = 0.1
        while True:
            try:
                return await self.store.run(op, *args)
            except StateError as err:
                log.error("cannot record a delivery outcome, retrying: %s", err)
                await anyio.sleep(delay)
                delay = min(delay * 2, 5.0)


def _label(delivery: Delivery) -> str:
    return f"alert {delivery.alert_id[:12]} to {delivery.label}"
