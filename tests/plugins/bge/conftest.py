"""Fixtures for the bge tests: the emulator on 127.0.0.1 port 0 with BGE's 30 s timers cut
to a fraction of a second, configs, a running source."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest
import tocsin_bge
from tocsin_bge import BGEConfig, BGEEmulator, BGESource

from tocsin.testing import RecordingContext, Registry, build_registry, make_plugin_manager

ACCESS_KEY = "ak-for-tests-5f0e2c"
SECRET_KEY = "sk-for-tests-9d41b7a3"
PAIR = "BTC_USDT"
FIXTURES = Path(__file__).parent / "fixtures"

# BGE's timers (30 s each, pings at an unknown interval) shortened for the tests.
FAST = {
    "ping_interval": 0.1,
    "pong_timeout": 0.6,
    "subscribe_timeout": 0.6,
    "idle_timeout": 0.6,
    "orderbook_interval": 0.1,
}


def fixture_text(name: str) -> str:
    return (FIXTURES / name).read_text(encoding="utf-8")


def fixture_json(name: str) -> Any:
    return json.loads(fixture_text(name))


@pytest.fixture
def registry() -> Registry:
    return build_registry(make_plugin_manager([tocsin_bge], load_entry_points=False))


@pytest.fixture
async def emulator() -> AsyncIterator[BGEEmulator]:
    async with BGEEmulator(keys={ACCESS_KEY: SECRET_KEY}, **FAST) as emu:
        yield emu


def ticker(product: str = PAIR) -> dict[str, Any]:
    return {"biz": "market", "type": "ticker", "product": product}


def make_config(url: str = "ws://127.0.0.1:1/v2/ws", **overrides: Any) -> BGEConfig:
    table: dict[str, Any] = {
        "plugin": "bge",
        "url": url,
        "subscriptions": [ticker()],
        "max_backoff": "1s",
        "stale_after": "2s",
        "keepalive": "200ms",  # under the emulator's 0.6 s idle_timeout
    }
    table.update(overrides)
    return BGEConfig.model_validate(table)


def private_config(url: str, **overrides: Any) -> BGEConfig:
    subscriptions = [{"biz": "exchange", "type": "orders", "product": "all"}, ticker()]
    table: dict[str, Any] = {
        "access_key": ACCESS_KEY,
        "secret_key": SECRET_KEY,
        "subscriptions": subscriptions,
    }
    return make_config(url, **{**table, **overrides})


@asynccontextmanager
async def source_running(
    config: BGEConfig, wait_started: bool = True, ctx: RecordingContext | None = None
) -> AsyncIterator[RecordingContext]:
    """Run a BGESource with a RecordingContext; cancelled on exit."""
    ctx = ctx or RecordingContext("market", "bge")
    async with anyio.create_task_group() as tg:
        if wait_started:
            with anyio.fail_after(10):
                await tg.start(BGESource(config, ctx).run)
        else:
            tg.start_soon(BGESource(config, ctx).run)
        try:
            yield ctx
        finally:
            tg.cancel_scope.cancel()


async def wait(ctx: RecordingContext, condition: Any, within: float = 5) -> None:
    with anyio.fail_after(within):
        await ctx.wait_until(condition)
