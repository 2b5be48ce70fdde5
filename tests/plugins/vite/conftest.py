"""Fixtures for the vite tests: the emulator on 127.0.0.1 port 0, configs, a running source."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest
import tocsin_vite
from tocsin_vite import ViteConfig, ViteEmulator, ViteSource
from tocsin_vite.protocol import make_address

from tocsin.testing import RecordingContext, build_registry, make_plugin_manager

FIXTURES = Path(__file__).parent / "fixtures"
CONTRACT = make_address("the test contract", contract=True)
OTHER = make_address("another contract", contract=True)
ME = make_address("my wallet")
PAYER = make_address("a payer")
TRANSFER = "aa65281f5df4b4bd3c71f2ba25905b907205fce0809a816ef8e04b4d496a85bb"
APPROVAL = "8c5be1e5ebec7d5bd14f71427d1e84f3dd0314c0f7b2291e5b200ac8c7c3b925"


def fixture_text(name: str) -> str:
    return (FIXTURES / name).read_text(encoding="utf-8")


def fixture_json(name: str) -> Any:
    return json.loads(fixture_text(name))


@pytest.fixture
def registry() -> Any:
    return build_registry(make_plugin_manager([tocsin_vite], load_entry_points=False))


@pytest.fixture
async def emulator() -> AsyncIterator[ViteEmulator]:
    async with ViteEmulator() as emu:
        yield emu


def make_config(url: str = "ws://127.0.0.1:1/gvite/ws", **overrides: Any) -> ViteConfig:
    table: dict[str, Any] = {
        "plugin": "vite",
        "url": url,
        "subscriptions": [{"topic": "vmlog", "address": CONTRACT}],
        "max_backoff": "1s",
        "poll_interval": "200ms",
    }
    table.update(overrides)
    return ViteConfig.model_validate(table)


@asynccontextmanager
async def source_running(
    config: ViteConfig, ctx: RecordingContext | None = None, wait_started: bool = True
) -> AsyncIterator[RecordingContext]:
    """Run a ViteSource with a RecordingContext (``ctx`` to keep cursors); cancelled on exit."""
    ctx = ctx or RecordingContext("chain", "vite")
    async with anyio.create_task_group() as tg:
        if wait_started:
            with anyio.fail_after(5):
                await tg.start(ViteSource(config, ctx).run)
        else:
            tg.start_soon(ViteSource(config, ctx).run)
        try:
            yield ctx
        finally:
            tg.cancel_scope.cancel()


async def wait(ctx: RecordingContext, condition: Callable[[], Any], within: float = 5) -> None:
    with anyio.fail_after(within):
        await ctx.wait_until(condition)
