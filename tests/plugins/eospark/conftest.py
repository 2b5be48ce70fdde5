"""Fixtures for the eospark tests: the emulator on 127.0.0.1 port 0, configs, a running source."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest
import tocsin_eospark
from tocsin_eospark import EOSParkConfig, EOSParkEmulator, EOSParkSource

from tocsin.testing import RecordingContext, build_registry, make_plugin_manager

KEY = "k3y-for-tests-0123"
ME = "myaccount"
FIXTURES = Path(__file__).parent / "fixtures"
HEARTBEAT = 0.2  # the emulator's heartbeat interval in these tests (10 s in production)


def fixture_text(name: str) -> str:
    return (FIXTURES / name).read_text(encoding="utf-8")


def fixture_json(name: str) -> Any:
    return json.loads(fixture_text(name))


@pytest.fixture
def registry() -> Any:
    return build_registry(make_plugin_manager([tocsin_eospark], load_entry_points=False))


@pytest.fixture
async def emulator() -> AsyncIterator[EOSParkEmulator]:
    async with EOSParkEmulator(api_keys=[KEY], heartbeat_interval=HEARTBEAT) as emu:
        yield emu


def make_config(url: str = "ws://127.0.0.1:1/v1/ws", **overrides: Any) -> EOSParkConfig:
    table: dict[str, Any] = {
        "plugin": "eospark",
        "url": url,
        "api_key": KEY,
        "subscriptions": [{"account": ME, "contract": "eosio.token", "action": "transfer"}],
        "max_backoff": "1s",
        "stale_after": "1s",
    }
    table.update(overrides)
    return EOSParkConfig.model_validate(table)


@asynccontextmanager
async def source_running(
    config: EOSParkConfig, wait_started: bool = True
) -> AsyncIterator[RecordingContext]:
    """Run an EOSParkSource with a RecordingContext; cancelled on exit."""
    ctx = RecordingContext("eos", "eospark")
    async with anyio.create_task_group() as tg:
        if wait_started:
            with anyio.fail_after(5):
                await tg.start(EOSParkSource(config, ctx).run)
        else:
            tg.start_soon(EOSParkSource(config, ctx).run)
        try:
            yield ctx
        finally:
            tg.cancel_scope.cancel()
