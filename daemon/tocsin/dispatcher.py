"""Delivering committed alerts: one worker per action, reading its due deliveries from disk.

Memory stays bounded under any backlog: a worker holds at most ``concurrency`` deliveries
at a time and the rest wait in the outbox table. A failed try is rescheduled with
exponential backoff and jitter (or the ``Retry-After`` the receiver asked for) until the
action's ``retry`` budget ends, then dead-lettered. A slow action only slows itself.
"""

from __future__ import annotations

import logging
import random
import time
from collections import Counter
from collections.abc import Callable, Iterable

import anyio
import orjson

from .action import Action, Alert, RetryPolicy
from .errors import PermanentDelivery, RetryableDelivery, StateError
from .store import DEAD, DONE, Delivery, Store

log = logging.getLogger(__name__)

POLL_INTERVAL = 5.0
"""A worker looks at the outbox at least this often, woken or not."""


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


class Dispatcher:
    """Runs one delivery worker per action until cancelled."""

    def __init__(self, store: Store, wall: Callable[[], float] = time.time) -> None:
        self.store = store
        self.wall = wall
        self.outcomes: Counter[tuple[str, str]] = Counter()
        self._wake: dict[str, anyio.Event] = {}
        self.stopping = False
        self.inflight = 0
        self._idle = anyio.Event()
        self._idle.set()

    async def idle(self) -> None:
        """Wait until no delivery is in flight (used when stopping)."""
        while self.inflight:
            self._idle = anyio.Event()
            await self._idle.wait()

    def wake(self, actions: Iterable[str]) -> None:
        """New deliveries were committed for these actions."""
        for name in actions:
            event = self._wake.get(name)
            if event is not None:
                event.set()

    async def run_action(self, name: str, action: Action) -> None:
        """Deliver everything due for ``action``, forever; cancel to stop."""
        limit = action.config.concurrency
        inflight: set[int] = set()
        async with anyio.create_task_group() as tg:
            while True:
                wake = self._wake[name] = anyio.Event()
                timeout = POLL_INTERVAL
                free = limit - len(inflight)
                if self.stopping:
                    free = 0  # finish what is in flight, take nothing new
                if free > 0:
                    try:
                        ready, next_due = await self.store.call(
                            Store.fetch_ready, name, self.wall(), free + len(inflight)
                        )
                    except StateError as err:
                        log.error("action %r: cannot read the outbox: %s", name, err)
                        ready, next_due = [], None
                    for delivery in ready:
                        if delivery.seq in inflight or len(inflight) >= limit:
                            continue
                        inflight.add(delivery.seq)
                        self.inflight += 1
                        tg.start_soon(self._deliver, name, action, delivery, inflight)
                    if next_due is not None:
                        timeout = min(timeout, max(next_due - self.wall(), 0.0) + 0.001)
                with anyio.move_on_after(timeout):
                    await wake.wait()

    async def _deliver(
        self, name: str, action: Action, delivery: Delivery, inflight: set[int]
    ) -> None:
        try:
            await self._attempt(name, action, delivery)
        finally:
            inflight.discard(delivery.seq)
            self.inflight -= 1
            if not self.inflight:
                self._idle.set()
            self._wake[name].set()

    async def _attempt(self, name: str, action: Action, delivery: Delivery) -> None:
        alert = Alert(**orjson.loads(delivery.payload))
        policy = action.config.retry
        retry_after: float | None = None
        try:
            await action.deliver(alert, delivery.target)
        except PermanentDelivery as err:
            await self._finish(name, delivery, DEAD, str(err) or type(err).__name__)
            log.error("action %r: %s dead-lettered: %s", name, _label(delivery), err)
            return
        except RetryableDelivery as err:
            error, retry_after = str(err) or type(err).__name__, err.retry_after
        except Exception as err:
            error = f"{type(err).__name__}: {err}"
        else:
            await self._finish(name, delivery, DONE)
            return
        attempts = delivery.attempts + 1
        due = next_step(policy, attempts, delivery.created_at, self.wall(), retry_after)
        if due is None:
            await self._finish(name, delivery, DEAD, error)
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
        await self._write(Store.reschedule, delivery.seq, due, error)

    async def _finish(self, name: str, delivery: Delivery, state: int, error: str = "") -> None:
        self.outcomes[(name, "delivered" if state == DONE else "dead")] += 1
        await self._write(Store.finish, delivery.seq, state, error)

    async def _write(self, op: Callable[..., None], *args: object) -> None:
        # A delivery outcome must reach the disk; a failed write (disk full) is retried,
        # and meanwhile this delivery stays in flight so it is not sent twice.
        delay = 0.1
        while True:
            try:
                await self.store.call(op, *args)
                return
            except StateError as err:
                log.error("cannot record a delivery outcome, retrying: %s", err)
                await anyio.sleep(delay)
                delay = min(delay * 2, 5.0)


def _label(delivery: Delivery) -> str:
    return f"alert {delivery.alert_id[:12]} to {delivery.label}"
