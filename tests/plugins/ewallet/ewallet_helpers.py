"""Helpers for the eWallet plugin tests: recorded frames, config, a running source.

A uniquely named module (not ``conftest``) so the tests can import it by name.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import tocsin_ewallet
from tocsin_ewallet.emulator import (
    DEMO_ACCESS_KEY,
    DEMO_API_KEY,
    DEMO_AUTH_TOKEN,
    DEMO_REQUEST,
    DEMO_SECRET_KEY,
)
from tocsin_ewallet.protocol import authorization
from tocsin_ewallet.source import EWalletConfig

from tocsin import Source
from tocsin.testing import RecordingContext, build_registry, make_plugin_manager

FIXTURES = Path(__file__).parent / "fixtures"
REQUEST_TOPIC = f"transaction_request:{DEMO_REQUEST}"
CLIENT_AUTH = authorization("OMGClient", DEMO_API_KEY, DEMO_AUTH_TOKEN)
PROVIDER_AUTH = authorization("OMGProvider", DEMO_ACCESS_KEY, DEMO_SECRET_KEY)


def fixture_text(name: str) -> str:
    return (FIXTURES / f"{name}.json").read_text(encoding="utf-8")


def fixture_json(name: str) -> dict[str, Any]:
    value = json.loads(fixture_text(name))
    assert isinstance(value, dict)
    return value


def source_class() -> type[Source]:
    registry = build_registry(make_plugin_manager([tocsin_ewallet], load_entry_points=False))
    return registry.source("ewallet")


def make_config(url: str, **overrides: Any) -> EWalletConfig:
    table: dict[str, Any] = {
        "plugin": "ewallet",
        "url": url,
        "api_key": DEMO_API_KEY,
        "auth_token": DEMO_AUTH_TOKEN,
        "channels": [REQUEST_TOPIC],
        "heartbeat": "0.3s",
        "stale_after": "5s",
        "max_backoff": "1s",
    }
    table.update(overrides)
    config = source_class().Config.model_validate({k: v for k, v in table.items() if v is not None})
    assert isinstance(config, EWalletConfig)
    return config


@asynccontextmanager
async def running_source(
    config: EWalletConfig,
    *,
    wait_started: bool = True,
    within: float = 15.0,
    ctx: RecordingContext | None = None,
) -> AsyncIterator[RecordingContext]:
    """The source running against its server with a RecordingContext; cancelled on exit."""
    ctx = ctx or RecordingContext("wallet", "ewallet")
    with anyio.fail_after(within):
        async with anyio.create_task_group() as tg:
            source = source_class()(config, ctx)
            if wait_started:
                await tg.start(source.run)
            else:
                tg.start_soon(source.run)
            try:
                yield ctx
            finally:
                tg.cancel_scope.cancel()
