"""Fixtures for the ckex tests: recorded frames, the registry, a source run against an emulator."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import pytest
import tocsin_ckex
from tocsin_ckex.emulator import CkexEmulator
from tocsin_ckex.protocol import Market
from tocsin_ckex.source import CkexSource
from websockets.asyncio.client import ClientConnection

from tocsin.testing import RecordingContext, Registry, build_registry, make_plugin_manager

FIXTURES = Path(__file__).parent / "fixtures"
SB = Market("sportsbook", "40789105-e", "219_33753655")
FANCY = Market("fancy", "44914246-e", "878_55854706_f")
QUIET: dict[str, Any] = {"quote_interval": 60.0, "alive_interval": 60.0}  # frames on demand only

Body = Callable[[CkexSource, RecordingContext], Awaitable[None]]
RunSource = Callable[..., Awaitable[tuple[CkexSource, RecordingContext]]]


def fixture_text(name: str) -> str:
    return (FIXTURES / name).read_text(encoding="utf-8")


def fixture_json(name: str) -> Any:
    return json.loads(fixture_text(name))


async def recv(ws: ClientConnection) -> dict[str, Any]:
    """The next frame a plain client gets, as JSON (within 5 s)."""
    with anyio.fail_after(5):
        frame = json.loads(await ws.recv())
    assert isinstance(frame, dict)
    return frame


def settings(emu: CkexEmulator, **extra: Any) -> dict[str, Any]:
    """A source's settings for ``emu``: SB and FANCY, a 1 s backoff."""
    return {
        "url": emu.url,
        "token": emu.token(),
        "markets": [
            {"kind": "sportsbook", "event_id": SB.event_id, "market_id": SB.market_id},
            {"kind": "fancy", "event_id": FANCY.event_id, "market_id": FANCY.market_id},
        ],
        "max_backoff": 1,
        **extra,
    }


@pytest.fixture
def registry() -> Registry:
    return build_registry(make_plugin_manager([tocsin_ckex], load_entry_points=False))


@pytest.fixture
def run_source(registry: Registry) -> RunSource:
    """Run the registered ckex source with ``settings`` while ``body`` runs, then cancel it.

    ``started=True`` waits for the source's first subscription before ``body``.
    """

    async def run(
        settings: dict[str, Any],
        body: Body,
        *,
        started: bool = True,
        within: float = 10.0,
        ctx: RecordingContext | None = None,
    ) -> tuple[CkexSource, RecordingContext]:
        cls = registry.source("ckex")
        config = cls.Config.model_validate({"plugin": "ckex", **settings})
        ctx = ctx or RecordingContext("odds", "ckex")
        source = cls(config, ctx)
        assert isinstance(source, CkexSource)
        with anyio.fail_after(within):
            async with anyio.create_task_group() as tg:
                if started:
                    await tg.start(source.run)
                else:
                    tg.start_soon(source.run)
                await body(source, ctx)
                tg.cancel_scope.cancel()
        return source, ctx

    return run
