"""The base class of every source, its config, the context the daemon gives it, and Backoff."""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, ClassVar, Protocol

import anyio
from anyio.abc import TaskStatus
from pydantic import Field

from .errors import SourceAuthError
from .events import Event
from .fields import ConfigModel, Duration


class SourceConfig(ConfigModel):
    """Keys every source takes (SPEC section 3); plugins subclass it with their own."""

    plugin: str
    enabled: bool = True
    stale_after: Duration = Field(default=60.0, ge=1.0)
    max_backoff: Duration = Field(default=300.0, ge=1.0)


class ResumableSourceConfig(SourceConfig):
    """Keys of a source that can fetch what it missed (SPEC section 3, "First start and resume")."""

    backfill: bool = True
    backfill_limit: int = Field(default=1000, ge=1, le=1_000_000)


class SourceContext(Protocol):
    """What the daemon gives a running source. Every method is safe to call from ``run``."""

    source: str
    """The configured source name (``[sources.NAME]``)."""
    provider: str
    """The plugin name."""
    logger: logging.Logger

    def event(
        self,
        type: str,
        data: dict[str, Any],
        *,
        id: str,
        time: str = "",
        removed: bool = False,
    ) -> Event:
        """An ``Event`` of this source with ``source`` and ``provider`` filled in."""
        ...

    async def emit(self, event: Event) -> None:
        """Hand an event to the rule engine; waits when the engine is behind (bounded).

        Every event is counted; one that no rule can fire on (the engine's index finds no
        rule for it, and it is not a removal) goes no further, and the call returns at once.
        """
        ...

    async def emit_many(self, events: Iterable[Event]) -> None:
        """``emit`` for each of ``events``, in order, as one hand-over: for a source that
        reads frames a batch at a time (the daemon's cost per event is then a fraction)."""
        ...

    async def up(self) -> None:
        """The connection is established and subscribed: emits ``source.up``."""
        ...

    async def down(self, reason: str) -> None:
        """The connection is lost or refused: emits ``source.down`` (once per outage)."""
        ...

    async def stale(self, reason: str) -> None:
        """Nothing arrived for ``stale_after``: emits ``source.stale``."""
        ...

    async def gap(
        self,
        reason: str,
        since: str,
        until: str = "",
        *,
        detail: Mapping[str, str | int] | None = None,
    ) -> None:
        """Events may have been missed between ``since`` and ``until``: emits ``source.gap``.

        ``since``/``until`` are times (ISO-8601 UTC; ``until`` defaults to now). A source
        that counts in heights or sequence numbers names the missing range in ``detail``
        (e.g. ``{"topic": "snapshot_block", "from_height": 120, "to_height": 1300}``), whose
        fields are added to the event's data.
        """
        ...

    def sift(self, type: str, data: dict[str, Any]) -> bool:
        """Whether to build and emit an event of ``type`` with ``data``: False when no rule
        can fire on it (the rule index finds none), and it is then counted as received.

        Optional: ``emit`` drops such events too. A busy source calls it before the costly
        part of building an event (its id, its duplicate check), for every event but a
        removal (which always goes on: it may retract what any rule fired). Outside the
        daemon (``tocsin test --frames``, ``tocsin record``) it is always True.
        """
        ...

    def reject(self, reason: str) -> None:
        """Count a frame that could not be parsed (malformed, oversized...) and go on."""
        ...

    def received(self, frame: str | bytes) -> None:
        """Called with every raw data frame as it arrives, before it is parsed.

        ``tocsin record`` saves these frames; in the daemon it does nothing. A source calls
        it for each frame it reads from the provider (not for frames it sends).
        """
        ...

    async def load_cursor(self, key: str) -> str | None:
        """The cursor saved under ``key`` for this source, or None on first start."""
        ...

    async def save_cursor(self, key: str, value: str) -> None:
        """Save a cursor; committed only after the alerts of every event emitted before it.

        A key starting with ``~`` is a memory rather than a position (what the source last
        knew of one of many things): it is forgotten once not saved for ``[daemon]
        dedup_horizon``, so such keys never pile up."""
        ...


