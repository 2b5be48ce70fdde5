"""The webhook's HTTP/1.1 client: keep-alive connections to one origin, POST only.

Parsing is httptools' (llhttp, the parser of Node.js, in C): status line, headers, chunked
and ``Content-Length`` bodies, keep-alive. Around it this module holds only what one
webhook needs: the request bytes (``request_head``, pure), a pool of at most ``limit``
connections, a total deadline per request, and bounds on what a response may send.

Why not aiohttp's client (which tocsin used before): a webhook POST cost 260-310 us of CPU
there against 140-160 us here, measured sequentially against the same local server, and
the POST was the largest part of what the event loop spends on an alert (``make bench``,
docs/performance.md).

A connection the server closed while idle is dropped before it is reused. A request
that fails after it was written (the server closed at the same moment) is not sent again
here: the delivery fails as retryable, and the outbox retries it with the same
``Idempotency-Key``.
"""

from __future__ import annotations

import asyncio
import base64
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import quote, unquote, urlsplit

import httptools

MAX_HEAD = 64 * 1024
"""The most bytes of status line and headers a response may send."""
BODY_KEPT = 64 * 1024
"""The most bytes of a response body kept (to quote it); beyond, the connection closes."""
IDLE_KEPT = 15.0
"""Seconds after which an idle connection is not reused (it is closed instead)."""


class BadResponse(ConnectionError):
    """The server's answer is not HTTP/1.x, or breaks a bound (``MAX_HEAD``)."""


class InvalidURL(ValueError):
    """The URL cannot be turned into a request (its message never quotes it)."""


@dataclass(frozen=True, slots=True)
class Answer:
    """A response: its status, its ``Retry-After`` header, the first ``BODY_KEPT`` bytes."""

    status: int
    retry_after: str | None
    body: bytes


@dataclass(frozen=True, slots=True)
class Origin:
    """Where requests go and the part of their head that never changes."""

    host: str
    port: int
    tls: bool
    head: bytes  # "POST <target> HTTP/1.1", Host, Authorization, the fixed headers


def parse_url(url: str, headers: Mapping[str, str]) -> Origin:
    """The ``Origin`` of ``url``; ``headers`` go into every request after Host.

    Credentials in the URL become a Basic ``Authorization`` header, as browsers and
    aiohttp do. Non-ASCII characters in the path and query are percent-encoded, a
    non-ASCII host name IDNA-encoded.
    """
    try:
        parts = urlsplit(url)
        port = parts.port
        host = parts.hostname or ""
        if parts.scheme not in ("http", "https") or not host:
            raise ValueError
        ascii_host = host if host.isascii() else host.encode("idna").decode("ascii")
    except (ValueError, UnicodeError):
        raise InvalidURL("the URL cannot be used for HTTP") from None
    tls = parts.scheme == "https"
    target = quote(parts.path or "/", safe="/%:@!$&'()*+,;=~-._")
    if parts.query:
        target += "?" + quote(parts.query, safe="/?%:@!$&'()*+,;=~-._")
    name = f"[{ascii_host}]" if ":" in ascii_host else ascii_host
    lines = [f"POST {target} HTTP/1.1", f"Host: {name}" + (f":{port}" if port else "")]
    if parts.username is not None or parts.password is not None:
        user = unquote(parts.username or "")
        password = unquote(parts.password or "")
        token = base64.b64encode(f"{user}:{password}".encode("latin-1", "replace"))
        lines.append("Authorization: Basic " + token.decode("ascii"))
    lines.extend(f"{key}: {value}" for key, value in headers.items())
    head = ("\r\n".join(lines) + "\r\n").encode("utf-8")
    return Origin(ascii_host, port or (443 if tls else 80), tls, head)


def request_head(origin: Origin, headers: Mapping[str, str], length: int) -> bytes:
    """The bytes before a body of ``length`` bytes: the origin's head, then ``headers``.

    Header names and values are the caller's to check (the webhook config refuses line
    breaks in them).
    """
    extra = "".join(f"{key}: {value}\r\n" for key, value in headers.items())
    return origin.head + f"{extra}Content-Length: {length}\r\n\r\n".encode()


