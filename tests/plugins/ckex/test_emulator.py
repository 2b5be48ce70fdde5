"""The emulator against a plain WebSocket client: PROTOCOLS.md section 5, scenarios 1-8."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

import anyio
import pytest
from tocsin_ckex.emulator import CkexEmulator, mint_token, verify_token
from tocsin_ckex.protocol import (
    Market,
    command,
    connect_url,
    register_command,
    start_command,
    stop_command,
    unsubscribe_command,
)
from tocsin_ckex.source import CkexConfig, CkexSource
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosedError, InvalidStatus

from support import wait_for
from tocsin.testing import Registry

from .conftest import FANCY, QUIET, SB, recv

SB2 = Market("sportsbook", "41115853-e", "1_31260330")


async def until_processed(emu: CkexEmulator, ws: ClientConnection, *frames: str) -> None:
    """Send ``frames`` and wait until the emulator has read them and all its answers arrived."""
    for frame in frames:
        await ws.send(frame)
    await wait_for(lambda: emu.commands[-1:] == [frames[-1]], within=5, what="the command")
    await emu.send_alive()  # a marker: what the commands caused comes before it
    while await recv(ws) != {"type": "alive"}:
        pass


async def test_registered_in_the_registry(registry: Registry) -> None:
    assert registry.source("ckex") is CkexSource
    assert registry.emulator("ckex") is CkexEmulator
    assert CkexSource.event_types == ("order_slip", "order_slip_fancy")


# -- scenario 1: no or expired JWT ------------------------------------------------------


async def test_tokens_are_checked_at_the_upgrade() -> None:
    async with CkexEmulator(secret="s3", **QUIET) as emu:
        expired = mint_token("s3", expires_at=datetime.now(UTC) - timedelta(seconds=1))
        cases = {
            emu.url: "missing bearer token",
            emu.url + "?authorization=" + emu.token(): "missing bearer token",  # no "bearer "
            connect_url(emu.url, expired): "token expired",
            connect_url(emu.url, mint_token("another secret")): "invalid token signature",
            connect_url(emu.url, "abc.def"): "malformed token",
            connect_url(emu.url.replace("/quote/", "/quotes/"), emu.token()): "not found",
        }
        for url, reason in cases.items():
            with pytest.raises(InvalidStatus) as refused:
                async with connect(url):
                    pass
            expected = 404 if reason == "not found" else 401
            assert refused.value.response.status_code == expected
            assert emu.refused[-1][1] == reason
        assert emu.connections == 0
        emu.reject_all = True  # a revoked token
        with pytest.raises(InvalidStatus):
            async with connect(connect_url(emu.url, emu.token())):
                pass
        emu.reject_all = False
        async with connect(connect_url(emu.url, emu.token())):
            await wait_for(lambda: emu.connections == 1)


def test_minted_tokens_verify() -> None:
    token = mint_token("s3", expires_at=datetime(2099, 1, 1, tzinfo=UTC))
    claims = verify_token(token, "s3", time.time())
    assert claims["expires_at"].startswith("2099-01-01T00:00:00.000000")
    with pytest.raises(ValueError, match="token expired"):
        verify_token(token, "s3", datetime(2099, 1, 2, tzinfo=UTC).timestamp())
    forged = token.rsplit(".", 1)[0] + ".AAAA"
    with pytest.raises(ValueError, match="invalid token signature"):
        verify_token(forged, "s3", time.time())


# -- scenario 2: sportsbook and fancy registers -> pushes ------------------------------


async def test_registers_then_start_bring_both_kinds_of_quotes() -> None:
    async with CkexEmulator(**QUIET) as emu:
        await emu.quote(SB.event_id, SB.market_id, "1", "1.61")
        await emu.fancy_quote(
            FANCY.event_id, FANCY.market_id, "1", bl="181", bo="0", ll="181", lo="0"
        )
        async with connect(connect_url(emu.url, emu.token())) as ws:
            await ws.send(register_command(SB))
            await ws.send(register_command(FANCY))
            # Nothing before start: the marker comes first.
            await wait_for(lambda: len(emu.commands) == 2)
            await emu.push(SB.event_id, SB.market_id)
            await emu.send_alive()
            assert await recv(ws) == {"type": "alive"}
            await ws.send(start_command())
            frames = [await recv(ws), await recv(ws)]
        by_type = {f["type"]: f["data"] for f in frames}
        assert by_type["order-slip"] == [
            {
                "event_id": SB.event_id,
                "market_id": SB.market_id,
                "product_id": "1",
                "price": "1.61",
                "status": "1",
            }
        ]
        (item,) = by_type["order-slip-fancy"]
        assert {k: item[k] for k in ("mid", "pid", "bl", "status")} == {
            "mid": FANCY.market_id,
            "pid": "1",
            "bl": "181",
            "status": "1",
        }
        assert datetime.fromisoformat(item["ut"]).year >= 2024 and item["ut"].endswith("Z")
        assert "eid" not in item


async def test_quotes_repeat_and_seed_variants() -> None:
    async with CkexEmulator(
        quote_interval=0.05, alive_interval=60.0, fancy_type="order-slipt-fancy", fancy_eid=True
    ) as emu:
        await emu.fancy_quote(FANCY.event_id, FANCY.market_id, "1", bl="1", bo="2", ll="3", lo="4")
        await emu.quote(SB.event_id, SB.market_id, "1", "1.61")
        async with connect(connect_url(emu.url, emu.token())) as ws:
            # SB registered as a fancy market: the server has nothing to send for it.
            await ws.send(command(f"order-slip-quote@fancy-market#{SB.event_id}@{SB.market_id}"))
            await ws.send(register_command(FANCY))
            await ws.send(start_command())
            frames = [await recv(ws) for _ in range(3)]  # the snapshot, then repeats
        assert all(f["type"] == "order-slipt-fancy" for f in frames)
        assert frames[0] == frames[1] == frames[2]
        assert frames[0]["data"][0]["eid"] == FANCY.event_id


# -- scenario 3: stop silences quotes while alive continues; start resumes -------------


async def test_stop_and_start() -> None:
    async with CkexEmulator(**QUIET) as emu:
        await emu.quote(SB.event_id, SB.market_id, "1", "1.61")
        async with connect(connect_url(emu.url, emu.token())) as ws:
            await ws.send(register_command(SB))
            await ws.send(start_command())
            assert (await recv(ws))["type"] == "order-slip"
            await until_processed(emu, ws, stop_command())
            await emu.quote(SB.event_id, SB.market_id, "1", "1.70")
            await emu.send_alive()
            assert await recv(ws) == {"type": "alive"}  # alive, and no quote before it
            await ws.send(start_command())
            frame = await recv(ws)  # start resumes with the current snapshot
            assert frame["type"] == "order-slip" and frame["data"][0]["price"] == "1.70"


async def test_alive_frames_come_on_their_own() -> None:
    async with CkexEmulator(quote_interval=60.0, alive_interval=0.05) as emu:
        async with connect(connect_url(emu.url, emu.token())) as ws:
            await ws.send(stop_command())
            assert await recv(ws) == {"type": "alive"}
            assert await recv(ws) == {"type": "alive"}
        assert emu.sent_alive >= 2


# -- scenario 4: unsubscribing one market leaves the others ----------------------------


async def test_unsubscribe_one_market() -> None:
    async with CkexEmulator(**QUIET) as emu:
        await emu.quote(SB.event_id, SB.market_id, "1", "1.61", push=False)
        await emu.quote(SB2.event_id, SB2.market_id, "1", "3.10", push=False)
        async with connect(connect_url(emu.url, emu.token())) as ws:
            await until_processed(
                emu, ws, register_command(SB), register_command(SB2), start_command()
            )
            assert emu.registered() == {
                ("sportsbook", SB.event_id, SB.market_id),
                ("sportsbook", SB2.event_id, SB2.market_id),
            }
            await until_processed(emu, ws, unsubscribe_command(SB.event_id, SB.market_id))
            await emu.push(SB.event_id, SB.market_id)
            await emu.push(SB2.event_id, SB2.market_id)
            frame = await recv(ws)
            assert frame["data"][0]["market_id"] == SB2.market_id
            assert emu.registered() == {("sportsbook", SB2.event_id, SB2.market_id)}


# -- scenario 5: malformed JSON or an unknown commend -> error, socket stays open ------


async def test_bad_commands_get_errors_and_the_socket_stays() -> None:
    async with CkexEmulator(**QUIET) as emu:
        await emu.quote(SB.event_id, SB.market_id, "1", "1.61", push=False)
        async with connect(connect_url(emu.url, emu.token())) as ws:
            await ws.send('{"commend":\u201cstop\u201d}')
            assert await recv(ws) == {"type": "error", "error": "invalid message"}
            await ws.send(command("pause"))
            assert await recv(ws) == {"type": "error", "error": "unknown commend"}
            await ws.send('{"cmd":"start"}')
            assert await recv(ws) == {"type": "error", "error": "no commend"}
            await ws.send(register_command(SB))
            await ws.send(start_command())
            assert (await recv(ws))["type"] == "order-slip"
            assert emu.open_connections == 1
        assert emu.commands[:2] == ['{"commend":\u201cstop\u201d}', '{"commend":"pause"}']


# -- scenario 6: a market expires after market_ttl ---------------------------------------


async def test_market_expires_and_a_new_register_renews_it() -> None:
    async with CkexEmulator(market_ttl=0.2, **QUIET) as emu:
        await emu.quote(SB.event_id, SB.market_id, "1", "1.61", push=False)
        async with connect(connect_url(emu.url, emu.token())) as ws:
            await ws.send(register_command(SB))
            await ws.send(start_command())
            assert (await recv(ws))["type"] == "order-slip"
            await wait_for(lambda: not emu.registered(), within=5, what="the market to expire")
            assert emu.expired == 1
            await emu.push(SB.event_id, SB.market_id)
            await emu.send_alive()
            assert await recv(ws) == {"type": "alive"}  # no quote: expired
            await ws.send(register_command(SB))
            assert (await recv(ws))["type"] == "order-slip"


# -- scenario 7: {} and alive ---------------------------------------------------------


async def test_empty_and_alive_frames() -> None:
    async with CkexEmulator(**QUIET) as emu, connect(connect_url(emu.url, emu.token())) as ws:
        await wait_for(lambda: emu.open_connections == 1)
        await emu.send_empty()
        await emu.send_alive()
        await emu.send_error("boom")
        assert [await recv(ws) for _ in range(3)] == [
            {},
            {"type": "alive"},
            {"type": "error", "error": "boom"},
        ]


# -- scenario 8: a status flips to locked ----------------------------------------------


async def test_status_flip() -> None:
    async with CkexEmulator(**QUIET) as emu:
        await emu.quote(SB.event_id, SB.market_id, "1", "1.61", push=False)
        await emu.quote(SB.event_id, SB.market_id, "2", "2.37", push=False)
        async with connect(connect_url(emu.url, emu.token())) as ws:
            await ws.send(register_command(SB))
            await ws.send(start_command())
            assert {q["status"] for q in (await recv(ws))["data"]} == {"1"}
            await emu.flip_status(SB.event_id, SB.market_id, "-3")
            assert {q["status"] for q in (await recv(ws))["data"]} == {"-3"}


# -- connection controls ----------------------------------------------------------------


async def test_drop_silence_and_counts() -> None:
    async with CkexEmulator(quote_interval=0.05, alive_interval=0.05) as emu:
        async with connect(connect_url(emu.url, emu.token())) as ws:
            await recv(ws)
            await emu.drop_connections()
            with pytest.raises(ConnectionClosedError) as closed, anyio.fail_after(5):
                while True:
                    await ws.recv()
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1011
        async with connect(connect_url(emu.url, emu.token())) as ws:
            await recv(ws)
            emu.silent = True
            with anyio.move_on_after(0.3) as quiet:  # several alive intervals: nothing comes
                while True:
                    await ws.recv()
            assert quiet.cancelled_caught
            emu.silent = False
            await recv(ws)
            await emu.drop_connections(abort=True)
            with pytest.raises(ConnectionClosedError), anyio.fail_after(5):
                while True:
                    await ws.recv()
        assert emu.connections == 2
        await wait_for(lambda: emu.open_connections == 0)


def test_demo_source_is_a_valid_config() -> None:
    emu = CkexEmulator(port=4242)
    config = CkexConfig.model_validate(emu.demo_source())
    assert config.url == "ws://127.0.0.1:4242/dev-f/quote/do-not-look-back"
    assert len(config.markets) == 3
    verify_token(config.token.get(), emu.secret, time.time())
    assert emu.demo_source() == emu.demo_source()  # stable: it can be pasted into a config
