"""Fixtures for the built-in plugins' tests: a real HTTP receiver on 127.0.0.1."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import anyio
import pytest
from aiohttp import web
from multidict import CIMultiDict

from tocsin import Action, Alert


@dataclass(frozen=True)
class Received:
    """One request the receiver got."""

    method: str
    path: str
    query: str
    headers: CIMultiDict[str]
    body: bytes


@dataclass
class Reply:
    """What the receiver answers; ``hang`` holds the answer until ``release()``."""

    status: int = 200
    body: bytes = b"ok"
    headers: Mapping[str, str] = field(default_factory=dict)
    hang: bool = False


class Receiver:
    """A local HTTP server recording every request and answering as scripted."""

    def __init__(self) -> None:
        self.requests: list[Received] = []
        self.reply = Reply()
        self.replies: dict[str, Reply] = {}  # by path, over ``reply``
        self.port = 0
        self._changed = anyio.Event()
        self._released = anyio.Event()
        self._runner: web.AppRunner | None = None

    @property
    def base(self) -> str:
        return f"127.0.0.1:{self.port}"

    def url(self, path: str = "/hook") -> str:
        return f"http://{self.base}{path}"

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.requests.append(
            Received(
                request.method,
                request.path,
                request.query_string,
                CIMultiDict(request.headers),
                body,
            )
        )
        # Wake every waiter, then arm a new event for the next request.
        self._changed.set()
        self._changed = anyio.Event()
        reply = self.replies.get(request.path, self.reply)
        if reply.hang:
            await self._released.wait()
        return web.Response(status=reply.status, body=reply.body, headers=dict(reply.headers))

    def release_once(self) -> None:
        """Let the requests hanging now get their answer; later ones hang again."""
        released, self._released = self._released, anyio.Event()
        released.set()

    async def wait_for_requests(self, count: int) -> list[Received]:
        """Wait until ``count`` requests arrived (failing after 5 seconds)."""
        with anyio.fail_after(5):
            while len(self.requests) < count:
                await self._changed.wait()
        return self.requests

    def respond(
        self,
        status: int = 200,
        body: bytes = b"ok",
        headers: Mapping[str, str] | None = None,
        *,
        hang: bool = False,
        path: str | None = None,
    ) -> None:
        """Answer requests (to ``path`` only, when given) this way from now on."""
        reply = Reply(status, body, dict(headers or {}), hang)
        if path is None:
            self.reply = reply
        else:
            self.replies[path] = reply

    def release(self) -> None:
        """Let every hanging request (and any later one) get its answer."""
        self._released.set()

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=2.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = self._runner.addresses[0][1]

    async def stop(self) -> None:
        self.release()
        if self._runner is not None:
            await self._runner.cleanup()


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    """A started receiver; hanging requests are released before it stops."""
    server = Receiver()
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture
def closed_port() -> int:
    """A port on 127.0.0.1 where nothing listens (bound, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@pytest.fixture
def alert() -> Alert:
    """A typical firing alert."""
    return Alert(
        id="a1b2c3d4e5f60718",
        status="firing",
        rule="incoming transfer",
        title="Received 12.5000 EOS",
        body="from alice to myaccount: rent",
        fired_at="2026-11-22T10:00:00Z",
        event={
            "id": "ev-1",
            "source": "eos",
            "provider": "eospark",
            "type": "action",
            "time": "2026-11-22T10:00:00Z",
            "removed": False,
            "data": {"contract": "eosio.token", "args": {"quantity": "12.5000 EOS"}},
        },
    )


@pytest.fixture
async def started() -> AsyncIterator[Callable[[Any], Awaitable[Any]]]:
    """Start actions for a test; every one started is closed at the end."""
    actions: list[Action] = []

    async def start(action: Action) -> Any:
        await action.start()
        actions.append(action)
        return action

    yield start
    for action in actions:
        await action.aclose()
