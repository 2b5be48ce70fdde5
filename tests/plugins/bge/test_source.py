"""The BGE source against the emulator over real sockets, with a RecordingContext."""

from __future__ import annotations

import gzip
import logging
import time
from typing import Any

import anyio
import orjson
import pytest
from pydantic import ValidationError
from tocsin_bge import BGEConfig, BGEEmulator, BGESource
from tocsin_bge.protocol import MAX_FRAME
from tocsin_bge.source import GAP_REASON, backfill_range, cursor_key

from support import wait_for
from tocsin.testing import RecordingContext, Registry

from .conftest import (
    ACCESS_KEY,
    FAST,
    PAIR,
    SECRET_KEY,
    make_config,
    private_config,
    source_running,
    ticker,
    wait,
)

MINUTE = 60


def candles_sub(interval: str = "1min") -> dict[str, Any]:
    return {"biz": "market", "type": "candles", "product": PAIR, "interval": interval}


def closes(ctx: RecordingContext, type_: str = "ticker") -> list[Any]:
    return [e.data["close"] for e in ctx.events if e.type == type_]


def restarted_from(first: RecordingContext) -> RecordingContext:
    """A context holding what ``first`` saved: the state a restart finds."""
    ctx = RecordingContext("market", "bge")
    ctx.cursors = dict(first.cursors)
    return ctx


# -- config ----------------------------------------------------------------------------


def test_config_defaults_and_forms(registry: Registry) -> None:
    assert registry.source("bge") is BGESource
    config = BGEConfig.model_validate(
        {
            "plugin": "bge",
            "access_key": ACCESS_KEY,
            "secret_key": SECRET_KEY,
            "subscriptions": [
                {"type": "ticker", "product": "btc_usdt"},
                {"biz": "market", "type": "orderBook", "product": "ETH_USDT", "interval": 5},
                {"type": "orderbook", "product": "ETH_USDT"},
                {"type": "candles", "product": PAIR, "interval": "4 hours"},
                {"biz": "exchange", "type": "orders", "product": "ALL"},
                {"type": "assets", "product": PAIR},
            ],
        }
    )
    assert config.url == "wss://ws.bg.exchange/v2/ws"
    assert (config.zip, config.backfill, config.backfill_limit, config.seq_gaps) == (
        False,
        True,
        1000,
        True,
    )
    assert (config.stale_after, config.keepalive) == (60.0, 20.0)
    subs = config.subscriptions
    assert [(s.channel_biz, s.type, s.product, s.interval) for s in subs] == [
        ("market", "ticker", "BTC_USDT", ""),
        ("market", "orderbook", "ETH_USDT", "5"),
        ("market", "orderbook", "ETH_USDT", "0"),
        ("market", "candles", "BTC_USDT", "4 hours"),
        ("exchange", "orders", "all", ""),
        ("exchange", "assets", "BTC_USDT", ""),
    ]
    for text in (repr(config), str(config.model_dump())):
        assert ACCESS_KEY not in text and SECRET_KEY not in text


def test_a_short_stale_after_takes_a_keepalive_under_it() -> None:
    # SPEC: stale_after is any duration from 1s; the keepalive defaulted to 20 s, and a
    # stale_after of 20 s or less was refused for it.
    def config(**keys: str) -> BGEConfig:
        return BGEConfig.model_validate({"plugin": "bge", "subscriptions": [ticker()], **keys})

    for stale_after, keepalive in (("15s", 7.5), ("1s", 0.5), ("90s", 20.0)):
        assert config(stale_after=stale_after).keepalive == keepalive
    assert config().keepalive == 20.0
    assert config(stale_after="15s", keepalive="5s").keepalive == 5
    with pytest.raises(ValidationError, match=r"keepalive \(20s\) must be shorter"):
        config(stale_after="15s", keepalive="20s")
    with pytest.raises(ValidationError, match="stale_after"):
        config(stale_after="soon")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"subscriptions": [{"type": "assets", "product": "all"}]},
            'assets takes one product: BGE answers product "all" with an error',
        ),
        ({"subscriptions": [{"type": "ticker", "product": "all"}]}, '"all" is only for orders'),
        ({"subscriptions": [{"type": "orders", "product": PAIR}]}, "private channels (orders"),
        (
            {"subscriptions": [{"biz": "market", "type": "orders", "product": PAIR}]},
            'orders is a private channel: biz = "exchange"',
        ),
        ({"subscriptions": [{"type": "trades", "product": PAIR}]}, "unknown type 'trades'"),
        ({"subscriptions": [{"type": "candles", "product": PAIR}]}, "candles need an interval"),
        (
            {"subscriptions": [{"type": "candles", "product": PAIR, "interval": "2min"}]},
            "candles need an interval",
        ),
        (
            {"subscriptions": [{"type": "orderbook", "product": PAIR, "interval": "12"}]},
            'a level "0" to "11"',
        ),
        (
            {"subscriptions": [{"type": "ticker", "product": PAIR, "interval": "1min"}]},
            "ticker takes no interval",
        ),
        (
            {"subscriptions": [{"type": "ticker", "product": "BTC/USDT"}]},
            "product 'BTC/USDT' is not a trading pair like BTC_USDT",
        ),
        ({"subscriptions": [ticker(), ticker()]}, "listed more than once: ticker BTC_USDT"),
        ({"subscriptions": []}, "at least 1 item"),
        ({"access_key": ACCESS_KEY}, "access_key needs secret_key"),
        ({"url": "https://ws.bg.exchange/v2/ws"}, "ws:// or wss://"),
        ({"keepalive": "30s", "stale_after": "60s"}, "keepalive must be under 30s"),
        ({"keepalive": "5s", "stale_after": "5s"}, "must be shorter than stale_after"),
        ({"apikey": "x"}, "Extra inputs are not permitted"),
    ],
)
def test_config_errors(change: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError) as err:
        make_config(**change)
    assert message in str(err.value)
    assert SECRET_KEY not in str(err.value)


