"""One JSON-RPC connection for the source: calls with timeouts, spelling fallback, pushes.

A single reader: ``call`` sends a request and reads frames until its answer arrives;
notifications read meanwhile (pushes that come during a subscribe or a backfill) are
kept, in order, for ``next_notification``. So the source can subscribe, backfill, and
only then handle what was pushed meanwhile, without a second task.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import anyio
from websockets.asyncio.client import ClientConnection

from tocsin import SourceError, format_duration

from .protocol import Notification, Response, RpcError, parse_frame, request

MAX_PENDING = 10_000
"""Pushes held while a call is running; more means the node floods us during a backfill:
the connection is dropped and the next one resumes from the saved heights, losing nothing."""
MAX_PENDING_BYTES = 32 * 1024 * 1024
"""The same bound in bytes of the frames holding them (a frame may be 8 MiB)."""


class CallFailed(SourceError):
    """The server answered a call with a JSON-RPC error."""

    def __init__(self, method: str, error: RpcError) -> None:
        super().__init__(f"{method}: {error}")
        self.method = method
        self.error = error


class RpcConnection:
    """Requests and pushes over one open WebSocket."""

    def __init__(
        self,
        ws: ClientConnection,
        *,
        timeout: float,
        reject: Callable[[str], None],
        on_frame: Callable[[], None],
        received: Callable[[str | bytes], None],
    ) -> None:
        self.ws = ws
        self.timeout = timeout
        self.reject = reject
        self.on_frame = on_frame
        self.received = received  # every frame read, before parsing (``tocsin record``)
        self.pending: deque[Notification] = deque()
        self._sizes: deque[int] = deque()  # the bytes of each held push (its frame's share)
        self.pending_bytes = 0
        self.spelling: dict[str, str] = {}  # family -> the name this server answered to
        self.last_frame = time.monotonic()
        self._next_id = 0

    async def call(
        self,
        method: str,
        params: Sequence[Any] = (),
        within: float | None = None,
        *,
        sent: Callable[[], None] | None = None,
    ) -> Any:
        """The result of ``method``; ``CallFailed`` on an error answer, ``SourceError`` when
        no answer comes ``within`` seconds (default: the connection timeout). ``sent`` is
        called once the request is written (a call that fails after it may have acted)."""
        self._next_id += 1
        rid = self._next_id
        timeout = self.timeout if within is None else within
        await self.ws.send(request(rid, method, params))
        if sent is not None:
            sent()
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            raw: str | bytes | None = None
            if left > 0:
                with anyio.move_on_after(left):
                    raw = await self.ws.recv()
            if raw is None:
                raise SourceError(f"no answer to {method} within {format_duration(timeout)}")
            for msg in self._messages(raw):
                if isinstance(msg, Response) and str(msg.id) == str(rid):
                    if msg.error is not None:
                        raise CallFailed(method, msg.error)
                    return msg.result

    async def call_any(self, family: str, candidates: Sequence[tuple[str, Sequence[Any]]]) -> Any:
        """Call the first of ``candidates`` (method, params) this server knows: -32601
        moves on to the next. The method that answered is tried first from then on, on
        this connection (``family`` names the group)."""
        known = self.spelling.get(family)
        order = sorted(candidates, key=lambda c: c[0] != known)  # stable: known first
        last: CallFailed | None = None
        for method, params in order:
            try:
                result = await self.call(method, params)
            except CallFailed as err:
                if not err.error.method_missing:
                    raise
                last = err
                continue
            self.spelling[family] = method
            return result
        if last is None:
            raise SourceError(f"no method to call for {family}")
        raise last

    async def next_notification(self, wait: float) -> Notification | None:
        """The next push (held ones first), or None after ``wait`` seconds without one."""
        deadline = time.monotonic() + wait
        while not self.pending:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            raw: str | bytes | None = None
            with anyio.move_on_after(left):
                raw = await self.ws.recv()
            if raw is None:
                return None
            self._messages(raw)
        self.pending_bytes -= self._sizes.popleft()
        return self.pending.popleft()

    def clear_pending(self) -> None:
        """Drop every held push."""
        self.pending.clear()
        self._sizes.clear()
        self.pending_bytes = 0

    def _messages(self, raw: str | bytes) -> list[Response]:
        """Parse one frame: keep its notifications, return its responses.

        Every frame read passes here once, whether a call or the push loop read it."""
        self.received(raw)
        self.last_frame = time.monotonic()
        self.on_frame()
        try:
            messages = parse_frame(raw)
        except ValueError as err:
            self.reject(f"malformed frame: {err}")
            return []
        responses = []
        notes = sum(isinstance(msg, Notification) for msg in messages)
        share = len(raw) // notes if notes else 0
        for msg in messages:
            if isinstance(msg, Notification):
                if len(self.pending) >= MAX_PENDING or self.pending_bytes > MAX_PENDING_BYTES:
                    raise SourceError("too many pushes held during a call")
                self.pending.append(msg)
                self._sizes.append(share)
                self.pending_bytes += share
            elif isinstance(msg, Response):
                responses.append(msg)
        return responses
