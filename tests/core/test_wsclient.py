"""tocsin.wsclient: the scrubbing logger for websockets, the failure reasons, and the
batched connection."""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio
import pytest
from websockets.asyncio.client import connect
from websockets.asyncio.server import ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConcurrencyError, ConnectionClosed, InvalidStatus, InvalidURI
from websockets.frames import Close, CloseCode
from websockets.http11 import Response

from support import until
from tocsin import BatchedConnection, ScrubbingLogger, SecretValue, SourceAuthError, failure_reason
from tocsin.fields import resolve_secret_refs
from tocsin.wsclient import BATCH, closed_for_size, printable


def test_scrubbing_logger_masks_headers_query_and_secrets(
    caplog: pytest.LogCaptureFixture,
) -> None:
    SecretValue("registered-s3cret")
    logger = ScrubbingLogger("tocsin.test.ws", headers=["ApiKey"], query=["token", "apikey"])
    with caplog.at_level(logging.DEBUG, logger="tocsin.test.ws"):
        logger.debug("> GET %s HTTP/1.1", "/ws?x=1&token=abc.def&apikey=k3y#frag")
        logger.debug("> %s: %s", "apikey", "header-value-1")
        logger.debug("> %s: %s", "Host", "127.0.0.1")
        logger.debug("< TEXT %s", '{"auth": "registered-s3cret"}')
        logger.info("not shown at %s", "debug only")  # enabled too: same line rules
    text = caplog.text
    for leaked in ("abc.def", "k3y", "header-value-1", "registered-s3cret"):
        assert leaked not in text
    assert "/ws?x=1&token=***&apikey=***#frag" in text
    assert "> apikey: ***" in text
    assert "> Host: 127.0.0.1" in text
    # The record points at the caller (websockets), not at the adapter.
    assert {r.filename for r in caplog.records} == {"test_wsclient.py"}


def test_a_secret_url_is_scrubbed_by_its_parts_too(caplog: pytest.LogCaptureFixture) -> None:
    # A source whose whole url is a secret ({ env = "..." }): websockets logs the request
    # line (path and query), Apprise and urllib3 the path, none of them the whole URL.
    problems: list[str] = []
    resolve_secret_refs(
        {"url": {"env": "U"}, "hook": {"env": "H"}},
        lambda path, error: problems.append(str(error)),
        environ={
            "U": "ws://127.0.0.1:9/gvite/ws?apikey=QUERYSECRET99&x=yes",
            "H": "json://me:pa%24%24word-77@127.0.0.1/hook/PATHTOKEN0123456789",
        },
    )
    assert problems == []
    logger = ScrubbingLogger("tocsin.test.ws")  # no query names: the registry alone
    with caplog.at_level(logging.DEBUG, logger="tocsin.test.ws"):
        logger.debug("> GET %s HTTP/1.1", "/gvite/ws?apikey=QUERYSECRET99&x=yes")
        logger.debug("POST %s as %s", "/hook/PATHTOKEN0123456789", "pa$$word-77")
    assert "QUERYSECRET99" not in caplog.text and "PATHTOKEN" not in caplog.text
    assert "pa$$word-77" not in caplog.text
    assert "> GET /gvite/ws?*** HTTP/1.1" in caplog.text  # the query string as a whole


def test_scrubbing_logger_formats_nothing_when_disabled() -> None:
    class Explodes:
        def __str__(self) -> str:
            raise AssertionError("formatted although the level is off")

    logger = ScrubbingLogger("tocsin.test.quiet")
    logger.logger.setLevel(logging.WARNING)
    logger.debug("%s", Explodes())


def _status(code: int) -> InvalidStatus:
    return InvalidStatus(Response(code, "x", Headers()))


@pytest.mark.parametrize(
    ("err", "reason"),
    [
        (SourceAuthError("the server refused the key"), "the server refused the key"),
        (_status(403), "the WebSocket handshake was answered with HTTP 403"),
        (
            ConnectionClosed(None, Close(CloseCode.MESSAGE_TOO_BIG, "too big")),
            "a frame over the size limit closed the connection",
        ),
        (ConnectionClosed(Close(1011, "bye\x1b[31m"), None), "connection closed (1011 bye[31m)"),
        (ConnectionClosed(Close(1000, ""), None), "connection closed (1000)"),
        (ConnectionClosed(None, None), "connection lost"),
        (InvalidURI("ws://x?token=1", "bad"), "invalid URL"),
        (TimeoutError(), "no answer"),
        (ConnectionRefusedError(111, "Connection refused"), "cannot connect: Connection refused"),
        (ValueError("odd"), "ValueError: odd"),
    ],
)
def test_failure_reason(err: Exception, reason: str) -> None:
    assert failure_reason(err) == reason


def test_failure_reason_scrubs_and_says_the_timeout() -> None:
    SecretValue("tok-in-error-9")
    assert failure_reason(ValueError("bad tok-in-error-9")) == "ValueError: bad ***"
    assert failure_reason(TimeoutError(), open_timeout=10) == "no answer within 10s"