def test_backfill_range() -> None:
    assert backfill_range(1000, 1300, "1min", 100) == (1000, 1300, None)
    # 101 candles missed, 3 allowed: only the newest 3 (1140, 1200, 1260) are fetched
    assert backfill_range(1000 - 95 * MINUTE, 1300, "1min", 3) == (1140, 1300, (-4640, 1080))
    assert backfill_range(0, 7200, "1hour", 10) == (0, 7200, None)
    # Exactly the limit of newer candles missed: all are fetched, the cursor's own too.
    assert backfill_range(0, 5 * MINUTE, "1min", 5) == (0, 300, None)
    # One more: the newest 5 (120 to 360) are fetched; the candle at 60 is the gap.
    assert backfill_range(0, 6 * MINUTE, "1min", 5) == (120, 360, (60, 60))


# -- liveness --------------------------------------------------------------------------


async def test_pongs_and_keepalive_keep_a_quiet_session_past_every_server_timer(
    emulator: BGEEmulator,
) -> None:
    # Nothing is pushed on this channel: without the keepalive req the emulator would
    # close after 0.6 s; without pongs after 0.6 s too.
    async with source_running(make_config(emulator.url)) as ctx:
        await wait_for(lambda: emulator.clients and emulator.clients[0].pongs >= 12)
        (client,) = emulator.clients
    assert ctx.states() == ["up"]
    assert emulator.connections == 1 and not emulator.closed
    assert client.bad_pongs == 0  # every pong carried its ping's own value
    pongs = [m for m in emulator.received if isinstance(m, dict) and "pong" in m]
    assert all(isinstance(m["pong"], int) for m in pongs)
    reqs = [m for m in emulator.received if isinstance(m, dict) and m.get("event") == "req"]
    assert reqs and reqs[0] == {
        "event": "req",
        "biz": "market",
        "type": "ticker",
        "product": PAIR,
        "zip": False,
    }
    assert not ctx.events  # a keepalive answer is a sign of life, not an event


async def test_100_subscriptions_stay_under_the_rate_limit_and_pongs_go_first() -> None:
    # Twice what the server takes in a second. Pings every 0.3 s, 1.5 s to answer: the
    # subscriptions take about 3.5 s to send.
    timers = {**FAST, "ping_interval": 0.3, "pong_timeout": 1.5, "idle_timeout": 1.5}
    async with BGEEmulator(**timers) as emu:  # type: ignore[arg-type]
        subs = [ticker(f"C{n}_USDT") for n in range(100)]
        config = make_config(emu.url, subscriptions=subs, keepalive="700ms")
        async with source_running(config) as ctx:
            client = emu.clients[0]
            assert len(client.subs) == 100
            assert client.pongs >= 7  # answered while the subscriptions queued
    assert ctx.states() == ["up"]
    assert emu.connections == 1 and not emu.closed
    assert emu.peak_rate <= 40  # any one second, against the server's 50


async def test_more_than_50_messages_a_second_would_be_closed() -> None:
    # The emulator enforces the limit the bucket keeps under: lower it, and it bites.
    async with BGEEmulator(**{**FAST, "rate_limit": 20}) as emu:  # type: ignore[arg-type]
        subs = [ticker(f"C{n}_USDT") for n in range(40)]
        config = make_config(emu.url, subscriptions=subs)
        async with source_running(config, wait_started=False) as ctx:
            await wait(ctx, lambda: "down" in ctx.states())
    assert emu.closed["rate limit"] >= 1
    assert ctx.status[0] == ("down", "connection closed (1008 more than 20 messages in 1s)")


