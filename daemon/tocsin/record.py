"""``tocsin record``: run one source alone and save every raw frame it reads.

No rules, no actions, no state database: the source runs with a ``Recorder`` as its
``SourceContext``, which appends each frame to the output file as one JSON line
(``replay.frame_record``), flushed at once, so a crash loses at most the line being
written. Events are only counted; up, down, stale and gap are logged. Frames are the
provider's data and are never logged.
"""

from __future__ import annotations

import logging
import math
import signal
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import IO

import anyio

from .config import Config
from .errors import UsageError
from .events import Event
from .plugins import Registry
from .replay import ReplayFactory, frame_record
from .source import EventFactory, FrameParser, Source, SourceConfig

log = logging.getLogger(__name__)


def configured_source(config: Config, registry: Registry, name: str) -> type[Source]:
    """The source class of ``[sources.NAME]``, or ``UsageError`` naming the configured ones."""
    if name not in config.sources:
        names = ", ".join(f'"{n}"' for n in sorted(config.sources))
        listed = f"the configured sources are {names}" if names else "it configures no source"
        raise UsageError(f'{config.path} has no source "{name}": {listed}')
    return registry.source(config.sources[name].plugin)


def frame_parser(
    config: Config, registry: Registry, name: str
) -> tuple[FrameParser, ReplayFactory]:
    """The parser replaying ``[sources.NAME]``'s recorded frames, and its event factory.

    ``UsageError`` when the source is unknown or its plugin cannot replay frames.
    """
    cls = configured_source(config, registry, name)
    factory = ReplayFactory(name, cls.name)
    parse = cls.frame_parser(config.sources[name], factory)
    if parse is None:
        raise UsageError(
            f'source "{name}" (plugin {cls.name}) cannot replay recorded frames:'
            " its plugin has no frame parser"
        )
    return parse, factory


@dataclass
class Recorded:
    """What a recording saw."""

    frames: int = 0
    events: int = 0
    rejected: int = 0
    error: str = ""  # why the file could not be written, which stopped the recording


class Recorder(EventFactory):
    """The ``SourceContext`` of a recorded source: saves frames, counts events, logs status."""

    def __init__(self, source: str, provider: str, out: IO[bytes], count: int | None) -> None:
        self.source = source
        self.provider = provider
        self.logger = logging.getLogger(f"tocsin.source.{source}")
        self.out = out
        self.count = count
        self.seen = Recorded()
        self.done = anyio.Event()
        self._cursors: dict[str, str] = {}
        self._rejected: set[str] = set()

    def received(self, frame: str | bytes) -> None:
        if self.done.is_set():
            return  # the count is reached: the source is being stopped
        try:
            self.out.write(frame_record(time.time(), frame))
            self.out.flush()
        except OSError as err:  # a full disk: stop, rather than lose frames silently
            self.seen.error = err.strerror or type(err).__name__
            self.done.set()
            return
        self.seen.frames += 1
        if self.count is not None and self.seen.frames >= self.count:
            self.done.set()

    async def emit(self, event: Event) -> None:
        self.seen.events += 1

    async def emit_many(self, events: Iterable[Event]) -> None:
        self.seen.events += sum(1 for _ in events)

    async def up(self) -> None:
        self.logger.info("source %r is up", self.source)

    async def down(self, reason: str) -> None:
        self.logger.warning("source %r is down: %s", self.source, reason)

    async def stale(self, reason: str) -> None:
        self.logger.warning("source %r is stale: %s", self.source, reason)

    async def gap(
        self,
        reason: str,
        since: str,
        until: str = "",
        *,
        detail: Mapping[str, str | int] | None = None,
    ) -> None:
        self.logger.warning(
            "source %r: events may be missing since %s: %s", self.source, since, reason
        )

    def reject(self, reason: str) -> None:
        self.seen.rejected += 1
        level = logging.DEBUG if reason in self._rejected else logging.WARNING
        self._rejected.add(reason)
        self.logger.log(level, "source %r: frame rejected: %s", self.source, reason)

    async def load_cursor(self, key: str) -> str | None:
        # Nothing is read from the state database: the recording starts at the head.
        return self._cursors.get(key)

    async def save_cursor(self, key: str, value: str) -> None:
        self._cursors[key] = value  # kept for this run only: no state writes


async def record(
    config: SourceConfig,
    cls: type[Source],
    name: str,
    out: IO[bytes],
    *,
    count: int | None = None,
    duration: float | None = None,
) -> Recorded:
    """Run source ``name`` until ``count`` frames, ``duration`` seconds, SIGINT or SIGTERM."""
    recorder = Recorder(name, cls.name, out, count)
    source = cls(config, recorder)
    async with anyio.create_task_group() as tg:

        async def signals() -> None:
            with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as received:
                async for _ in received:
                    recorder.done.set()

        tg.start_soon(signals)
        tg.start_soon(source.run)
        with anyio.move_on_after(math.inf if duration is None else duration):
            await recorder.done.wait()
        tg.cancel_scope.cancel()
    return recorder.seen