class EventFactory:
    """``SourceContext.event``: builds events stamped with the source and provider names."""

    source: str
    provider: str

    def event(
        self,
        type: str,
        data: dict[str, Any],
        *,
        id: str,
        time: str = "",
        removed: bool = False,
    ) -> Event:
        # Positional: a dataclass __init__ takes keywords at twice the cost (timeit: 0.46
        # against 0.24 us), and every event of every source is built here.
        return Event(id, self.source, self.provider, type, data, time, removed)

    def sift(self, type: str, data: dict[str, Any]) -> bool:
        """``SourceContext.sift``: every event, where no rules apply."""
        return True


FrameParser = Callable[[str | bytes], list[Event]]
"""Turns one recorded raw frame into the events the source would emit for it (``[]`` for
control frames: acks, heartbeats, pongs); raises ``ValueError`` for a malformed frame.
It may keep state between frames (e.g. subscription ids learnt from recorded answers)."""


class Source:
    """A live connection (or set of connections) to one provider.

    Subclasses set ``name`` (the ``plugin = "..."`` value), ``Config`` (a ``SourceConfig``
    subclass validating the plugin's own keys) and ``event_types`` (the ``type`` values it
    emits, used to check rules), and implement ``run``.
    """

    name: ClassVar[str]
    Config: ClassVar[type[SourceConfig]] = SourceConfig
    event_types: ClassVar[tuple[str, ...]] = ()

    def __init__(self, config: SourceConfig, ctx: SourceContext) -> None:
        self.config = config
        self.ctx = ctx

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Connect, subscribe, keep alive, reconnect with ``Backoff``, emit events; never return.

        Call ``task_status.started()`` once the first connection is up (the daemon does not
        wait for it forever). Raise nothing but cancellation: failures are reconnected here.
        """
        raise NotImplementedError

    @classmethod
    def frame_parser(cls, config: SourceConfig, factory: EventFactory) -> FrameParser | None:
        """A parser for frames saved by ``tocsin record``, for ``tocsin test --frames``.

        ``factory.event(...)`` builds the events, as ``SourceContext.event`` does in ``run``.
        The default, None, means this source cannot replay recorded frames.
        """
        return None


async def keep_running(
    cls: type[Source],
    config: SourceConfig,
    ctx: SourceContext,
    backoff: Backoff,
    task_status: TaskStatus[None],
) -> None:
    """Run a source until cancelled; a crash is logged, reported ``down`` and restarted
    with backoff (in the daemon, and in a source's own process alike)."""
    while True:
        delay = None
        try:
            await cls(config, ctx).run(task_status=task_status)
            reason = "the source stopped"
        except SourceAuthError as err:
            # Only the user can fix this (a bad or banned key): wait max_backoff at once.
            reason = f"refused: {err}"
            delay = backoff.give_up_delay()
        except Exception as err:
            ctx.logger.exception("source %r crashed", ctx.source)
            reason = f"crashed: {type(err).__name__}"
        task_status.started()
        await ctx.down(reason)
        await anyio.sleep(delay if delay is not None else backoff.delay())


class Backoff:
    """Exponential backoff with full jitter, from ``initial`` up to ``maximum`` seconds.

    ``delay()`` gives the next wait; ``healthy()`` should be called while a connection is up:
    once it has stayed up for ``reset_after`` seconds the backoff starts again from ``initial``.
    """

    def __init__(
        self, initial: float = 1.0, maximum: float = 300.0, reset_after: float = 60.0
    ) -> None:
        self.initial = initial
        self.maximum = maximum
        self.reset_after = reset_after
        self.failures = 0
        self._up_since: float | None = None

    def delay(self) -> float:
        """The wait before the next try: up to ``initial * 2**failures``, capped, jittered."""
        self._up_since = None
        ceiling = min(self.maximum, self.initial * (2 ** min(self.failures, 32)))
        self.failures += 1
        return random.uniform(ceiling / 2, ceiling)

    def connected(self) -> None:
        """A connection just came up."""
        self._up_since = time.monotonic()

    def healthy(self) -> None:
        """The connection is still up: reset once it has lasted ``reset_after``."""
        if self._up_since is not None and time.monotonic() - self._up_since >= self.reset_after:
            self.failures = 0

    def give_up_delay(self) -> float:
        """For failures only the user can fix (a bad key): wait ``maximum`` at once."""
        self.failures = 64
        return self.maximum