async def test_silence_is_stale_then_reconnect_and_gap(emulator: BGEEmulator) -> None:
    async with source_running(make_config(emulator.url, stale_after="1s")) as ctx:
        emulator.mute()  # TCP stays open, nothing arrives
        await wait(ctx, lambda: ctx.states()[-2:] == ["up", "gap"])
    assert ctx.states() == ["up", "stale", "up", "gap"]
    assert ctx.status[1] == ("stale", "nothing received for 1s")
    assert ctx.gaps[0]["channels"] == "ticker BTC_USDT"
    assert emulator.connections == 2


async def test_a_burst_handled_for_longer_than_stale_after_is_not_silence() -> None:
    # The frames of one read are handled together: silence counts from when the last
    # of them was handled, not from when they arrived (12 x 0.15 s > stale_after). BGE's
    # own timers at their 30 s: a pong or keepalive cannot go out while a frame is handled.
    ctx = RecordingContext("market", "bge", hand_over=0.15)
    async with (
        BGEEmulator(orderbook_interval=None) as emulator,
        source_running(make_config(emulator.url, stale_after="1s"), ctx=ctx),
    ):
        for n in range(12):
            await emulator.push_ticker(PAIR, 30_000 + n)
        await wait(ctx, lambda: len(ctx.events) == 12)
    assert closes(ctx) == [30_000 + n for n in range(12)]
    assert ctx.states() == ["up"], ctx.status


# -- events, duplicates, gaps ----------------------------------------------------------


async def test_ticker_events_dedupe_repeated_seq_ids_and_report_skipped_ones(
    emulator: BGEEmulator,
) -> None:
    async with source_running(make_config(emulator.url)) as ctx:
        first = await emulator.push_ticker(PAIR, 30_100.5, open_=29_800)
        assert await emulator.push_duplicate("ticker", PAIR) == 1  # the same seq_id again
        await emulator.push_ticker(PAIR, 30_200)
        emulator.skip_seq("ticker", PAIR, count=3)  # three pushes lost
        await emulator.push_ticker(PAIR, 30_300)
        await wait(ctx, lambda: len(ctx.events) == 3)
    assert closes(ctx) == [30_100.5, 30_200, 30_300]
    event = ctx.events[0]
    assert event.type == "ticker" and event.source == "market" and event.provider == "bge"
    assert event.data["seq_id"] == first and event.data["product"] == PAIR
    assert event.data["open"] == 29_800 and event.data["change"] == 300.5
    assert event.time.endswith(".000Z")  # the item's id is its unix time
    assert len({e.id for e in ctx.events}) == 3
    (gap,) = ctx.gaps
    assert gap["channel"] == "ticker BTC_USDT"
    assert (gap["from_seq"], gap["to_seq"]) == (first + 2, first + 4)
    assert gap["reason"] == "pushes lost: seq_id skipped"
    assert ctx.states() == ["up", "gap"]


async def test_seq_gaps_can_be_switched_off(emulator: BGEEmulator) -> None:
    async with source_running(make_config(emulator.url, seq_gaps=False)) as ctx:
        await emulator.push_ticker(PAIR, 1)
        emulator.skip_seq("ticker", PAIR, count=3)
        await emulator.push_ticker(PAIR, 2)
        await wait(ctx, lambda: len(ctx.events) == 2)
    assert not ctx.gaps


async def test_an_unchanged_orderbook_snapshot_is_one_event(emulator: BGEEmulator) -> None:
    subs = [{"type": "orderbook", "product": PAIR}, {"type": "percent10", "product": PAIR}]
    async with source_running(make_config(emulator.url, subscriptions=subs)) as ctx:
        await wait(ctx, lambda: len(ctx.events) == 2)  # both books, empty so far
        await emulator.set_orderbook(PAIR, [["30000.1", "0.5"]], [["30001", "1.25"]])
        await emulator.set_percent10(PAIR, [["29990", "2"]], [["30010", "3"]])
        # re-sent every 0.1 s while unchanged: wait for several repeats
        await wait_for(lambda: emulator.pushed >= 12)
        await emulator.set_orderbook(PAIR, [["30000.2", "0.5"]], [["30001", "1.25"]])
        await wait(
            ctx,
            lambda: (
                [e.data["bids"] for e in ctx.events if e.type == "orderbook"][-1:]
                == [[[30000.2, 0.5]]]
            ),
        )
    books = [e for e in ctx.events if e.type == "orderbook"]
    # the empty book before the first set_orderbook, the first book, the changed one
    assert [b.data["bids"] for b in books] == [[], [[30000.1, 0.5]], [[30000.2, 0.5]]]
    assert books[1].data["interval"] == "0" and books[1].data["asks"] == [[30001, 1.25]]
    assert [e.data["bids"] for e in ctx.events if e.type == "percent10"] == [[], [[29990, 2]]]


