"""The ckex emulator's switches for what PROTOCOLS.md section 5 marks [inferred], on the
wire and against the ckex source: ``refusal`` (401, 403 or "close") and ``snapshot``."""

from __future__ import annotations

import json
from typing import Any

import anyio
import pytest
from tocsin_ckex.emulator import CkexEmulator
from tocsin_ckex.protocol import (
    connect_url,
    register_command,
    start_command,
    stop_command,
)
from tocsin_ckex.source import CkexSource
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosedError, InvalidStatus

from support import wait_for
from tocsin.testing import RecordingContext

from .conftest import FANCY, QUIET, SB, RunSource, recv, settings


async def next_after_marker(emu: CkexEmulator, ws: ClientConnection) -> dict[str, Any]:
    """Send an ``alive`` marker; the next frame: the marker itself when nothing came before."""
    await emu.send_alive()
    return await recv(ws)


async def until_processed(emu: CkexEmulator, ws: ClientConnection, *frames: str) -> None:
    """Send ``frames`` and wait until the emulator has read the last one."""
    for frame in frames:
        await ws.send(frame)
    await wait_for(lambda: emu.commands[-1:] == [frames[-1]], within=5, what="the command")


def products(frame: dict[str, Any]) -> dict[str, str]:
    """product id (or fancy pid) -> price (or fancy back line) of a quote frame."""
    return {
        item.get("product_id", item.get("pid")): item.get("price", item.get("bl"))
        for item in frame["data"]
    }


# -- refusal: on the wire ---------------------------------------------------------------


def test_refusal_takes_only_the_readings_it_knows() -> None:
    assert CkexEmulator().refusal == 401
    with pytest.raises(ValueError, match="refusal must be one of"):
        CkexEmulator(refusal=400)  # type: ignore[arg-type]


async def test_refusal_403_answers_every_refused_token_with_http_403() -> None:
    async with CkexEmulator(refusal=403, **QUIET) as emu:
        cases = {
            emu.url: "missing bearer token",
            connect_url(emu.url, emu.token(expired=True)): "token expired",
            connect_url(emu.url, "abc.def"): "malformed token",
            connect_url(emu.url.replace("/quote/", "/quotes/"), emu.token()): "not found",
        }
        for url, reason in cases.items():
            with pytest.raises(InvalidStatus) as refused:
                async with connect(url, open_timeout=5):
                    pass
            response = refused.value.response
            assert response.status_code == (404 if reason == "not found" else 403)
            assert emu.refused[-1][1] == reason
        emu.reject_all = True
        with pytest.raises(InvalidStatus) as revoked:
            async with connect(connect_url(emu.url, emu.token()), open_timeout=5):
                pass
        assert revoked.value.response.status_code == 403
        assert emu.refused[-1][1] == "token revoked"
        emu.reject_all = False
        assert emu.connections == 0
        async with connect(connect_url(emu.url, emu.token()), open_timeout=5):
            await wait_for(lambda: emu.connections == 1, within=5)


@pytest.mark.parametrize("revoked", [False, True], ids=["expired", "revoked"])
async def test_refusal_close_upgrades_sends_an_error_then_closes(revoked: bool) -> None:
    async with CkexEmulator(refusal="close", quote_interval=60.0, alive_interval=0.05) as emu:
        await emu.quote(SB.event_id, SB.market_id, "1", "1.61", push=False)
        emu.reject_all = revoked
        reason = "token revoked" if revoked else "token expired"
        async with connect(connect_url(emu.url, emu.token(expired=True)), open_timeout=5) as ws:
            assert await recv(ws) == {"type": "error", "error": reason}
            with pytest.raises(ConnectionClosedError) as closed, anyio.fail_after(5):
                await ws.recv()  # no alive frame either: a refused client gets nothing else
        assert closed.value.rcvd is not None
        assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (1008, reason)
        assert [why for _, why in emu.refused] == [reason]
        assert emu.connections == 0 and emu.open_connections == 0
        # A path the server does not route is still an HTTP 404, not an upgrade.
        with pytest.raises(InvalidStatus) as missing:
            async with connect(emu.url.replace("/quote/", "/quotes/"), open_timeout=5):
                pass
        assert missing.value.response.status_code == 404
        # A good token is served as usual.
        emu.reject_all = False
        async with connect(connect_url(emu.url, emu.token()), open_timeout=5) as ws:
            await ws.send(register_command(SB))
            await ws.send(start_command())
            while (frame := await recv(ws)) == {"type": "alive"}:
                pass
            assert frame["type"] == "order-slip"
        assert emu.connections == 1


