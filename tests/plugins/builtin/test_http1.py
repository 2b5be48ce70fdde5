"""The webhook's HTTP/1.1 client against a scripted HTTP server on 127.0.0.1.

The server speaks raw bytes, so each test can answer the way some real server does: keep
the connection, close it, chunk the body, send too much or send garbage.
"""

from __future__ import annotations

import asyncio
import base64
import re
import socket
import ssl
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from support import until
from tocsin_builtin.http1 import (
    BODY_KEPT,
    MAX_HEAD,
    Answer,
    BadResponse,
    InvalidURL,
    Pool,
    parse_url,
    request_head,
)

NO_CONTENT = b"HTTP/1.1 204 No Content\r\n\r\n"
CLOSE = b""  # in a script: close the connection instead of answering
HANG = None  # in a script: never answer; wait for the client to close


class Server:
    """An HTTP/1.1 server answering each request with the next scripted bytes (then 204)."""

    def __init__(self, context: ssl.SSLContext | None = None) -> None:
        self.script: list[bytes | None] = []
        self.requests: list[bytes] = []
        self.connections = 0
        self.hung_up = 0  # connections the client closed while waiting for an answer
        self.writers: list[asyncio.StreamWriter] = []
        self.context = context
        self.port = 0
        self._server: asyncio.Server | None = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.writers.append(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = re.search(rb"(?i)\r\ncontent-length: (\d+)\r\n", head)
                body = await reader.readexactly(int(length.group(1)) if length else 0)
                self.requests.append(head + body)
                answer = self.script.pop(0) if self.script else NO_CONTENT
                if answer is HANG:
                    await reader.read()  # returns at the client's close
                    self.hung_up += 1
                    break
                if not answer:
                    break
                writer.write(answer)
                await writer.drain()
                if b"connection: close" in answer.lower():
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def __aenter__(self) -> Server:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self.context)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        for writer in self.writers:
            writer.close()
        self._server.close()

    def url(self, path: str = "/hook") -> str:
        scheme = "https" if self.context else "http"
        return f"{scheme}://127.0.0.1:{self.port}{path}"


@pytest.fixture
async def server() -> AsyncIterator[Server]:
    async with Server() as running:
        yield running


@pytest.fixture
async def make(server: Server) -> AsyncIterator[Callable[..., Pool]]:
    pools: list[Pool] = []

    def build(url: str | None = None, limit: int = 4, timeout: float = 5.0) -> Pool:
        pools.append(Pool(url or server.url(), limit=limit, timeout=timeout, headers={}))
        return pools[-1]

    yield build
    for pool in pools:
        await pool.aclose()


# -- requests (pure) -------------------------------------------------------------------


def test_request_head_has_host_length_and_headers_in_order() -> None:
    origin = parse_url("http://127.0.0.1:8080/in/x?k=v&a=b", {"User-Agent": "tocsin/1"})
    head = request_head(origin, {"Content-Type": "application/json", "X-A": "1"}, 12)
    assert head == (
        b"POST /in/x?k=v&a=b HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nUser-Agent: tocsin/1\r\n"
        b"Content-Type: application/json\r\nX-A: 1\r\nContent-Length: 12\r\n\r\n"
    )
    assert (origin.host, origin.port, origin.tls) == ("127.0.0.1", 8080, False)


def test_urls_become_origins() -> None:
    https = parse_url("https://hooks.example.com", {})
    assert (https.host, https.port, https.tls) == ("hooks.example.com", 443, True)
    assert https.head.startswith(b"POST / HTTP/1.1\r\nHost: hooks.example.com\r\n")
    v6 = parse_url("http://[::1]:9000/x", {})
    assert v6.host == "::1" and b"\r\nHost: [::1]:9000\r\n" in v6.head
    # Non-ASCII: the host IDNA-encoded, the path and query percent-encoded; escapes kept.
    intl = parse_url("http://bücher.example/ä%20b?q=ü", {})
    assert intl.host == "xn--bcher-kva.example"
    assert intl.head.startswith(b"POST /%C3%A4%20b?q=%C3%BC HTTP/1.1\r\n")


def test_credentials_in_the_url_become_basic_auth() -> None:
    origin = parse_url("http://us%40er:p%3Ass@127.0.0.1/", {})
    token = base64.b64encode(b"us@er:p:ss").decode()
    assert f"\r\nAuthorization: Basic {token}\r\n".encode() in origin.head
    assert b"us%40er" not in origin.head.split(b"\r\n")[1]  # the Host line has no userinfo


