"""Test helpers: a real WebSocket test source plugin, a real webhook receiver, waits."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import tomli_w
import websockets
from aiohttp import web
from anyio.abc import TaskStatus
from hypothesis import strategies as st
from websockets.asyncio.server import ServerConnection

import tocsin_builtin
from tocsin import (
    Backoff,
    Emulator,
    Event,
    FrameParser,
    Secret,
    Source,
    SourceAuthError,
    SourceConfig,
    WebSocketEmulator,
    hookimpl,
)
from tocsin.daemon import Daemon
from tocsin.plugins import Registry, build_registry, make_plugin_manager


async def wait_for(
    condition: Callable[[], Any], within: float = 10.0, what: str = "condition"
) -> Any:
    """Poll ``condition`` until it is truthy; fail after ``within`` seconds."""
    deadline = time.monotonic() + within
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within}s waiting for {what}")
        await anyio.sleep(0.01)


# -- a tiny push server and its source plugin ------------------------------------------


class PushServer(WebSocketEmulator):
    """A WebSocket server on 127.0.0.1 that pushes JSON frames to every connected client."""

    name = "testpush"
    path = "/feed"

    def __init__(self, host: str = "127.0.0.1", port: int = 0, token: str = "s3cret-token") -> None:
        super().__init__(host, port)
        self.token = token
        self.clients: set[ServerConnection] = set()
        self.connections = 0
        self.refused = 0

    def demo_source(self) -> dict[str, Any]:
        return {"plugin": "testpush", "url": self.url, "token": self.token}

    async def demo_traffic(self) -> None:
        n = 0
        while True:
            n += 1
            await self.push(
                {"id": f"demo{n}", "type": "transfer", "data": {"args": {"to": "me", "n": n}}}
            )
            await anyio.sleep(0.05)

    async def handle(self, ws: ServerConnection) -> None:
        if ws.request is None or ws.request.headers.get("Authorization") != f"Bearer {self.token}":
            self.refused += 1
            await ws.send(json.dumps({"error": "forbidden"}))
            await ws.close(4003, "forbidden")
            return
        self.connections += 1
        self.clients.add(ws)
        try:
            await ws.wait_closed()
        finally:
            self.clients.discard(ws)

    async def push(self, frame: dict[str, Any] | str) -> None:
        text = frame if isinstance(frame, str) else json.dumps(frame)
        for ws in list(self.clients):
            await ws.send(text)

    async def drop_all(self) -> None:
        for ws in list(self.clients):
            await ws.close(1011, "dropped by test")


class PushConfig(SourceConfig):
    url: str
    token: Secret


class PushSource(Source):
    """Test source: each frame is {"id", "type", "data", "removed"?}, or {"gap": {...}} for a
    ``source.gap``, {"crash": "why"} to raise, {"print": "text"} to print; reconnects with
    Backoff."""

    name = "testpush"
    Config = PushConfig
    event_types = ("thing", "transfer")

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        config = self.config
        assert isinstance(config, PushConfig)
        backoff = Backoff(initial=0.05, maximum=0.5)
        started = False
        while True:
            try:
                async with websockets.connect(
                    config.url, additional_headers={"Authorization": f"Bearer {config.token.get()}"}
                ) as ws:
                    backoff.connected()
                    await self.ctx.up()
                    if not started:
                        task_status.started()
                        started = True
                    async for raw in ws:
                        if raw == '{"error": "forbidden"}':
                            raise SourceAuthError("the server refused the token")
                        try:
                            frame = json.loads(raw)
                            if "crash" in frame:  # {"crash": "why"}: a bug in the source
                                raise RuntimeError(frame["crash"])
                            if "print" in frame:  # {"print": "text"}: a stray print()
                                print(frame["print"])
                                continue
                            if "gap" in frame:  # {"gap": {"reason", "since", "detail"?}}
                                gap = frame["gap"]
                                await self.ctx.gap(
                                    gap["reason"], gap["since"], detail=gap.get("detail")
                                )
                                continue
                            event = self.ctx.event(
                                frame["type"],
                                frame["data"],
                                id=frame["id"],
                                removed=frame.get("removed", False),
                            )
                        except (ValueError, KeyError, TypeError) as err:
                            self.ctx.reject(f"malformed frame: {err}")
                            continue
                        await self.ctx.emit(event)
            except (OSError, websockets.WebSocketException) as err:
                await self.ctx.down(f"connection lost: {type(err).__name__}")
            else:
                await self.ctx.down("closed by server")
            await anyio.sleep(backoff.delay())


class TestPushPlugin:
    @staticmethod
    @hookimpl
    def register_sources(register: Callable[[type[Source]], None]) -> None:
        register(PushSource)

    @staticmethod
    @hookimpl
    def register_emulators(register: Callable[[type[Emulator]], None]) -> None:
        register(PushServer)


def make_registry(*extra: object) -> Registry:
    """A registry with the built-in plugin, the test source and ``extra`` plugins only."""
    pm = make_plugin_manager([tocsin_builtin, TestPushPlugin(), *extra], load_entry_points=False)
    return build_registry(pm)


# -- where sources run -------------------------------------------------------------------


class _SourceMode:
    processes = False


SOURCE_MODE = _SourceMode()
"""Set by the ``source_processes`` fixture (tests/conftest.py)."""


def daemon_table() -> dict[str, Any]:
    """The ``[daemon]`` table of the end-to-end tests: sources in the daemon's process,
    or each in a process of its own when the ``source_processes`` fixture says so."""
    return {"state_dir": "state", "drain_timeout": "2s", "source_processes": SOURCE_MODE.processes}


def daemon_toml() -> str:
    """``daemon_table()`` as TOML."""
    return tomli_w.dumps({"daemon": daemon_table()})


# -- a real HTTP receiver --------------------------------------------------------------


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    status: int = 200

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Receiver:
    """An aiohttp server on 127.0.0.1 that records requests; ``script`` sets the answers."""

    requests: list[Received] = field(default_factory=list)
    script: list[int] = field(default_factory=list)  # statuses to answer, then 200
    hang: asyncio.Event | None = None
    port: int = 0
    _runner: web.AppRunner | None = None

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        if self.hang is not None:
            await self.hang.wait()
        status = self.script.pop(0) if self.script else 200
        self.requests.append(Received(request.path, dict(request.headers), body, status))
        headers = {"Retry-After": "0"} if status == 429 else {}
        return web.Response(status=status, text="ok" if status < 400 else "nope", headers=headers)

    async def __aenter__(self) -> Receiver:
        app = web.Application()
        app.router.add_route("POST", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.hang is not None:
            self.hang.set()
        assert self._runner is not None
        await self._runner.cleanup()

    def url(self, path: str = "/hook") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def ok(self) -> list[Received]:
        """The requests that were answered with a 2xx."""
        return [r for r in self.requests if 200 <= r.status < 300]


async def until(condition: Callable[[], bool], within: float = 5.0) -> None:
    """Wait for ``condition`` (checked as the loop turns), failing after ``within`` seconds."""
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.005)


@asynccontextmanager
async def running(config: Path, registry: Registry | None = None) -> AsyncIterator[Daemon]:
    """A daemon on ``config`` running in this event loop; stopped cleanly on exit."""
    daemon = Daemon(str(config), registry or make_registry())
    async with anyio.create_task_group() as tg:
        await tg.start(daemon.run)
        try:
            yield daemon
        finally:
            daemon.stop()


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
"""Any JSON-like value (NaN and huge integers included): what a hostile frame may hold."""


def replay_frames(parse: FrameParser, frames: list[str | bytes]) -> tuple[list[Event], list[str]]:
    """The events a plugin's frame parser makes of ``frames``, and the reasons of the
    frames it refused with ``ValueError`` (what ``tocsin test --frames`` reports)."""
    events: list[Event] = []
    malformed: list[str] = []
    for frame in frames:
        try:
            events += parse(frame)
        except ValueError as err:
            malformed.append(str(err))
    return events, malformed


def write_config(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path