# -- snapshot: on the wire ---------------------------------------------------------------


async def test_snapshot_by_default_every_push_is_the_whole_market() -> None:
    async with CkexEmulator(**QUIET) as emu:
        assert emu.snapshot is True
        await emu.quote(SB.event_id, SB.market_id, "1", "1.61", push=False)
        await emu.quote(SB.event_id, SB.market_id, "2", "2.37", push=False)
        async with connect(connect_url(emu.url, emu.token()), open_timeout=5) as ws:
            await ws.send(register_command(SB))
            await ws.send(start_command())
            assert products(await recv(ws)) == {"1": "1.61", "2": "2.37"}
            await emu.quote(SB.event_id, SB.market_id, "2", "2.40")
            assert products(await recv(ws)) == {"1": "1.61", "2": "2.40"}
            await emu.push(SB.event_id, SB.market_id)  # nothing changed: the same again
            assert products(await recv(ws)) == {"1": "1.61", "2": "2.40"}


async def test_snapshot_false_pushes_only_what_changed_for_each_connection() -> None:
    async with CkexEmulator(snapshot=False, **QUIET) as emu:
        await emu.quote(SB.event_id, SB.market_id, "1", "1.61", push=False)
        await emu.quote(SB.event_id, SB.market_id, "2", "2.37", push=False)
        url = connect_url(emu.url, emu.token())
        async with connect(url, open_timeout=5) as ws:
            await ws.send(register_command(SB))
            await ws.send(start_command())
            assert products(await recv(ws)) == {"1": "1.61", "2": "2.37"}  # the first: all
            await emu.quote(SB.event_id, SB.market_id, "2", "2.40")
            assert products(await recv(ws)) == {"2": "2.40"}
            sent = emu.sent_quotes
            await emu.push(SB.event_id, SB.market_id)  # nothing changed: no frame at all
            await emu.quote(SB.event_id, SB.market_id, "1", "1.61")  # the same value again
            assert await next_after_marker(emu, ws) == {"type": "alive"}
            assert emu.sent_quotes == sent
            await emu.flip_status(SB.event_id, SB.market_id, "-3")  # both change
            assert {q["status"] for q in (await recv(ws))["data"]} == {"-3"}
            # Stopped, the changes add up; start sends them, and only them.
            await until_processed(emu, ws, stop_command())
            await emu.quote(SB.event_id, SB.market_id, "1", "1.70", status="-3")
            await emu.quote(SB.event_id, SB.market_id, "1", "1.75", status="-3")
            await ws.send(start_command())
            assert products(await recv(ws)) == {"1": "1.75"}
            # A second connection has pushed nothing yet: it gets the whole market.
            async with connect(url, open_timeout=5) as other:
                await other.send(register_command(SB))
                await other.send(start_command())
                assert products(await recv(other)) == {"1": "1.75", "2": "2.40"}
            # A new registration starts again from the whole market.
            await ws.send(register_command(SB))
            assert products(await recv(ws)) == {"1": "1.75", "2": "2.40"}


async def test_snapshot_false_fancy_markets_push_the_changed_lines() -> None:
    async with CkexEmulator(snapshot=False, **QUIET) as emu:
        m = (FANCY.event_id, FANCY.market_id)
        await emu.fancy_quote(*m, "1", bl="181", bo="0", ll="181", lo="0", push=False)
        await emu.fancy_quote(*m, "2", bl="45", bo="100", ll="46", lo="100", push=False)
        async with connect(connect_url(emu.url, emu.token()), open_timeout=5) as ws:
            await ws.send(register_command(FANCY))
            await ws.send(start_command())
            assert products(await recv(ws)) == {"1": "181", "2": "45"}
            await emu.fancy_quote(*m, "1", bl="182", bo="0", ll="182", lo="0")
            frame = await recv(ws)
            assert frame["type"] == "order-slip-fancy" and products(frame) == {"1": "182"}


