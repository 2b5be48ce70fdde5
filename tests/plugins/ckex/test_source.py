"""The ckex source against its emulator over real sockets, with a RecordingContext."""

from __future__ import annotations

import logging
from typing import Any

import pytest
from pydantic import ValidationError
from tocsin_ckex.emulator import CkexEmulator
from tocsin_ckex.protocol import (
    MAX_FRAME,
    SportsbookQuote,
    quote_event,
    register_command,
    start_command,
)
from tocsin_ckex.source import CkexConfig, CkexSource

from support import wait_for
from tocsin import utc_iso
from tocsin.testing import RecordingContext

from .conftest import FANCY, QUIET, SB, RunSource, settings

REGISTER_SB = register_command(SB)


def prices(ctx: RecordingContext) -> list[tuple[str, float]]:
    return [(e.data["product_id"], e.data["price"]) for e in ctx.events if e.type == "order_slip"]


# -- scenario 1: a refused token --------------------------------------------------------


async def test_expired_token_is_refused_without_a_tight_loop(run_source: RunSource) -> None:
    async with CkexEmulator(**QUIET) as emu:

        async def body(source: CkexSource, ctx: RecordingContext) -> None:
            await wait_for(lambda: len(emu.refused) == 2, what="a second try")

        _, ctx = await run_source(settings(emu, token=emu.token(expired=True)), body, started=False)
        (first, _), (second, _) = emu.refused
        assert second - first >= 0.9  # max_backoff (1 s) at once: only the user can fix it
        assert [reason for _, reason in emu.refused] == ["token expired", "token expired"]
        assert set(ctx.states()) == {"down"}  # the daemon reports the first one only
        reason = ctx.status[0][1]
        assert reason.startswith("the server refused the token (HTTP 401); it expired at ")
        assert emu.connections == 0


async def test_a_revoked_token_comes_back_once_accepted(run_source: RunSource) -> None:
    async with CkexEmulator(**QUIET) as emu:
        emu.reject_all = True

        async def body(source: CkexSource, ctx: RecordingContext) -> None:
            await wait_for(lambda: emu.refused, what="the refusal")
            emu.reject_all = False
            await ctx.wait_until(lambda: "up" in ctx.states())

        _, ctx = await run_source(settings(emu), body, started=False)
        assert ctx.states() == ["down", "up"]
        assert ctx.status[0][1] == "the server refused the token (HTTP 401)"  # not expired
        assert len(emu.refused) == 1


async def test_other_upgrade_failures_retry_with_the_backoff(run_source: RunSource) -> None:
    async with CkexEmulator(**QUIET) as emu:

        async def body(source: CkexSource, ctx: RecordingContext) -> None:
            await wait_for(lambda: len(emu.refused) == 2, within=3, what="a quick second try")

        url = emu.url.replace("/quote/", "/wrong/")
        _, ctx = await run_source(settings(emu, url=url, max_backoff=60), body, started=False)
        assert ctx.status[0] == ("down", f"HTTP 404 at the WebSocket upgrade of {url}")


# -- scenario 2: registers, start, quotes of both kinds ----------------------------------


async def test_registers_then_start_and_quotes_become_events(run_source: RunSource) -> None:
    async with CkexEmulator(**QUIET) as emu:
        await emu.quote(SB.event_id, SB.market_id, "1", "1.61", push=False)
        await emu.quote(SB.event_id, SB.market_id, "2", "2.37", push=False)
        await emu.fancy_quote(
            FANCY.event_id,
            FANCY.market_id,
            "1",
            bl="181",
            bo="0",
            ll="181",
            lo="0",
            status="-3",
            ut="2023-11-07T08:29:39.306Z",
            push=False,
        )

        async def body(source: CkexSource, ctx: RecordingContext) -> None:
            await ctx.wait_until(lambda: len(ctx.events) == 3)

        _, ctx = await run_source(settings(emu), body)
    assert emu.commands == [REGISTER_SB, register_command(FANCY), start_command()]
    assert ctx.states() == ["up"]
    sportsbook = [e for e in ctx.events if e.type == "order_slip"]
    assert [e.data["price"] for e in sportsbook] == [1.61, 2.37]
    quote = SportsbookQuote(SB.event_id, SB.market_id, "2", "2.37", "1")
    assert sportsbook[1].id == quote_event(quote)[2]
    assert sportsbook[1].data["open"] is True
    assert (sportsbook[1].source, sportsbook[1].provider) == ("odds", "ckex")
    (fancy,) = [e for e in ctx.events if e.type == "order_slip_fancy"]
    assert fancy.data["open"] is False and fancy.data["bl"] == 181
    assert fancy.time == "2023-11-07T08:29:39.306Z"  # the provider's time