async def test_zip_subscriptions_get_gzip_frames(emulator: BGEEmulator) -> None:
    async with source_running(make_config(emulator.url, zip=True)) as ctx:
        assert emulator.clients[0].subs == {("ticker", PAIR, ""): True}
        await emulator.push_ticker(PAIR, 42_000)
        await wait(ctx, lambda: ctx.events)
    assert closes(ctx) == [42_000]
    subs = [m for m in emulator.received if isinstance(m, dict) and m.get("event") == "sub"]
    assert subs == [
        {"event": "sub", "biz": "market", "type": "ticker", "product": PAIR, "zip": True}
    ]


async def test_malformed_frames_are_counted_and_skipped(emulator: BGEEmulator) -> None:
    async with source_running(make_config(emulator.url)) as ctx:
        await emulator.push_raw("this is not json")
        await emulator.push_raw(b"\x00\x01 not compressed either")
        await emulator.push_raw(gzip.compress(b"[" + b" " * (4 * MAX_FRAME) + b"]"))  # a bomb
        await emulator.push_raw('{"type": "ticker", "product": "BTC_USDT", "data": 7}')
        await emulator.push_ticker(PAIR, 30_000)
        await wait(ctx, lambda: ctx.events)
        assert ctx.rejects == [
            "malformed frame: not JSON",
            "malformed frame: bad compressed frame",
            "malformed frame: decompressed frame too large",
            "malformed frame: malformed data",
        ]
        assert emulator.connections == 1  # it survived all of them
        await emulator.push_raw("x" * (MAX_FRAME + 1))  # closes the connection (1009)
        await wait(ctx, lambda: ctx.states()[-1:] == ["gap"])
    assert ctx.rejects[-1] == "oversized frame"
    assert ctx.states() == ["up", "down", "up", "gap"]
    assert ctx.status[1][1] == "a frame over the size limit closed the connection"


async def test_a_dropped_connection_reconnects_without_repeating_events(
    emulator: BGEEmulator,
) -> None:
    subs = [ticker(), {"type": "orderbook", "product": PAIR}]
    async with source_running(make_config(emulator.url, subscriptions=subs)) as ctx:
        await wait(ctx, lambda: ctx.events)  # the (empty) book
        await emulator.push_ticker(PAIR, 30_100)
        await wait(ctx, lambda: closes(ctx) == [30_100])
        lost = time.time()
        await emulator.drop_connections()
        await wait(ctx, lambda: "gap" in ctx.states())
        await emulator.push_duplicate("ticker", PAIR)  # re-sent after the reconnect
        await emulator.push_ticker(PAIR, 30_200)
        await wait(ctx, lambda: len(closes(ctx)) == 2)
        pushed = emulator.pushed
        await wait_for(lambda: emulator.pushed >= pushed + 3)  # the same book, re-sent
    assert closes(ctx) == [30_100, 30_200]
    assert ctx.states() == ["up", "down", "up", "gap"]
    assert ctx.status[1][1] == "connection closed (1011 dropped by the emulator)"
    (gap,) = ctx.gaps
    assert gap["reason"] == GAP_REASON
    assert gap["channels"] == "ticker BTC_USDT"  # the orderbook is a full snapshot anyway
    assert str(gap["since"]) <= time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(lost + 1))
    assert len([e for e in ctx.events if e.type == "orderbook"]) == 1  # the same empty book


async def test_a_refused_subscription_is_retried(emulator: BGEEmulator) -> None:
    emulator.sub_errors["ticker"] = 500
    async with source_running(make_config(emulator.url), wait_started=False) as ctx:
        await wait(ctx, lambda: ctx.states() == ["down"])
        await wait_for(lambda: emulator.connections >= 2)  # with backoff, not given up
    assert ctx.status[0][1] == "BGE refused the subscription to ticker BTC_USDT: server error (500)"


async def test_an_unreachable_server_is_down_with_a_reason() -> None:
    async with BGEEmulator() as emu:
        url = emu.url  # a port nobody listens on once the emulator is closed
    async with source_running(make_config(url), wait_started=False) as ctx:
        await wait(ctx, lambda: ctx.states() == ["down"])
    assert ctx.status[0][1].startswith("cannot connect: ")


# -- login and private channels --------------------------------------------------------