def test_closed_for_size_and_printable() -> None:
    assert closed_for_size(ConnectionClosed(None, Close(CloseCode.MESSAGE_TOO_BIG, "")))
    assert not closed_for_size(ConnectionClosed(Close(CloseCode.MESSAGE_TOO_BIG, ""), None))
    # We closed, the server echoed: our limit. The server closed first: its limit (a
    # request of ours too big), not a frame we refused.
    too_big = Close(CloseCode.MESSAGE_TOO_BIG, "")
    assert closed_for_size(ConnectionClosed(too_big, too_big, rcvd_then_sent=False))
    assert not closed_for_size(ConnectionClosed(too_big, too_big, rcvd_then_sent=True))
    assert not closed_for_size(ValueError())
    assert printable("a\nb\x00c" + "d" * 200, 5) == "abc"


def test_parse_json_is_orjson_with_a_fallback_and_one_error() -> None:
    from tocsin import parse_json

    assert parse_json(b'{"a": [1, 2.5, "x"]}') == {"a": [1, 2.5, "x"]}
    assert parse_json('{"n": NaN, "i": Infinity}')["i"] == float("inf")  # json reads these
    for bad in ("{", b"\xff\xfe", "[" * 100_000, ""):
        with pytest.raises(ValueError, match=r"^not JSON$"):
            parse_json(bad)