# -- duplicates, changes, order ----------------------------------------------------------


async def test_repeated_snapshots_are_one_event_and_changes_are_new(
    run_source: RunSource,
) -> None:
    async with CkexEmulator(quote_interval=0.02, alive_interval=60.0) as emu:
        await emu.quote(SB.event_id, SB.market_id, "1", "1.90", push=False)

        async def body(source: CkexSource, ctx: RecordingContext) -> None:
            await ctx.wait_until(lambda: bool(ctx.events))
            for _ in range(3):
                await emu.push(SB.event_id, SB.market_id)  # the same snapshot again
            # Let the periodic repeats run a while: several snapshots, no new events.
            sent = emu.sent_quotes
            await wait_for(lambda: emu.sent_quotes >= sent + 5, what="repeated snapshots")
            await emu.quote(SB.event_id, SB.market_id, "1", "2.05")
            await ctx.wait_until(lambda: len(ctx.events) == 2)
            await emu.quote(SB.event_id, SB.market_id, "1", "2.05", status="2")  # locked
            await ctx.wait_until(lambda: len(ctx.events) == 3)
            await emu.quote(SB.event_id, SB.market_id, "1", "1.90")  # as at first
            await ctx.wait_until(lambda: len(ctx.events) == 4)

        _, ctx = await run_source(settings(emu), body)
    assert prices(ctx) == [("1", 1.9), ("1", 2.05), ("1", 2.05), ("1", 1.9)]
    assert [e.data["open"] for e in ctx.events] == [True, True, False, True]
    ids = [e.id for e in ctx.events]
    assert len(set(ids)) == 4  # back at 1.90 is a move, so a new fact with a new id
    assert not ctx.rejects


async def test_fancy_quotes_last_write_wins_by_ut(run_source: RunSource) -> None:
    async with CkexEmulator(**QUIET) as emu:
        m = (FANCY.event_id, FANCY.market_id, "1")
        await emu.fancy_quote(*m, bl="181", bo="0", ll="181", lo="0", ut="2023-11-07T08:29:39Z")

        async def body(source: CkexSource, ctx: RecordingContext) -> None:
            await ctx.wait_until(lambda: bool(ctx.events))
            # Re-sent with a newer ut, same values: no news. Then one older than seen.
            await emu.fancy_quote(*m, bl="181", bo="0", ll="181", lo="0", ut="2023-11-07T08:29:45Z")
            await emu.fancy_quote(*m, bl="170", bo="0", ll="170", lo="0", ut="2023-11-07T08:29:40Z")
            await emu.fancy_quote(*m, bl="182", bo="0", ll="182", lo="0", ut="2023-11-07T08:29:50Z")
            await ctx.wait_until(lambda: len(ctx.events) == 2)
            await emu.push(FANCY.event_id, FANCY.market_id)
            await emu.quote(SB.event_id, SB.market_id, "1", "1.5")  # a marker after it all
            await ctx.wait_until(lambda: len(ctx.events) == 3)

        _, ctx = await run_source(settings(emu), body)
    assert [e.data.get("bl") for e in ctx.events] == [181, 182, None]
    assert ctx.events[1].time == "2023-11-07T08:29:50.000Z"