async def test_login_then_private_orders_of_every_pair(
    emulator: BGEEmulator, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)  # websockets logs every frame at debug
    async with source_running(private_config(emulator.url)) as ctx:
        login, *subs = [m for m in emulator.received if isinstance(m, dict) and "event" in m][:3]
        assert emulator.clients[0].user == ACCESS_KEY
        order = {
            "order_id": "179577241915696235",
            "product": "ETH_USDT",
            "side": "buy",
            "price": "1850.50",
            "size": "2.00000000",
            "filled_amount": "0",
            "funds": "3701",
            "filled_size": "0",
            "type": "limit",
            "status": "1",
        }
        await emulator.push_order(order)
        await emulator.push_order(order)  # pushed twice: one event
        await emulator.push_order({**order, "status": "3", "filled_size": "2"})
        await wait(ctx, lambda: len(ctx.events) == 2)
    assert [s["type"] for s in subs] == ["orders", "ticker"]
    assert subs[0] == {
        "event": "sub",
        "biz": "exchange",
        "type": "orders",
        "product": "all",
        "zip": False,
    }
    opened, filled = ctx.events
    assert opened.type == "orders" and opened.data["product"] == "ETH_USDT"
    assert (opened.data["status"], filled.data["status"]) == (1, 3)
    assert opened.data["price"] == 1850.5 and opened.id != filled.id
    signature = login["params"]["access_sign"]
    assert login["params"]["access_key"] == ACCESS_KEY
    assert "websockets.client" in {r.name for r in caplog.records}  # it did log frames
    assert "(hidden: it carries credentials)" in caplog.text
    for secret in (ACCESS_KEY, SECRET_KEY, signature, signature[:12], ACCESS_KEY[:10]):
        assert secret not in caplog.text


@pytest.mark.parametrize(
    ("setup", "reason"),
    [
        (
            lambda emu: emu.keys.clear(),
            "BGE refused the login: the access key is invalid (40006: Invalid ACCESS_KEY)",
        ),
        (
            lambda emu: emu.keys.update({ACCESS_KEY: "another secret"}),
            "BGE refused the login: the signature did not verify (check secret_key)"
            " (40010: api verification failed)",
        ),
        (
            lambda emu: emu.banned.add(ACCESS_KEY),
            "BGE refused the login: the API user is banned (40013: User banned)",
        ),
    ],
)
async def test_a_refusal_only_the_user_can_fix_is_not_retried_soon(
    emulator: BGEEmulator, setup: Any, reason: str
) -> None:
    setup(emulator)
    config = private_config(emulator.url, max_backoff="30s")
    async with source_running(config, wait_started=False) as ctx:
        await wait(ctx, lambda: ctx.states() == ["down"])
    assert ctx.status == [("down", reason)]  # a SourceAuthError: waits max_backoff (below)


async def test_a_bad_key_waits_max_backoff_then_a_fixed_key_comes_back(
    emulator: BGEEmulator,
) -> None:
    emulator.keys.clear()
    config = private_config(emulator.url, max_backoff="1500ms")
    async with source_running(config, wait_started=False) as ctx:
        await wait(ctx, lambda: ctx.states() == ["down"])
        refused_at = time.monotonic()
        emulator.keys[ACCESS_KEY] = SECRET_KEY  # the key is fixed at the provider
        await wait(ctx, lambda: "up" in ctx.states())
        waited = time.monotonic() - refused_at
    assert ctx.states() == ["down", "up"]
    assert waited >= 1.4  # max_backoff at once (an ordinary first retry waits at most 1 s)
    assert emulator.connections == 2


@pytest.mark.parametrize(
    ("code", "reason"),
    [
        (40008, "BGE refused the login: the timestamp has expired (is the clock right?)"),
        (40005, "BGE refused the login: the timestamp is invalid (is the clock right?)"),
        (500, "BGE refused the login: server error (500: system error)"),
    ],
)
async def test_a_refusal_that_may_pass_is_retried_with_backoff(
    emulator: BGEEmulator, code: int, reason: str
) -> None:
    emulator.login_errors.append(code)  # the next login only
    config = private_config(emulator.url, max_backoff="30s")
    async with source_running(config, wait_started=False) as ctx:
        await wait(ctx, lambda: "up" in ctx.states())
    assert ctx.states() == ["down", "up"]
    assert ctx.status[0][1].startswith(reason)
    assert emulator.connections == 2


# -- candles resume --------------------------------------------------------------------


def recent_minutes(count: int) -> list[int]:
    """The open times of the last ``count`` whole minutes, oldest first."""
    now = int(time.time()) // MINUTE * MINUTE
    return [now - MINUTE * n for n in range(count - 1, -1, -1)]