def test_an_unusable_url_is_refused_without_quoting_it() -> None:
    for url in ("ftp://127.0.0.1/", "http:///path", "http://bü..cher/"):
        with pytest.raises(InvalidURL) as caught:
            parse_url(url, {})
        assert url not in str(caught.value)


# -- answers ---------------------------------------------------------------------------


async def test_connections_are_kept_alive_and_reused(
    server: Server, make: Callable[..., Pool]
) -> None:
    pool = make()
    for i in range(3):
        assert await pool.post(b'{"n": %d}' % i, {}) == Answer(204, None, b"")
    assert server.connections == 1 and len(server.requests) == 3
    assert server.requests[2].endswith(b'\r\nContent-Length: 8\r\n\r\n{"n": 2}')


async def test_a_connection_the_server_closes_is_not_reused(
    server: Server, make: Callable[..., Pool]
) -> None:
    pool = make()
    server.script = [b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok"]
    assert await pool.post(b"1", {}) == Answer(200, None, b"ok")
    assert await pool.post(b"2", {}) == Answer(204, None, b"")
    assert server.connections == 2
    # Closed while idle (the server's keep-alive timeout): the next request reconnects.
    server.writers[-1].close()
    await until(lambda: pool.connections == 0)
    assert await pool.post(b"3", {}) == Answer(204, None, b"")
    assert server.connections == 3


async def test_chunked_bodies_and_retry_after_are_read(
    server: Server, make: Callable[..., Pool]
) -> None:
    pool = make()
    server.script = [
        b"HTTP/1.1 503 Busy\r\nRetry-After: 120\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nslow \r\n4\r\ndown\r\n0\r\n\r\n",
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 202 Accepted\r\nContent-Length: 0\r\n\r\n",
    ]
    assert await pool.post(b"x", {}) == Answer(503, "120", b"slow down")
    assert await pool.post(b"x", {}) == Answer(202, None, b"")  # an interim 1xx is skipped
    assert server.connections == 1


async def test_an_answer_nobody_asked_for_drops_the_connection(
    server: Server, make: Callable[..., Pool]
) -> None:
    pool = make()
    server.script = [NO_CONTENT + b"HTTP/1.1 500 Stray\r\nContent-Length: 0\r\n\r\n"]
    assert await pool.post(b"1", {}) == Answer(204, None, b"")
    await until(lambda: pool.connections == 0)
    assert await pool.post(b"2", {}) == Answer(204, None, b"")
    assert server.connections == 2


async def test_a_body_ended_by_the_close_is_complete(
    server: Server, make: Callable[..., Pool]
) -> None:
    server.script = [b"HTTP/1.1 200 OK\r\n\r\nuntil the end", CLOSE]
    task = asyncio.ensure_future(make().post(b"x", {}))
    await until(lambda: len(server.writers) == 1 and len(server.script) == 1)
    server.writers[0].close()
    assert await task == Answer(200, None, b"until the end")


async def test_a_huge_body_is_cut_and_its_connection_dropped(
    server: Server, make: Callable[..., Pool]
) -> None:
    pool = make()
    size = 4 * BODY_KEPT
    server.script = [b"HTTP/1.1 500 Oops\r\nContent-Length: %d\r\n\r\n" % size + b"e" * size]
    answer = await pool.post(b"x", {})
    assert answer.status == 500 and answer.body == b"e" * BODY_KEPT
    assert await pool.post(b"x", {}) == Answer(204, None, b"")
    assert server.connections == 2


@pytest.mark.parametrize(
    ("answer", "message"),
    [
        (b"SSH-2.0-OpenSSH_9.2\r\n\r\n", "the answer is not HTTP/1.x"),
        (b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * MAX_HEAD + b"\r\n\r\n", "exceed 64 KiB"),
        # A header that never ends (httptools holds it whole until it does).
        (b"HTTP/1.1 500 Oops\r\nX-Endless: " + b"a" * 4 * MAX_HEAD, "exceed 64 KiB"),
        (CLOSE, "closed the connection before answering"),
    ],
)
async def test_a_bad_answer_is_an_os_error_and_drops_the_connection(
    server: Server, make: Callable[..., Pool], answer: bytes, message: str
) -> None:
    pool = make()
    server.script = [answer]
    with pytest.raises(OSError, match=message) as caught:
        await pool.post(b"x", {})
    assert isinstance(caught.value, BadResponse) or answer is CLOSE
    assert await pool.post(b"x", {}) == Answer(204, None, b"")  # a fresh connection
    assert server.connections == 2


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789",  # the rest never comes
        b"HTTP/1.1 202 Accepted\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nbad\r\n",
    ],
)
async def test_a_2xx_is_a_success_whatever_its_body_does(
    server: Server, make: Callable[..., Pool], answer: bytes
) -> None:
    pool = make(timeout=2.0)
    server.script = [answer]
    answer = await pool.post(b"x", {})
    assert answer.status in (200, 202)
    assert pool.connections == 0  # the answer was not whole: its connection is not reused
    assert await pool.post(b"x", {}) == Answer(204, None, b"")
    assert server.connections == 2