def test_frames_are_scrubbed_whole_and_login_frames_hidden(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from websockets.frames import Frame, Opcode

    SecretValue("frame-s3cret-value")
    logger = ScrubbingLogger("tocsin.test.frames", hide_frames=[b'"access_sign"'])
    padding = "x" * 200  # websockets shows a long frame's start and end only
    with caplog.at_level(logging.DEBUG, logger="tocsin.test.frames"):
        logger.debug("> %s", Frame(Opcode.TEXT, f"{padding}frame-s3cret-value{padding}".encode()))
        logger.debug("> %s", Frame(Opcode.TEXT, b'{"event":"login","access_sign":"c2ln"}'))
    assert "frame-s3cret" not in caplog.text and "s3cret-value" not in caplog.text
    assert "c2ln" not in caplog.text
    assert "(hidden: it carries credentials)" in caplog.text


def test_transient_secrets_are_scrubbed_and_bounded() -> None:
    from tocsin import register_secret
    from tocsin.fields import secret_registry

    for i in range(100):
        register_secret(f"signature-{i:03d}", transient=True)
    assert secret_registry.scrub("signature-099") == "***"
    assert secret_registry.scrub("signature-000") == "signature-000"  # long expired


# -- BatchedConnection: against a real websockets server on 127.0.0.1 ---------------------


@asynccontextmanager
async def _server(handler: Callable[[ServerConnection], Awaitable[None]]) -> AsyncIterator[str]:
    async with serve(handler, "127.0.0.1", 0) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        yield f"ws://127.0.0.1:{port}/"


async def _batches(ws: BatchedConnection) -> list[list[str | bytes]]:
    """Every batch until the connection closes."""
    out = []
    with pytest.raises(ConnectionClosed):
        while True:
            out.append(await ws.recv_batch())
    return out


async def test_a_batch_holds_whole_messages_in_order_as_recv_gives_them() -> None:
    sent = [f"text {n}" if n % 3 else f"binary {n}".encode() for n in range(300)]

    async def handler(ws: ServerConnection) -> None:
        await ws.recv()  # the client is ready
        for message in sent[:100]:
            await ws.send(message)
        await ws.send(["frag", "mented ", "text"])  # one message in three frames
        await ws.send([b"frag", b"mented ", b"binary"])
        for message in sent[100:]:
            await ws.send(message)

    async with _server(handler) as url, connect(url, create_connection=BatchedConnection) as ws:
        assert isinstance(ws, BatchedConnection)
        await ws.send("go")
        # Everything the server sent waits, unread (reading pauses past max_queue: 16).
        await until(lambda: len(ws._messages) > 16)
        assert not ws.transport.is_reading()
        first = await ws.recv_batch(limit=5)
        assert first == sent[:5]
        batches = [first, *await _batches(ws)]
    received = [m for batch in batches for m in batch]
    assert received == [*sent[:100], "fragmented text", b"fragmented binary", *sent[100:]]
    assert all(len(batch) <= BATCH for batch in batches)
    assert len(batches) < len(received) / 4  # taken a read at a time, not one by one
    with pytest.raises(TypeError, match="recv_batch"):
        await ws.recv()


async def test_a_close_with_a_backlog_ends_the_handshake_at_once() -> None:
    # With reading paused (a backlog past max_queue), the server's close frame was never
    # read: close() waited out close_timeout, and the server's side waited for the client
    # (the eWallet emulator's close hung on it).
    closed = anyio.Event()

    async def handler(ws: ServerConnection) -> None:
        await ws.recv()
        for _ in range(200):  # more than max_queue: the client pauses reading
            await ws.send("x" * 1000)
        with pytest.raises(ConnectionClosed):
            await ws.recv()  # the client's close
        closed.set()

    async with _server(handler) as url:
        ws = await connect(url, create_connection=BatchedConnection, close_timeout=30)
        assert isinstance(ws, BatchedConnection)
        await ws.send("go")
        await until(lambda: len(ws._messages) > 16 and not ws.transport.is_reading())
        kept = len(ws._messages)
        with anyio.fail_after(5):  # far less than close_timeout
            await ws.close()
            await closed.wait()
        assert ws.close_code == CloseCode.NORMAL_CLOSURE
        assert await ws.recv_batch() == ["x" * 1000] * min(kept, BATCH)  # nothing after


async def test_recv_batch_within_bounds_the_wait_only() -> None:
    async def handler(ws: ServerConnection) -> None:
        await ws.recv()
        await ws.send("first")
        await ws.send("second")
        await ws.recv()  # until the client closes

    async with _server(handler) as url, connect(url, create_connection=BatchedConnection) as ws:
        assert isinstance(ws, BatchedConnection)
        assert await ws.recv_batch(within=0.05) == []  # nothing sent yet: time is up
        assert await ws.recv_batch(within=-1) == []
        await ws.send("go")
        await until(lambda: ws.ready == 2)
        assert await ws.recv_batch(within=-1) == ["first", "second"]  # waiting: at once
        assert ws._waiter is None


async def test_a_cancelled_recv_batch_loses_nothing() -> None:
    async def handler(ws: ServerConnection) -> None:
        await ws.recv()
        await ws.send("first")

    async with _server(handler) as url, connect(url, create_connection=BatchedConnection) as ws:
        assert isinstance(ws, BatchedConnection)
        with anyio.move_on_after(0.05):
            await ws.recv_batch()  # nothing was sent yet: cancelled while waiting
        await ws.send("go")
        assert await ws.recv_batch() == ["first"]


@pytest.mark.parametrize(
    ("message", "code"),
    [
        (b"bad utf-8: \xff", CloseCode.INVALID_DATA),
        ([b"x"] * 4097, CloseCode.MESSAGE_TOO_BIG),  # more frames than MAX_FRAGMENTS
    ],
)
async def test_a_bad_text_message_fails_the_connection_as_websockets_does(
    message: bytes | list[bytes], code: CloseCode
) -> None:
    async def handler(ws: ServerConnection) -> None:
        await ws.send("before")
        await ws.send(message, text=True)
        await ws.send("after")  # never delivered: the connection failed first
        await ws.wait_closed()

    async with _server(handler) as url, connect(url, create_connection=BatchedConnection) as ws:
        assert isinstance(ws, BatchedConnection)
        received = [m for batch in await _batches(ws) for m in batch]
    assert received == ["before"]
    close = ws.protocol.close_sent
    assert close is not None and close.code == code


async def test_the_failing_task_ends_quietly_when_the_server_closed_first() -> None:
    # Review of 49eaa4a: send_context() raised ConnectionClosed in the task that fails the
    # connection, and asyncio logged "Task exception was never retrieved" at ERROR.
    async def handler(ws: ServerConnection) -> None:
        await ws.send(b"bad utf-8: \xff", text=True)
        await ws.close()  # before the client's 1007 could go out

    loop = asyncio.get_running_loop()
    reported: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _, context: reported.append(context))
    try:
        async with _server(handler) as url:
            ws = await connect(url, create_connection=BatchedConnection)
            assert isinstance(ws, BatchedConnection)
            assert await _batches(ws) == []
            failing = ws._tasks
            await until(lambda: not failing)
            del ws
            gc.collect()
    finally:
        loop.set_exception_handler(None)
    assert reported == []


async def test_one_reader_at_a_time_and_no_streaming() -> None:
    async def handler(ws: ServerConnection) -> None:
        await ws.recv()
        await ws.send("one")
        await ws.wait_closed()

    async with _server(handler) as url, connect(url, create_connection=BatchedConnection) as ws:
        assert isinstance(ws, BatchedConnection)
        with pytest.raises(TypeError, match="recv_batch"):
            ws.recv_streaming()
        async with anyio.create_task_group() as tg:
            first: list[list[str | bytes]] = []

            async def read() -> None:
                first.append(await ws.recv_batch())

            tg.start_soon(read)
            await until(lambda: ws._waiter is not None)
            # A second reader would have taken the waiter and left the first one waiting
            # for ever (as websockets' recv(), it is refused).
            with pytest.raises(ConcurrencyError):
                await ws.recv_batch()
            await ws.send("go")
        assert first == [["one"]]
        with pytest.raises(ValueError, match="at least 1"):
            await ws.recv_batch(limit=0)