async def test_candles_resume_after_a_restart_from_the_saved_cursor(
    emulator: BGEEmulator,
) -> None:
    t0, t1, t2 = recent_minutes(3)
    config = make_config(emulator.url, subscriptions=[candles_sub()])
    async with source_running(config) as first:
        await emulator.push_candle(PAIR, "1min", t0, 30_000, 30_010)
        await wait(first, lambda: first.cursors)
    assert first.cursors == {"candles:BTC_USDT:1min": str(t0)}
    assert cursor_key(config.subscriptions[0].key) == "candles:BTC_USDT:1min"
    # while the daemon was stopped: t0 closed higher, t1 and t2 came
    await emulator.push_candle(PAIR, "1min", t0, 30_000, 30_050, push=False)
    await emulator.push_candle(PAIR, "1min", t1, 30_050, 30_070, push=False)
    await emulator.push_candle(PAIR, "1min", t2, 30_070, 30_020, push=False)
    async with source_running(config, ctx=restarted_from(first)) as second:
        await wait(second, lambda: len(second.events) == 3)
        await emulator.push_candle(PAIR, "1min", t2, 30_070, 30_020)  # pushed as fetched
        await emulator.push_candle(PAIR, "1min", t2, 30_070, 30_090)  # a real update
        await wait(second, lambda: len(second.events) == 4)
    (req,) = [
        m
        for m in emulator.received
        if isinstance(m, dict) and m.get("event") == "req" and m.get("type") == "candles"
    ]
    assert (req["from"], req["interval"]) == (t0, "1min") and req["to"] >= t2
    assert [(e.data["id"], e.data["close"]) for e in second.events] == [
        (t0, 30_050),
        (t1, 30_070),
        (t2, 30_020),
        (t2, 30_090),
    ]
    assert second.events[0].time == time.strftime("%Y-%m-%dT%H:%M:00.000Z", time.gmtime(t0))
    assert second.cursors == {"candles:BTC_USDT:1min": str(t2)}
    assert not second.gaps and second.states() == ["up"]


async def test_candles_resume_after_a_reconnect(emulator: BGEEmulator) -> None:
    t0, t1 = recent_minutes(2)
    config = make_config(emulator.url, subscriptions=[candles_sub(), ticker()])
    async with source_running(config) as ctx:
        await emulator.push_candle(PAIR, "1min", t0, 30_000, 30_010)
        await wait(ctx, lambda: ctx.events)
        emulator.refuse = True  # an outage: handshakes get 503
        await emulator.drop_connections()
        await wait(ctx, lambda: ctx.states() == ["up", "down"])
        await emulator.push_candle(PAIR, "1min", t1, 30_010, 30_030)  # nobody is connected
        emulator.refuse = False
        await wait(ctx, lambda: len(ctx.events) == 2)
    assert [e.data["id"] for e in ctx.events] == [t0, t1]
    (gap,) = ctx.gaps
    assert gap["channels"] == "ticker BTC_USDT"  # candles were fetched: not in the gap


async def test_a_backfill_beyond_the_limit_reports_what_it_skipped(
    emulator: BGEEmulator,
) -> None:
    minutes = recent_minutes(10)
    for start in minutes:
        await emulator.push_candle(PAIR, "1min", start, 30_000, 30_000 + start % 97, push=False)
    config = make_config(emulator.url, subscriptions=[candles_sub()], backfill_limit=3)
    ctx = RecordingContext("market", "bge")
    ctx.cursors = {"candles:BTC_USDT:1min": str(minutes[0])}
    async with source_running(config, ctx=ctx):
        # the backfill ends with the newest candle, which becomes the cursor
        await wait(ctx, lambda: ctx.cursors["candles:BTC_USDT:1min"] == str(minutes[-1]))
    (gap,) = ctx.gaps
    # The gap names the candles left out: from the one after the cursor's to the one
    # before the first fetched.
    assert gap["channel"] == "candles BTC_USDT 1min" and gap["from_time"] == minutes[1]
    # the 3 newest candles up to now: minutes[-3:], or 2 of them if a minute just began
    last_skipped = int(gap["to_time"])
    assert last_skipped in (minutes[-4], minutes[-3])
    assert [e.data["id"] for e in ctx.events] == [m for m in minutes if m > last_skipped]


async def test_without_backfill_a_restart_only_reports_the_gap(emulator: BGEEmulator) -> None:
    t0, _ = recent_minutes(2)
    config = make_config(emulator.url, subscriptions=[candles_sub()], backfill=False)
    ctx = RecordingContext("market", "bge")
    ctx.cursors = {"candles:BTC_USDT:1min": str(t0)}
    async with source_running(config, ctx=ctx):
        await wait(ctx, lambda: ctx.gaps)
    assert ctx.gaps[0]["channel"] == "candles BTC_USDT 1min"
    assert ctx.gaps[0]["since"] == time.strftime("%Y-%m-%dT%H:%M:00.000Z", time.gmtime(t0))
    assert not [
        m
        for m in emulator.received
        if isinstance(m, dict) and m.get("type") == "candles" and m.get("event") == "req"
    ]