async def test_a_request_without_an_answer_times_out_and_is_not_reused(
    server: Server, make: Callable[..., Pool]
) -> None:
    pool = make(timeout=0.2)
    server.script = [HANG]
    with pytest.raises(TimeoutError):
        await pool.post(b"x", {})
    assert pool.connections == 0
    await until(lambda: server.hung_up == 1)  # closed, not left open
    assert await pool.post(b"x", {}) == Answer(204, None, b"")
    assert server.connections == 2


async def test_the_pool_holds_at_most_limit_connections(
    server: Server, make: Callable[..., Pool]
) -> None:
    pool = make(limit=2)
    server.script = [HANG, HANG]
    posts = [asyncio.ensure_future(pool.post(b"%d" % i, {})) for i in range(3)]
    await until(lambda: len(server.requests) == 2)
    assert pool.connections == 2 and server.connections == 2
    assert not any(p.done() for p in posts)
    await pool.aclose()  # the hanging two fail, which frees a slot for the third
    await until(lambda: all(p.done() for p in posts))
    assert [isinstance(p.exception(), OSError) for p in posts[:2]] == [True, True]
    assert posts[2].result() == Answer(204, None, b"")
    assert server.connections == 3


async def test_a_cancelled_request_closes_its_connection(
    server: Server, make: Callable[..., Pool]
) -> None:
    pool = make()
    server.script = [HANG]
    task = asyncio.ensure_future(pool.post(b"x", {}))
    await until(lambda: len(server.requests) == 1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert pool.connections == 0
    await until(lambda: server.hung_up == 1)


async def test_a_dead_address_of_the_name_does_not_hold_up_the_others(
    server: Server, make: Callable[..., Pool], monkeypatch: pytest.MonkeyPatch
) -> None:
    # "dual.test" resolves to an IPv6 address that never answers (a listener whose
    # accept queue is full drops every new SYN) and then to the server on IPv4.
    with socket.socket(socket.AF_INET6) as dead, socket.socket(socket.AF_INET6) as filler:
        try:
            dead.bind(("::1", 0))
        except OSError:
            pytest.skip("this machine has no IPv6 loopback")
        dead.listen(0)
        filler.connect(dead.getsockname())  # fills the queue: nobody ever accepts
        loop = asyncio.get_running_loop()
        answers = [
            (socket.AF_INET6, socket.SOCK_STREAM, 6, "", dead.getsockname()),
            (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", server.port)),
        ]

        async def resolve(host: str, *args: object, **kwargs: object) -> list[Any]:
            assert host == "dual.test"
            return answers

        monkeypatch.setattr(loop, "getaddrinfo", resolve)
        started = time.monotonic()
        pool = make(f"http://dual.test:{server.port}/hook", timeout=5.0)
        assert await pool.post(b"x", {}) == Answer(204, None, b"")
        assert time.monotonic() - started < 2.0  # not the SYN retries to the dead one
        assert server.requests[0].startswith(b"POST /hook HTTP/1.1\r\nHost: dual.test:")


# -- TLS -------------------------------------------------------------------------------


@pytest.fixture
async def tls_server(server_tls: ssl.SSLContext) -> AsyncIterator[Server]:
    async with Server(server_tls) as running:
        yield running


async def test_https_verifies_the_certificate(
    tls_server: Server, make: Callable[..., Pool]
) -> None:
    with pytest.raises(ssl.SSLCertVerificationError, match="self-signed certificate"):
        await make(tls_server.url()).post(b"x", {})
    assert tls_server.requests == []


async def test_https_posts_once_the_certificate_is_trusted(
    tls_server: Server,
    make: Callable[..., Pool],
    self_signed: tuple[Path, Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SSL_CERT_FILE", str(self_signed[0]))
    pool = make(tls_server.url())
    assert await pool.post(b"x", {}) == Answer(204, None, b"")
    assert await pool.post(b"y", {}) == Answer(204, None, b"")
    assert tls_server.connections == 1