class _Connection(asyncio.Protocol):
    """One keep-alive connection: a request written, its answer parsed as it arrives."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.open = True  # false once closed, or once an answer said it closes
        self.complete = True  # the last answer was read to its end (reusable if open)
        self.idle_since = 0.0
        self._waiter: asyncio.Future[Answer] | None = None
        self._reset()

    def _reset(self) -> None:
        self._status = 0
        self._retry_after: str | None = None
        self._body: list[bytes] = []
        self._size = 0
        self._head = 0
        self._head_bytes = 0  # bytes received while the headers had not ended
        self._headers_done = False

    async def exchange(self, data: bytes) -> Answer:
        """Write one request and wait for its answer."""
        assert self.transport is not None
        self._reset()
        self.complete = False
        self._waiter = asyncio.get_running_loop().create_future()
        self.transport.write(data)
        return await self._waiter

    def close(self) -> None:
        self.open = False
        if self.transport is not None:
            self.transport.close()

    # -- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserCallbackError as err:
            cause = err.__context__
            self._fail(cause if isinstance(cause, BadResponse) else BadResponse(str(err)))
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as err:
            self._fail(BadResponse(f"the answer is not HTTP/1.x ({err})"))
        else:
            if 200 <= self._status < 300:
                # A 2xx is a success whatever its body does next (SPEC section 5): do not
                # wait for a body that is slow to come. The connection is kept only if
                # the answer was whole (``complete``).
                self._done()
            elif not self._headers_done:
                # All of it was head. httptools holds a header it has not seen the end of
                # (``on_header`` comes after), so the bound is kept here too.
                self._head_bytes += len(data)
                if self._head_bytes > MAX_HEAD:
                    self._fail(BadResponse(f"the answer's headers exceed {MAX_HEAD // 1024} KiB"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.open = False
        if self._waiter is None or self._waiter.done():
            return
        if self._status >= 200:
            # Headers were complete: a body delimited by the end of the connection, or
            # one cut short. The status is what a delivery needs; keep what came.
            self._done()
            return
        self._waiter.set_exception(
            exc or ConnectionResetError("the server closed the connection before answering")
        )

    # -- httptools callbacks

    def on_message_begin(self) -> None:
        if self._waiter is None or self._waiter.done():
            # An answer nobody asked for: what comes next on this connection cannot be
            # matched to a request any more.
            self.close()

    def on_status(self, status: bytes) -> None:
        self._count(len(status))

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count(len(name) + len(value) + 4)
        if name.lower() == b"retry-after":
            self._retry_after = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        self._headers_done = True
        self._status = self.parser.get_status_code()

    def on_body(self, chunk: bytes) -> None:
        room = BODY_KEPT - self._size
        if room > 0:
            self._body.append(chunk[:room])
        self._size += len(chunk)
        if self._size > BODY_KEPT:
            # The rest is not needed: answer now and drop the connection, not the memory.
            self._done()
            self.close()

    def on_message_complete(self) -> None:
        if self._status < 200:  # 1xx: an interim answer, the final one follows
            self._reset()
            return
        self.complete = True
        if not self.parser.should_keep_alive():
            self.open = False
        self._done()
        if not self.open:
            self.close()

    def _count(self, size: int) -> None:
        self._head += size
        if self._head > MAX_HEAD:
            raise BadResponse(f"the answer's headers exceed {MAX_HEAD // 1024} KiB")

    def _done(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(Answer(self._status, self._retry_after, b"".join(self._body)))

    def _fail(self, err: Exception) -> None:
        if 200 <= self._status < 300:
            self._done()  # a 2xx whose body is broken is still a success
        elif self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(err)
        self.close()


class Pool:
    """Keep-alive connections to ``url``'s origin: at most ``limit``, open or in use."""

    def __init__(self, url: str, *, limit: int, timeout: float, headers: Mapping[str, str]) -> None:
        self._url = url
        self._fixed = dict(headers)
        self._origin: Origin | None = None
        self.timeout = timeout
        self._slots = asyncio.Semaphore(limit)
        self._idle: list[_Connection] = []
        self._busy: set[_Connection] = set()
        self._tls: ssl.SSLContext | None = None

    @property
    def connections(self) -> int:
        """Connections open now (idle or in use)."""
        return sum(c.open for c in self._idle) + len(self._busy)

    async def post(self, body: bytes, headers: Mapping[str, str]) -> Answer:
        """POST ``body``; raises ``TimeoutError``, ``OSError`` (``BadResponse`` among them)
        or ``InvalidURL``."""
        if self._origin is None:
            self._origin = parse_url(self._url, self._fixed)
        data = request_head(self._origin, headers, len(body)) + body
        async with asyncio.timeout(self.timeout), self._slots:
            conn = await self._take()
            self._busy.add(conn)
            try:
                answer = await conn.exchange(data)
            except BaseException:
                conn.close()  # mid-request (timeout, cancel, error): not reusable
                raise
            finally:
                self._busy.discard(conn)
            if conn.open and conn.complete:
                conn.idle_since = asyncio.get_running_loop().time()
                self._idle.append(conn)
            else:
                conn.close()  # its answer is still coming (a slow 2xx body): not reusable
            return answer

    async def _take(self) -> _Connection:
        now = asyncio.get_running_loop().time()
        while self._idle:
            conn = self._idle.pop()
            if conn.open and now - conn.idle_since < IDLE_KEPT:
                return conn
            conn.close()
        return await self._connect()

    async def _connect(self) -> _Connection:
        assert self._origin is not None
        origin = self._origin
        tls: ssl.SSLContext | None = None
        if origin.tls:
            if self._tls is None:
                self._tls = ssl.create_default_context()
            tls = self._tls
        loop = asyncio.get_running_loop()
        # Happy Eyeballs (RFC 8305), as aiohttp does: a name with a dead IPv6 route still
        # connects over IPv4 within a quarter second instead of waiting out the timeout.
        _, conn = await loop.create_connection(
            _Connection,
            origin.host,
            origin.port,
            ssl=tls,
            server_hostname=origin.host if tls else None,
            happy_eyeballs_delay=0.25,
        )
        return conn

    async def aclose(self) -> None:
        """Close every connection (one in use fails its request)."""
        for conn in [*self._idle, *self._busy]:
            conn.close()
        self._idle.clear()