async def test_a_failed_backfill_is_reported_as_a_gap(emulator: BGEEmulator) -> None:
    t0, _ = recent_minutes(2)
    emulator.req_errors["candles"] = 500
    config = make_config(emulator.url, subscriptions=[candles_sub()])
    ctx = RecordingContext("market", "bge")
    ctx.cursors = {"candles:BTC_USDT:1min": str(t0)}
    async with source_running(config, ctx=ctx):
        await wait(ctx, lambda: ctx.gaps)
    (gap,) = ctx.gaps
    assert gap["reason"] == "candles could not be fetched: error 500"
    assert (gap["channel"], gap["from_time"]) == ("candles BTC_USDT 1min", t0)
    assert ctx.states() == ["up", "gap"]  # the connection itself carries on


class HeldReq(BGEEmulator):
    """Holds its answers to candles ``req`` until ``answer`` is set."""

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.answer = anyio.Event()

    async def _on_message(self, client: Any, raw: str | bytes) -> None:
        if b'"req"' in (raw.encode() if isinstance(raw, str) else raw):
            self.received.append(orjson.loads(raw))
            await self.answer.wait()
            self.received.pop()  # the base class records it again
        await super()._on_message(client, raw)


async def test_a_live_candle_does_not_move_the_cursor_past_a_backfill_still_to_come() -> None:
    minutes = recent_minutes(6)
    async with HeldReq(**FAST) as emulator:
        for start in minutes[:-1]:
            await emulator.push_candle(PAIR, "1min", start, 30_000, 30_000 + start % 97, push=False)
        config = make_config(emulator.url, subscriptions=[candles_sub()])
        ctx = RecordingContext("market", "bge")
        key = "candles:BTC_USDT:1min"
        ctx.cursors = {key: str(minutes[0])}
        async with source_running(config, ctx=ctx):
            try:
                await wait_for(
                    lambda: any(
                        m.get("event") == "req" for m in emulator.received if isinstance(m, dict)
                    )
                )
                await emulator.push_candle(PAIR, "1min", minutes[-1], 30_000, 30_500)  # live
                await wait(ctx, lambda: [e.data["id"] for e in ctx.events] == [minutes[-1]])
                # Killed now, a restart must still fetch the candles in between.
                assert ctx.cursors[key] == str(minutes[0])
            finally:
                emulator.answer.set()  # never leave the emulator holding its answer
            await wait(ctx, lambda: len(ctx.events) == 6)
            await wait(ctx, lambda: ctx.cursors[key] == str(minutes[-1]))
    assert sorted(e.data["id"] for e in ctx.events) == sorted(minutes)


async def test_a_book_is_the_same_fact_across_a_restart_and_a_change_while_away_is_news(
    emulator: BGEEmulator,
) -> None:
    # Before, the first book of a run took its content's id and later ones a numbered id:
    # after a restart the unchanged book alerted again, and a book back at the first
    # run's first content while stopped alerted nothing (taken for that first one).
    config = make_config(emulator.url, subscriptions=[{"type": "orderbook", "product": PAIR}])
    a = ([["30000.1", "0.5"]], [["30001", "1"]])
    b = ([["30000.1", "0.7"]], [["30001", "1"]])
    async with source_running(config) as first:
        await wait(first, lambda: first.events)  # the empty book
        await emulator.set_orderbook(PAIR, *a)
        await emulator.set_orderbook(PAIR, *b)
        await wait(first, lambda: len(first.events) == 3)
    second = restarted_from(first)
    async with source_running(config, ctx=second):
        pushed = emulator.pushed
        await wait_for(lambda: emulator.pushed >= pushed + 3, what="b re-sent unchanged")
        assert second.events == []
        await emulator.set_orderbook(PAIR, *a)
        await wait(second, lambda: second.events)
    await emulator.set_orderbook(PAIR, *b)  # while stopped
    async with source_running(config, ctx=restarted_from(second)) as third:
        await wait(third, lambda: third.events)
    books = [e.data["bids"] for e in (*first.events, *second.events, *third.events)]
    assert books == [[], [[30000.1, 0.5]], [[30000.1, 0.7]], [[30000.1, 0.5]], [[30000.1, 0.7]]]
    ids = [e.id for e in (*first.events, *second.events, *third.events)]
    assert len(set(ids)) == 5


