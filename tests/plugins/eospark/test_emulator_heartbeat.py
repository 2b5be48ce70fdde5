"""The emulator's first heartbeat: PROTOCOLS.md section 1, scenario 1, with the default
10 s interval ("a heartbeat arrives within 10 s") and the ``first_heartbeat`` switch."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import pytest
from tocsin_eospark import EOSParkEmulator
from tocsin_eospark.protocol import subscribe_message
from websockets.asyncio.client import ClientConnection, connect

from .conftest import KEY, ME


@asynccontextmanager
async def client(emu: EOSParkEmulator, *, query: bool) -> AsyncIterator[ClientConnection]:
    """A plain client with the key in the query or in the ``apikey`` header."""
    url = f"{emu.url}?apikey={KEY}" if query else emu.url
    headers = {} if query else {"apikey": KEY}
    async with connect(url, additional_headers=headers, open_timeout=5) as ws:
        yield ws


async def recv(ws: ClientConnection, within: float) -> dict[str, Any]:
    with anyio.fail_after(within):
        frame = json.loads(await ws.recv())
    assert isinstance(frame, dict)
    return frame


@pytest.mark.parametrize("query", [False, True], ids=["header", "query"])
async def test_first_heartbeat_comes_at_once_with_the_default_interval(query: bool) -> None:
    async with EOSParkEmulator(api_keys=[KEY]) as emu:
        assert emu.heartbeat_interval == 10.0  # the seed's interval, not shortened
        before = time.monotonic()
        async with client(emu, query=query) as ws:
            frame = await recv(ws, within=2)  # was 10 s and a bit: a full interval
            waited = time.monotonic() - before
    assert frame["msg_type"] == "heartbeat" and frame["errno"] == 0
    assert waited < 2
    assert emu.accepted == 1


async def test_then_one_heartbeat_every_interval() -> None:
    interval = 0.4
    async with EOSParkEmulator(api_keys=[KEY], heartbeat_interval=interval) as emu:
        before = time.monotonic()  # before the server accepts: a lower bound of its clock
        async with client(emu, query=False) as ws:
            assert (await recv(ws, within=2))["msg_type"] == "heartbeat"
            await ws.send(subscribe_message([ME], ["eosio.token"], ""))
            while (await recv(ws, within=2))["msg_type"] != "heartbeat":
                pass  # the ack, before or after the next beat as the machine's load has it
            second = time.monotonic() - before
    assert second >= interval - 0.01  # none at once after the first; timers may fire early


async def test_first_heartbeat_after_a_full_interval_when_asked() -> None:
    # first_heartbeat = heartbeat_interval: the emulator's behaviour before the switch.
    async with EOSParkEmulator(api_keys=[KEY], heartbeat_interval=0.4, first_heartbeat=0.4) as emu:
        before = time.monotonic()
        async with client(emu, query=True) as ws:
            while (await recv(ws, within=2))["msg_type"] != "heartbeat":
                pass
            first = time.monotonic() - before
    assert first >= 0.4 - 0.01  # none at once: the first after a full interval
