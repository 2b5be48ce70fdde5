"""For sources built on websockets: a logger that keeps secrets out, and failure reasons.

websockets logs the request line (query string and all) and every upgrade header at
debug level. ``ScrubbingLogger`` formats each of those lines, masks the headers and query
parameters a provider puts its credentials in, and passes the line through the secret
registry, so even a handler that is not tocsin's own never sees a key.

``failure_reason`` turns what websockets raises into the one-line reason of
``SourceContext.down``; a provider's own cases (an HTTP status meaning "bad key") are
checked by the source first.

``BatchedConnection`` is websockets' client connection with ``recv_batch()``: every
message that arrived with one read, at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import re
from collections import deque
from collections.abc import Iterable
from typing import Any

import orjson
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConcurrencyError, ConnectionClosed, InvalidStatus, InvalidURI
from websockets.frames import CloseCode, Frame, Opcode
from websockets.protocol import Event as WsEvent

from .errors import SourceError
from .fields import format_duration, secret_registry

__all__ = [
    "BatchedConnection",
    "ScrubbingLogger",
    "closed_for_size",
    "failure_reason",
    "parse_json",
    "printable",
]


def parse_json(raw: str | bytes) -> Any:
    """A frame's JSON, or ``ValueError("not JSON")`` (never quoting the frame).

    orjson decodes our frames about three times faster than ``json`` (it reads an integer
    beyond 64 bits as a float); what it refuses but ``json`` reads (``NaN``, ``Infinity``)
    falls back to ``json``.
    """
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        pass
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):  # bad JSON, bad UTF-8, absurd nesting
        raise ValueError("not JSON") from None


class ScrubbingLogger(logging.LoggerAdapter[logging.Logger]):
    """A logger to pass as websockets' ``logger=``, with credentials masked.

    ``headers`` names upgrade headers whose value is masked, ``query`` names query
    parameters whose value is masked; every registered secret is masked as well, in
    whole frames too. A frame containing one of ``hide_frames`` (e.g. ``b'"access_sign"'``
    for a login) is not shown at all.
    """

    def __init__(
        self,
        name: str = "websockets.client",
        *,
        headers: Iterable[str] = (),
        query: Iterable[str] = (),
        hide_frames: Iterable[bytes] = (),
    ) -> None:
        super().__init__(logging.getLogger(name))
        self.headers = frozenset(h.lower() for h in headers)
        self.hide_frames = tuple(hide_frames)
        names = "|".join(re.escape(q) for q in query)
        self._query = re.compile(rf"((?:^|[?&])(?:{names})=)[^&\s#]*", re.I) if names else None

    def _frame(self, frame: Frame) -> Frame:
        if frame.opcode not in (Opcode.TEXT, Opcode.BINARY, Opcode.CONT):
            return frame
        data = bytes(frame.data)
        if any(marker in data for marker in self.hide_frames):
            return dataclasses.replace(frame, data=b"(hidden: it carries credentials)")
        text = data.decode("utf-8", "replace")
        scrubbed = self.scrub(text)
        return frame if scrubbed == text else dataclasses.replace(frame, data=scrubbed.encode())

    def scrub(self, text: str) -> str:
        """``text`` with the configured query parameters and every registered secret masked."""
        if self._query is not None:
            text = self._query.sub(r"\1***", text)
        return secret_registry.scrub(text)

    def log(self, level: int, msg: object, *args: object, **kwargs: Any) -> None:
        if not self.isEnabledFor(level):
            return
        # websockets logs a header as ("> %s: %s", name, value).
        if len(args) == 2 and isinstance(args[0], str) and args[0].lower() in self.headers:
            args = (args[0], "***")
        # And a frame as ("> %s", frame), shortened to its start and end when formatted: a
        # secret cut in two would escape, so frames are scrubbed whole, before that.
        args = tuple(self._frame(a) if isinstance(a, Frame) else a for a in args)
        text = str(msg) % args if args else str(msg)
        kwargs.setdefault("stacklevel", 2)  # the record names websockets' line, not this one
        self.logger.log(level, "%s", self.scrub(text), **kwargs)


def printable(text: str, limit: int = 100) -> str:
    """``text`` cut to ``limit`` characters, without control characters (server-chosen text)."""
    return "".join(ch for ch in text[:limit] if ch.isprintable())


def closed_for_size(err: BaseException) -> bool:
    """Whether websockets closed the connection because a frame exceeded ``max_size``.

    Not when the server closed with 1009 first (our request was too big for it): the
    close we sent then is only its echo."""
    return (
        isinstance(err, ConnectionClosed)
        and err.sent is not None
        and err.sent.code == CloseCode.MESSAGE_TOO_BIG
        and not (err.rcvd is not None and err.rcvd_then_sent)
    )


def failure_reason(err: BaseException, *, open_timeout: float | None = None) -> str:
    """Why a connection failed, in one line, for ``SourceContext.down``.

    Never includes the URL (it may carry a credential) nor more than a short, printable
    piece of what the server said; secrets are scrubbed.
    """
    if isinstance(err, SourceError):
        reason = str(err)
    elif isinstance(err, InvalidStatus):
        reason = f"the WebSocket handshake was answered with HTTP {err.response.status_code}"
    elif closed_for_size(err):
        reason = "a frame over the size limit closed the connection"
    elif isinstance(err, ConnectionClosed):
        close = err.rcvd or err.sent
        if close is None:
            reason = "connection lost"
        else:
            said = printable(close.reason)
            reason = f"connection closed ({' '.join(filter(None, [str(int(close.code)), said]))})"
    elif isinstance(err, InvalidURI):
        reason = "invalid URL"
    elif isinstance(err, TimeoutError):
        within = f" within {format_duration(open_timeout)}" if open_timeout else ""
        reason = f"no answer{within}"
    elif isinstance(err, OSError) and err.strerror:
        reason = f"cannot connect: {err.strerror}"
    else:
        reason = f"{type(err).__name__}: {printable(str(err), 200)}"
    return secret_registry.scrub(reason)


BATCH = 128
"""Messages ``recv_batch`` returns at most: a source yields to the event loop between."""

MAX_FRAGMENTS = int(os.environ.get("WEBSOCKETS_MAX_FRAGMENTS", "4096"))
"""Frames one message may come in (websockets' own limit, and its environment variable):
beyond, the connection fails."""

_DATA = (Opcode.TEXT, Opcode.BINARY, Opcode.CONT)


def _wake(waiter: asyncio.Future[None] | None) -> None:
    """Wake a waiting ``recv_batch`` (a message came, the connection closed, time is up)."""
    if waiter is not None and not waiter.done():
        waiter.set_result(None)


class BatchedConnection(ClientConnection):
    """websockets' asyncio client connection, whose messages are taken a read at a time.

    Pass it as ``connect(..., create_connection=BatchedConnection)``; then receive with
    ``recv_batch()`` (not ``recv()``). The handshake, keepalive pings, closing, ``max_size``
    and the logger are websockets' own; only the messages go another way. websockets puts
    each frame in a queue and ``recv()`` takes one message from it, a coroutine and a
    wake-up each: a third of the floor's CPU per frame in ``make bench``. Here the frames
    of a read become whole messages at once (text decoded to ``str``, binary as
    ``bytes``, as ``recv()`` gives them), and ``recv_batch()`` takes what is there,
    waiting only when nothing is. Flow control is websockets': reading pauses while more
    than ``max_queue`` messages wait.

    A text message that is not UTF-8, or one in more than ``MAX_FRAGMENTS`` frames,
    fails the connection as websockets does (close code 1007, 1009).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._messages: deque[str | bytes] = deque()
        self._parts: list[bytes] = []
        self._text = False  # the message in ``_parts`` is text
        self._failing = False
        self._waiter: asyncio.Future[None] | None = None
        self._reading_paused = False
        self._closing = False  # close() was called: what arrives now is not read
        self._high: int | None = None  # websockets' max_queue, as its queue reads it
        self._low: int | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def ready(self) -> int:
        """How many messages ``recv_batch`` would return without waiting (before ``limit``)."""
        return len(self._messages)

    async def recv_batch(
        self, limit: int = BATCH, *, within: float | None = None
    ) -> list[str | bytes]:
        """The messages received so far (``limit`` at most), oldest first, waiting for one
        if there is none; ``ConnectionClosed`` once the connection is closed and every
        message was taken. Cancelling it loses nothing. One caller at a time
        (``ConcurrencyError``, as websockets' ``recv()``).

        ``within`` (seconds) bounds the wait: ``[]`` when nothing came in time. Messages
        already received come at once, with no timer set (a deadline set per read was a
        tenth of the event loop's time in make bench), and a deadline never interrupts
        the handling of a batch, as a cancel scope around the whole loop would."""
        if limit < 1:
            raise ValueError("limit must be at least 1")
        messages = self._messages
        deadline = None if within is None else self.loop.time() + within
        while not messages:
            if self.connection_lost_waiter.done():
                raise self.protocol.close_exc
            if deadline is not None and self.loop.time() >= deadline:
                return []
            if self._waiter is not None:
                raise ConcurrencyError("recv_batch() is already waiting")
            waiter = self._waiter = self.loop.create_future()
            timer = None if deadline is None else self.loop.call_at(deadline, _wake, waiter)
            try:
                await waiter
            finally:
                self._waiter = None
                if timer is not None:
                    timer.cancel()
        if len(messages) <= limit:
            batch = list(messages)
            messages.clear()
        else:
            batch = [messages.popleft() for _ in range(limit)]
        if self._reading_paused and len(messages) <= (self._low or 0):
            self._reading_paused = False
            self.transport.resume_reading()
        return batch

    async def close(self, code: int = CloseCode.NORMAL_CLOSURE, reason: str = "") -> None:
        """websockets' ``close()``, reading again if a backlog had paused reading: the
        server's close frame must be read for the closing handshake to end (else it
        waits out ``close_timeout``, and the server's side waits for us). Messages that
        arrive from now on are dropped; those already received stay readable."""
        self._closing = True
        if self._reading_paused:
            self._reading_paused = False
            self.transport.resume_reading()
        await super().close(code, reason)

    async def recv(self, decode: bool | None = None) -> Any:
        raise TypeError("a BatchedConnection is read with recv_batch()")

    def recv_streaming(self, decode: bool | None = None) -> Any:
        raise TypeError("a BatchedConnection is read with recv_batch()")

    # -- websockets' callbacks ---------------------------------------------------------

    def process_event(self, event: WsEvent) -> None:
        if self.response is None or not isinstance(event, Frame) or event.opcode not in _DATA:
            super().process_event(event)  # the handshake's response, control frames
            return
        if self._failing or self._closing:
            return
        if event.opcode is not Opcode.CONT:
            self._text = event.opcode is Opcode.TEXT
        if event.fin and not self._parts:
            data = bytes(event.data)
        else:
            self._parts.append(bytes(event.data))
            if len(self._parts) > MAX_FRAGMENTS:
                self._fail(CloseCode.MESSAGE_TOO_BIG, "too many fragments")
                return
            if not event.fin:
                return
            data = b"".join(self._parts)
            self._parts = []
        if self._text:
            try:
                message: str | bytes = data.decode()
            except UnicodeDecodeError as err:
                self._fail(CloseCode.INVALID_DATA, f"{err.reason} at position {err.start}")
                return
        else:
            message = data
        self._messages.append(message)
        _wake(self._waiter)
        high = self._high
        if high is not None and len(self._messages) > high and not self._reading_paused:
            self._reading_paused = True
            self.transport.pause_reading()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._high, self._low = self.recv_messages.high, self.recv_messages.low

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        _wake(self._waiter)  # recv_batch raises ConnectionClosed once it is empty

    def _fail(self, code: CloseCode, reason: str) -> None:
        """Fail the connection as websockets' ``recv()`` does (what came after is dropped)."""
        self._failing = True
        self._parts = []

        async def fail() -> None:
            # As recv() does; send_context() raises ConnectionClosed once the connection
            # is closed (by then, or by the close timeout): the end this task is for.
            with contextlib.suppress(ConnectionClosed):
                async with self.send_context():
                    self.protocol.fail(code, reason)

        task = self.loop.create_task(fail())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