async def test_a_balance_back_at_an_earlier_value_is_news_and_unchanged_is_not(
    emulator: BGEEmulator,
) -> None:
    config = private_config(
        emulator.url, subscriptions=[{"biz": "exchange", "type": "assets", "product": PAIR}]
    )

    def balances(usdt: str) -> list[dict[str, str]]:
        return [
            {"currency": "USDT", "available": usdt, "hold": "0"},
            {"currency": "BTC", "available": "1", "hold": "0"},
        ]

    async with source_running(config) as first:
        for usdt in ("100", "50", "100"):
            await emulator.push_assets(PAIR, balances(usdt))
        await wait(first, lambda: len(first.events) == 4)
    assert [(e.data["currency"], e.data["available"]) for e in first.events] == [
        ("USDT", 100),
        ("BTC", 1),
        ("USDT", 50),
        ("USDT", 100),
    ]
    async with source_running(config, ctx=restarted_from(first)) as second:
        await emulator.push_assets(PAIR, balances("100"))  # as before the restart: no news
        await emulator.push_assets(PAIR, balances("75"))
        await wait(second, lambda: second.events)
    assert [(e.data["currency"], e.data["available"]) for e in second.events] == [("USDT", 75)]


async def test_live_and_backfilled_candles_spell_the_interval_alike(
    emulator: BGEEmulator,
) -> None:
    # The server pushes "60min"; a req answer echoes the client's spelling ("1hour").
    hour = 3600
    t0 = int(time.time()) // hour * hour - hour
    config = make_config(emulator.url, subscriptions=[candles_sub("1hour")])
    async with source_running(config) as first:
        await emulator.push_candle(PAIR, "60min", t0, 30_000, 30_010)
        await wait(first, lambda: first.cursors)
    await emulator.push_candle(PAIR, "60min", t0 + hour, 30_010, 30_020, push=False)
    async with source_running(config, ctx=restarted_from(first)) as second:
        await wait(second, lambda: any(e.data["id"] == t0 + hour for e in second.events))
    events = (*first.events, *second.events)
    assert [e.data["interval"] for e in events] == ["60min"] * len(events)


async def test_a_long_backfill_comes_in_reqs_whose_answers_fit_a_frame(
    emulator: BGEEmulator,
) -> None:
    # 9,000 missed candles: one req's answer was over MAX_FRAME, so the connection closed
    # for size, reconnected and asked again, for ever (no candle, the cursor stuck).
    now = int(time.time()) // MINUTE * MINUTE
    start = now - 9000 * MINUTE
    for t in range(start, now + MINUTE, MINUTE):
        await emulator.push_candle(PAIR, "1min", t, 30_000, 30_001, push=False)
    config = make_config(emulator.url, backfill_limit=10_000, subscriptions=[candles_sub()])
    ctx = RecordingContext("market", "bge")
    ctx.cursors = {"candles:BTC_USDT:1min": str(start)}
    async with source_running(config, ctx=ctx):
        await wait(ctx, lambda: ctx.cursors["candles:BTC_USDT:1min"] == str(now), within=30)
    reqs = [m for m in emulator.received if isinstance(m, dict) and m.get("event") == "req"]
    candle_reqs = [(r["from"], r["to"]) for r in reqs if r.get("type") == "candles"]
    assert len(candle_reqs) == 19 and candle_reqs[0] == (start, start + 499 * MINUTE)
    assert [e.data["id"] for e in ctx.events] == list(range(start, now + MINUTE, MINUTE))
    assert emulator.connections == 1 and not ctx.gaps and not ctx.rejects


async def test_balances_are_told_apart_by_symbol_whatever_their_order(
    emulator: BGEEmulator,
) -> None:
    # BGE names a balance's currency "symbol" (its documented push); the states were told
    # apart by "currency", else by place, so the same balances in another order alerted
    # again (review of 17e3733).
    config = private_config(
        emulator.url, subscriptions=[{"biz": "exchange", "type": "assets", "product": PAIR}]
    )
    usdt = {"symbol": "USDT", "available": "100", "hold": "0"}
    btc = {"symbol": "BTC", "available": "1", "hold": "0"}
    async with source_running(config) as ctx:
        await emulator.push_assets(PAIR, [usdt, btc])
        await emulator.push_assets(PAIR, [btc, usdt])  # the same, in another order
        await emulator.push_assets(PAIR, [btc])
        await emulator.push_assets(PAIR, [{**btc, "available": "2"}])  # a change, to wait on
        await wait(ctx, lambda: len(ctx.events) >= 3)
    assert [(e.data["symbol"], e.data["available"]) for e in ctx.events] == [
        ("USDT", 100),
        ("BTC", 1),
        ("BTC", 2),
    ]