async def test_a_burst_handled_for_longer_than_stale_after_is_not_silence(
    run_source: RunSource,
) -> None:
    # A frame in hand is handled whole, and silence counts from when it was handled, not
    # from when it arrived: one frame of 12 changed quotes takes 1.8 s > stale_after here.
    async with CkexEmulator(**QUIET) as emu:
        products = [str(n) for n in range(1, 13)]

        async def body(source: CkexSource, ctx: RecordingContext) -> None:
            await wait_for(lambda: start_command() in emu.commands, what="the start command")
            for product in products:
                await emu.quote(SB.event_id, SB.market_id, product, "2.00", push=False)
            await emu.push(SB.event_id, SB.market_id)
            await ctx.wait_until(lambda: len(ctx.events) == 12)
            # One more within stale_after of the burst's end: the connection is still fresh.
            await emu.quote(SB.event_id, SB.market_id, "1", "2.50")
            await ctx.wait_until(lambda: len(ctx.events) == 13)

        slow = RecordingContext("odds", "ckex", hand_over=0.15)
        _, ctx = await run_source(settings(emu, stale_after=1), body, ctx=slow)
    assert prices(ctx) == [(product, 2.0) for product in products] + [("1", 2.5)]
    assert ctx.states() == ["up"], ctx.status


# -- scenarios 3 and 7: keepalives ---------------------------------------------------------


async def test_alive_frames_keep_a_quiet_connection_fresh(run_source: RunSource) -> None:
    async with CkexEmulator(quote_interval=60.0, alive_interval=0.1) as emu:

        async def body(source: CkexSource, ctx: RecordingContext) -> None:
            # 15 alive frames span 1.5 s, past stale_after (1 s): no quote, still fresh.
            await wait_for(lambda: emu.sent_alive >= 15, what="alive frames")

        _, ctx = await run_source(settings(emu, stale_after=1), body)
    assert ctx.states() == ["up"]
    assert emu.connections == 1
    assert not ctx.events and not ctx.rejects


async def test_empty_and_alive_frames_are_ignored(run_source: RunSource) -> None:
    async with CkexEmulator(**QUIET) as emu:

        async def body(source: CkexSource, ctx: RecordingContext) -> None:
            await emu.send_empty()
            await emu.send_alive()
            await emu.send_raw("{ }")
            await emu.quote(SB.event_id, SB.market_id, "1", "1.5")
            await ctx.wait_until(lambda: bool(ctx.events))

        _, ctx = await run_source(settings(emu), body)
    assert len(ctx.events) == 1 and not ctx.rejects


# -- scenario 5: error frames and malformed frames ----------------------------------------