# -- the source against each reading ------------------------------------------------------


async def test_source_takes_a_403_refusal_as_a_refused_token(run_source: RunSource) -> None:
    async with CkexEmulator(refusal=403, **QUIET) as emu:

        async def body(source: CkexSource, ctx: RecordingContext) -> None:
            await wait_for(lambda: len(emu.refused) == 2, what="a second try")

        _, ctx = await run_source(settings(emu, token=emu.token(expired=True)), body, started=False)
    (first, _), (second, _) = emu.refused
    assert second - first >= 0.9  # max_backoff (1 s) at once, as for a 401
    assert set(ctx.states()) == {"down"}
    assert ctx.status[0][1].startswith("the server refused the token (HTTP 403); it expired at ")
    assert emu.connections == 0


async def test_source_takes_a_close_refusal_as_a_refused_token(run_source: RunSource) -> None:
    async with CkexEmulator(refusal="close", **QUIET) as emu:

        async def body(source: CkexSource, ctx: RecordingContext) -> None:
            await wait_for(lambda: len(emu.refused) == 2, what="a second try")
            await ctx.wait_until(lambda: ctx.states().count("down") == 2)

        _, ctx = await run_source(settings(emu, token=emu.token(expired=True)), body, started=False)
    downs = [reason for state, reason in ctx.status if state == "down"]
    assert len(downs) == 2
    assert all(
        r.startswith("the server refused the token (close 1008 token expired)") for r in downs
    )
    assert not ctx.events and emu.connections == 0
    (first, _), (second, _) = emu.refused
    assert second - first >= 0.95  # max_backoff (1 s) at once: only the user can fix it


async def test_source_turns_delta_pushes_into_the_changed_quotes(run_source: RunSource) -> None:
    async with CkexEmulator(snapshot=False, **QUIET) as emu:
        await emu.quote(SB.event_id, SB.market_id, "1", "1.61", push=False)
        await emu.quote(SB.event_id, SB.market_id, "2", "2.37", push=False)
        m = (FANCY.event_id, FANCY.market_id)
        await emu.fancy_quote(*m, "1", bl="181", bo="0", ll="181", lo="0", push=False)

        async def body(source: CkexSource, ctx: RecordingContext) -> None:
            await ctx.wait_until(lambda: len(ctx.events) == 3)
            await emu.quote(SB.event_id, SB.market_id, "2", "2.40")
            await ctx.wait_until(lambda: len(ctx.events) == 4)
            await emu.quote(SB.event_id, SB.market_id, "1", "1.61", status="2")  # locked
            await ctx.wait_until(lambda: len(ctx.events) == 5)
            await emu.fancy_quote(*m, "1", bl="182", bo="0", ll="182", lo="0")
            await ctx.wait_until(lambda: len(ctx.events) == 6)

        _, ctx = await run_source(settings(emu), body)
    # The pushes after the first carried one product each: the delta reached the source.
    assert [len(json.loads(f)["data"]) for f in ctx.frames] == [2, 1, 1, 1, 1]
    # float(): the odds are strings on the wire, and numbers or strings in events.
    sportsbook = [
        (e.data["product_id"], float(e.data["price"]), e.data["open"])
        for e in ctx.events
        if e.type == "order_slip"
    ]
    assert sportsbook == [
        ("1", 1.61, True),
        ("2", 2.37, True),
        ("2", 2.40, True),
        ("1", 1.61, False),
    ]
    assert [float(e.data["bl"]) for e in ctx.events if e.type == "order_slip_fancy"] == [181, 182]
    assert ctx.states() == ["up"] and not ctx.rejects
