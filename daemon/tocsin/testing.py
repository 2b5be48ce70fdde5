"""Helpers for testing plugins: a recording ``SourceContext`` and the plugin registry.

A plugin's tests build a registry with exactly their plugin and run a source against a
local server with a ``RecordingContext`` in place of the daemon::

    from tocsin.testing import RecordingContext, build_registry, make_plugin_manager

    registry = build_registry(make_plugin_manager([my_plugin], load_entry_points=False))
    ctx = RecordingContext("ticker", "ticker")
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping

import anyio

from .events import Event
from .plugins import Registry, build_registry, make_plugin_manager
from .source import EventFactory

__all__ = ["RecordingContext", "Registry", "build_registry", "make_plugin_manager"]


class RecordingContext(EventFactory):
    """A ``SourceContext`` that records what a source does, in place of the daemon.

    ``hand_over`` (seconds) makes every event take that long to be taken, as when the
    daemon's engine is behind: a source must not take that for silence, nor lose an
    event to its own deadlines (unlike the daemon's, this wait can be cancelled)."""

    def __init__(self, source: str, provider: str, *, hand_over: float = 0.0) -> None:
        self.hand_over = hand_over
        self.source = source
        self.provider = provider
        self.logger = logging.getLogger(f"tocsin.testing.{source}")
        self.events: list[Event] = []
        self.rejects: list[str] = []
        self.frames: list[str | bytes] = []
        self.status: list[tuple[str, str]] = []
        self.cursors: dict[str, str] = {}
        self.gaps: list[dict[str, str | int]] = []
        self.changed = anyio.Event()

    def _changed(self) -> None:
        self.changed.set()
        self.changed = anyio.Event()

    async def emit(self, event: Event) -> None:
        if self.hand_over:
            await anyio.sleep(self.hand_over)  # the engine's work, not a wait for something
        self.events.append(event)
        self._changed()

    async def emit_many(self, events: Iterable[Event]) -> None:
        if not self.hand_over:
            self.events.extend(events)
            self._changed()
            return
        for event in events:
            await self.emit(event)

    async def _status(self, what: str, reason: str) -> None:
        self.status.append((what, reason))
        self._changed()

    async def up(self) -> None:
        await self._status("up", "")

    async def down(self, reason: str) -> None:
        await self._status("down", reason)

    async def stale(self, reason: str) -> None:
        await self._status("stale", reason)

    async def gap(
        self,
        reason: str,
        since: str,
        until: str = "",
        *,
        detail: Mapping[str, str | int] | None = None,
    ) -> None:
        self.gaps.append({**(detail or {}), "reason": reason, "since": since, "until": until})
        await self._status("gap", f"{reason} since {since}")

    def reject(self, reason: str) -> None:
        self.rejects.append(reason)
        self._changed()

    def received(self, frame: str | bytes) -> None:
        self.frames.append(frame)
        self._changed()  # a test may wait for frames that make no event (heartbeats)

    async def load_cursor(self, key: str) -> str | None:
        return self.cursors.get(key)

    async def save_cursor(self, key: str, value: str) -> None:
        self.cursors[key] = value
        self._changed()

    def states(self) -> list[str]:
        return [what for what, _ in self.status]

    async def wait_until(self, condition: Callable[[], bool]) -> None:
        """Wait for ``condition``; callers bound the wait with ``anyio.fail_after``."""
        while not condition():
            await self.changed.wait()