async def test_error_frames_are_counted_logged_once_and_the_connection_stays(
    run_source: RunSource, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    async with CkexEmulator(**QUIET) as emu:

        async def body(source: CkexSource, ctx: RecordingContext) -> None:
            for i in range(3):
                await emu.send_error(f"market {i} not found")
            await emu.quote(SB.event_id, SB.market_id, "1", "1.5")
            await ctx.wait_until(lambda: bool(ctx.events))

        source, ctx = await run_source(settings(emu), body)
    assert source.errors == 3
    assert emu.connections == 1 and ctx.states() == ["up"]
    errors = [r for r in caplog.records if "the server sent an error" in r.getMessage()]
    assert [r.levelname for r in errors] == ["WARNING", "DEBUG", "DEBUG"]
    assert errors[0].getMessage().endswith("(1 so far): market 0 not found")


async def test_malformed_frames_are_counted_and_skipped(run_source: RunSource) -> None:
    async with CkexEmulator(**QUIET) as emu:
        bad_item = '{"type":"order-slip","data":[{"event_id":"e"},{"event_id":"e","market_id":"m","product_id":"1","price":"3","status":"1"}]}'

        async def body(source: CkexSource, ctx: RecordingContext) -> None:
            for raw in ("not json", "[1]", '{"type":"order-slip-odds"}', bad_item, b"\xff"):
                await emu.send_raw(raw)
            await ctx.wait_until(lambda: bool(ctx.events))

        _, ctx = await run_source(settings(emu), body)
    assert ctx.rejects == [
        "not JSON",
        "not a JSON object",
        "unknown frame type",
        "malformed quote",
        "not JSON",
    ]
    assert prices(ctx) == [("1", 3)]
    assert emu.connections == 1


async def test_an_oversized_frame_is_rejected_and_the_connection_reopened(
    run_source: RunSource,
) -> None:
    async with CkexEmulator(**QUIET) as emu:

        async def body(source: CkexSource, ctx: RecordingContext) -> None:
            await emu.send_raw('{"type":"alive","pad":"' + "x" * MAX_FRAME + '"}')
            await ctx.wait_until(lambda: ctx.states()[-1:] == ["gap"])

        _, ctx = await run_source(settings(emu), body)
    assert ctx.rejects == ["oversized frame"]
    assert ctx.states() == ["up", "down", "up", "gap"]
    assert emu.connections == 2


# -- scenario 6: re-registering before markets expire ------------------------------------


async def test_markets_are_registered_again_before_they_expire(run_source: RunSource) -> None:
    async with CkexEmulator(market_ttl=0.5, quote_interval=0.05, alive_interval=60.0) as emu:
        await emu.quote(SB.event_id, SB.market_id, "1", "1.5", push=False)

        async def body(source: CkexSource, ctx: RecordingContext) -> None:
            await ctx.wait_until(lambda: bool(ctx.events))
            await wait_for(lambda: emu.expired >= 2, what="the markets to expire")
            await emu.quote(SB.event_id, SB.market_id, "1", "1.6")  # not pushed: expired
            await wait_for(lambda: emu.commands.count(REGISTER_SB) == 2, what="a new register")
            await ctx.wait_until(lambda: len(ctx.events) == 2)

        _, ctx = await run_source(settings(emu, resubscribe_every=1, stale_after=5), body)
    assert prices(ctx) == [("1", 1.5), ("1", 1.6)]
    assert emu.connections == 1  # the same connection: registered again, not reconnected
    assert emu.commands[3:6] == [REGISTER_SB, register_command(FANCY), start_command()]


# -- scenario 8: a status flips to locked ------------------------------------------------


async def test_status_flips_to_locked_and_back(run_source: RunSource) -> None:
    async with CkexEmulator(**QUIET) as emu:
        await emu.quote(SB.event_id, SB.market_id, "1", "2.5", push=False)

        async def body(source: CkexSource, ctx: RecordingContext) -> None:
            await ctx.wait_until(lambda: bool(ctx.events))
            await emu.flip_status(SB.event_id, SB.market_id, "-3")
            await ctx.wait_until(lambda: len(ctx.events) == 2)
            await emu.flip_status(SB.event_id, SB.market_id, "1")
            await ctx.wait_until(lambda: len(ctx.events) == 3)

        _, ctx = await run_source(settings(emu), body)
    assert [(e.data["status"], e.data["open"]) for e in ctx.events] == [
        ("1", True),
        ("-3", False),
        ("1", True),
    ]
    assert len({e.id for e in ctx.events}) == 3  # open -> locked -> open: three facts


# -- losing the connection ------------------------------------------------------------------


async def test_silence_is_stale_then_reconnect_register_and_gap(run_source: RunSource) -> None:
    async with CkexEmulator(**QUIET) as emu:
        heard: list[float] = []

        async def body(source: CkexSource, ctx: RecordingContext) -> None:
            emu.silent = True  # TCP open, nothing sent
            await ctx.wait_until(lambda: "stale" in ctx.states())
            heard.append(source.heard)  # the last frame before the silence
            emu.silent = False
            await ctx.wait_until(lambda: ctx.states()[-1:] == ["gap"])

        _, ctx = await run_source(settings(emu, stale_after=1), body)
    assert ctx.states() == ["up", "stale", "up", "gap"]
    # The gap starts at the last frame: pushes were lost during the silence too.
    assert ctx.gaps[0]["since"] == utc_iso(heard[0])
    assert ctx.status[1] == ("stale", "nothing received for 1s")
    assert ctx.status[3][1].startswith(
        "reconnected; events while disconnected may be missed since 20"
    )
    assert emu.connections == 2
    first = [REGISTER_SB, register_command(FANCY), start_command()]
    assert emu.commands == first + first


async def test_dropped_connection_reconnects_and_does_not_repeat_events(
    run_source: RunSource,
) -> None:
    async with CkexEmulator(**QUIET) as emu:
        await emu.quote(SB.event_id, SB.market_id, "1", "2.5", push=False)

        async def body(source: CkexSource, ctx: RecordingContext) -> None:
            await ctx.wait_until(lambda: bool(ctx.events))
            await emu.drop_connections()
            await ctx.wait_until(lambda: ctx.states()[-1:] == ["gap"])
            await wait_for(lambda: emu.commands.count(start_command()) == 2)
            await emu.push(SB.event_id, SB.market_id)  # the same quote on the new connection
            await emu.quote(SB.event_id, SB.market_id, "2", "3.1")  # a marker after it
            await ctx.wait_until(lambda: len(ctx.events) == 2)

        _, ctx = await run_source(settings(emu), body)
    assert ctx.states() == ["up", "down", "up", "gap"]
    assert ctx.status[1][1].startswith("connection closed (1011 dropped by the emulator")
    assert prices(ctx) == [("1", 2.5), ("2", 3.1)]


async def test_the_token_appears_nowhere(
    run_source: RunSource, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    async with CkexEmulator(**QUIET) as emu:
        token = emu.token()

        async def body(source: CkexSource, ctx: RecordingContext) -> None:
            await emu.drop_connections()
            await ctx.wait_until(lambda: ctx.states()[-1:] == ["gap"])

        source, ctx = await run_source(settings(emu, token=token), body)
    lines = [r.getMessage() for r in caplog.records]
    assert any("authorization=***" in line for line in lines)  # the request line, redacted
    assert not [line for line in lines if token[-20:] in line or token[:40] in line]
    assert token not in repr(source.config) and token not in str(ctx.status)


async def test_a_server_error_quoting_the_token_is_logged_without_it(
    run_source: RunSource, caplog: pytest.LogCaptureFixture
) -> None:
    # Only our own lines: websockets' debug lines of frame content are cut to a head and
    # tail that no scrubber can recognise, and nothing suggests the server echoes tokens.
    caplog.set_level(logging.INFO)
    async with CkexEmulator(**QUIET) as emu:
        token = emu.token()

        async def body(source: CkexSource, ctx: RecordingContext) -> None:
            await emu.send_error(f"bad token {token}; bearer%20{token}" + "!" * 300)
            await wait_for(lambda: source.errors)

        await run_source(settings(emu, token=token), body)
    (line,) = [r.getMessage() for r in caplog.records if "server sent" in r.getMessage()]
    assert line.endswith("(1 so far): bad token ***; bearer%20***" + "!" * 173)


# -- config ------------------------------------------------------------------------------


def valid(**extra: Any) -> dict[str, Any]:
    return {
        "plugin": "ckex",
        "token": "a.b.c",
        "markets": [{"kind": "sportsbook", "event_id": "e-1", "market_id": "1_2"}],
        **extra,
    }


def test_config_defaults() -> None:
    config = CkexConfig.model_validate(valid())
    assert config.url == "wss://webapi.ckex.xyz/dev-f/quote/do-not-look-back"
    assert config.resubscribe_every == 2700 and config.stale_after == 60
    assert config.max_backoff == 300 and config.enabled
    assert "a.b.c" not in repr(config)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"url": "https://x/y"}, "expected a ws:// or wss:// URL"),
        ({"url": "wss://x/y?authorization=bearer%20t"}, "the token goes in `token`"),
        ({"token": "bearer a.b.c"}, 'without "bearer "'),
        ({"token": ""}, "one non-empty word"),
        ({"markets": []}, "at least 1 item"),
        (
            {"markets": [{"kind": "cricket", "event_id": "e", "market_id": "m"}]},
            "'sportsbook' or 'fancy'",
        ),
        (
            {"markets": [{"kind": "fancy", "event_id": "e@1", "market_id": "m"}]},
            "must not contain '@'",
        ),
        (
            {"markets": [{"kind": "fancy", "event_id": "e", "market_id": "m", "x": 1}]},
            "Extra inputs",
        ),
        (
            {"markets": [{"kind": "fancy", "event_id": "e", "market_id": "m"}] * 2},
            "e@m is listed twice",
        ),
        ({"resubscribe_every": "2h"}, "must be at most 1h"),
        ({"resubscribe_every": "10ms"}, "greater than or equal to 1"),
        ({"stale_after": 0.5}, "greater than or equal to 1"),
        ({"subscriptions": []}, "Extra inputs"),
    ],
)
def test_config_errors(extra: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        CkexConfig.model_validate(valid(**extra))
