"""Record and replay: the frames a live BGE source read give back the events it emitted."""

from __future__ import annotations

import gzip
import json
import time
import zlib
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tocsin_bge import BGEEmulator, BGESource
from tocsin_bge.protocol import MAX_FRAME, MAX_INFLATED, SNAPSHOT_TYPES

from support import JSON
from support import replay_frames as replay
from tocsin import Event, FrameParser
from tocsin.testing import RecordingContext

from .conftest import PAIR, make_config, private_config, source_running, ticker, wait

MINUTE = 60
RECEIPT_TIMED = {"orderbook", "percent10", "orders", "assets"}
"""Types whose emulated items carry no time: their event time is the receipt time."""
CANDLES = {"biz": "market", "type": "candles", "product": PAIR, "interval": "1min"}
BOOK = {"type": "orderbook", "product": PAIR}
ORDER = {
    "order_id": "179577241915696235",
    "product": "ETH_USDT",
    "side": "buy",
    "price": "1850.50",
    "size": "2",
    "filled_amount": "0",
    "funds": "3701",
    "filled_size": "0",
    "type": "limit",
    "status": "1",
}


def parser(**overrides: Any) -> FrameParser:
    config = make_config(subscriptions=[ticker(), CANDLES, BOOK], **overrides)
    made = BGESource.frame_parser(config, RecordingContext("market", "bge"))
    assert made is not None
    return made


def envelope(event: Event, changed_book: bool = False) -> dict[str, Any]:
    """The envelope, less the time where it was the receipt time (not in any frame), and
    less the id of a book's change: it holds the change's number, live the clock's (so a
    restart never reuses one) and in a replay 1, 2, 3."""
    out = event.envelope()
    if event.type in RECEIPT_TIMED:
        del out["time"]
    if changed_book:
        del out["id"]
    return out


def envelopes(events: list[Event]) -> list[dict[str, Any]]:
    books: set[tuple[str, str]] = set()
    out = []
    for event in events:
        book = (event.type, str(event.data.get("product")))
        out.append(envelope(event, event.type in SNAPSHOT_TYPES and book in books))
        books.add(book)
    return out


def recent_minutes(count: int) -> list[int]:
    now = int(time.time()) // MINUTE * MINUTE
    return [now - MINUTE * n for n in range(count - 1, -1, -1)]


async def test_recorded_zip_frames_replay_as_the_live_events(emulator: BGEEmulator) -> None:
    t0, t1 = recent_minutes(2)
    subs = [{"biz": "exchange", "type": "orders", "product": "all"}, ticker(), CANDLES, BOOK]
    config = private_config(emulator.url, subscriptions=subs, zip=True)
    async with source_running(config) as ctx:
        await wait(ctx, lambda: ctx.events)  # the (empty) book
        await emulator.push_ticker(PAIR, 30_100.5, open_=29_800)
        await emulator.push_duplicate("ticker", PAIR)  # the same seq_id: dropped
        emulator.skip_seq("ticker", PAIR, count=2)  # a gap: noticed, not an event
        await emulator.push_ticker(PAIR, 30_200)
        await emulator.push_order(ORDER)
        await emulator.push_order(ORDER)  # the same order state: one event
        await emulator.push_order({**ORDER, "status": "3", "filled_size": "2"})
        await emulator.set_orderbook(PAIR, [["30000.1", "0.5"]], [["30001", "1.25"]])
        await emulator.push_candle(PAIR, "1min", t0, 30_000, 30_010)
        await wait(ctx, lambda: len(ctx.events) == 7)
        emulator.refuse = True  # an outage: the next candles only come by the backfill
        await emulator.drop_connections()
        await wait(ctx, lambda: ctx.states()[-1:] == ["down"])
        await emulator.push_candle(PAIR, "1min", t0, 30_000, 30_050, push=False)
        await emulator.push_candle(PAIR, "1min", t1, 30_050, 30_070, push=False)
        emulator.refuse = False
        await wait(ctx, lambda: [e.data.get("id") for e in ctx.events][-1:] == [t1])
        await emulator.push_raw(b"\x1f\x8b not gzip")  # rejected live, malformed on replay
        await emulator.push_raw(gzip.compress(b"[" + b" " * (2 * MAX_INFLATED) + b"]"))
        await emulator.push_ticker(PAIR, 30_300)
        await wait(ctx, lambda: ctx.events[-1].data.get("close") == 30_300)
    assert sum(isinstance(f, bytes) for f in ctx.frames) >= 8  # zip pushes came as gzip
    assert any(isinstance(f, str) and '"ping"' in f for f in ctx.frames)
    assert len(ctx.gaps) == 2  # the skipped seq_id and the reconnect (orders, ticker)
    types = [e.type for e in ctx.events]
    assert types.count("ticker") == 3 and types.count("orders") == 2
    assert [e.data["id"] for e in ctx.events if e.type == "candles"] == [t0, t0, t1]

    config = private_config("ws://127.0.0.1:1/v2/ws", subscriptions=subs, zip=True)
    parse = BGESource.frame_parser(config, RecordingContext("market", "bge"))
    assert parse is not None
    events, malformed = replay(parse, ctx.frames)
    assert malformed == ctx.rejects
    assert envelopes(events) == envelopes(ctx.events)
    provider_timed = [e for e in ctx.events if e.type not in RECEIPT_TIMED]
    assert len(provider_timed) == 6  # and their time matched too


def test_control_frames_and_unsubscribed_pushes_give_no_event() -> None:
    frames: list[str | bytes] = [
        '{"ping": 1635065532000}',
        '{"biz":"market","type":"ticker","product":"BTC_USDT","ts":1,"code":200,'
        '"status":"OK","event":"sub"}',
        '{"event":"login","code":40001,"msg":"ACCESS_KEY is empty"}',
        # the keepalive's ticker answer: a sign of life only
        '{"event":"req","biz":"market","type":"ticker","product":"BTC_USDT",'
        '"data":{"id":1,"seq_id":5,"close":"1"}}',
        # a channel this source did not subscribe to
        '{"biz":"market","type":"ticker","product":"ETH_USDT","data":[{"id":1,"seq_id":1}]}',
    ]
    assert replay(parser(), frames) == ([], [])


def test_compressed_frames_are_inflated_and_repeats_dropped() -> None:
    push = {
        "id": "1700000000",
        "biz": "market",
        "type": "ticker",
        "product": PAIR,
        "data": [{"id": 1700000000, "seq_id": 9, "close": "30000.5"}],
    }
    text = json.dumps(push).encode()
    raw_deflate = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    frames: list[str | bytes] = [
        gzip.compress(text),
        zlib.compress(text),  # the same seq_id, zlib this time: a repeat
        raw_deflate.compress(text.replace(b"9", b"10")) + raw_deflate.flush(),
    ]
    events, malformed = replay(parser(), frames)
    assert malformed == []
    assert [(e.data["seq_id"], e.data["close"]) for e in events] == [(9, 30000.5), (10, 30000.5)]
    assert events[0].time == "2023-11-14T22:13:20.000Z"


@pytest.mark.parametrize(
    ("frame", "reason"),
    [
        (b"\x00\x01 garbage", "malformed frame: bad compressed frame"),
        (b"\x1f\x8b\x08\x00", "malformed frame: truncated compressed frame"),
        (gzip.compress(b" " * (MAX_INFLATED + 1)), "malformed frame: decompressed frame too large"),
        (
            gzip.compress(b'{"ping": 1}', mtime=0)[:-6],
            "malformed frame: truncated compressed frame",
        ),
        ("x" * (MAX_FRAME + 1), "malformed frame: oversized frame"),
        ("not json", "malformed frame: not JSON"),
        ("[1, 2]", "malformed frame: not a JSON object"),
        ('{"type": "ticker", "product": "BTC_USDT", "data": 7}', "malformed frame: malformed data"),
        ('{"ping": [1]}', "malformed frame: bad ping"),
        (
            '{"type": "ticker", "product": "BTC_USDT", "data": [{"seq_id": -1}]}',
            "malformed ticker push: bad seq_id",
        ),
    ],
)
def test_malformed_frames_raise_value_error(frame: str | bytes, reason: str) -> None:
    with pytest.raises(ValueError) as err:
        parser()(frame)
    assert str(err.value) == reason


PUSHES = st.fixed_dictionaries(
    {
        "type": st.sampled_from(["ticker", "candles", "orderBook", "fills"]) | JSON,
        "product": st.sampled_from([PAIR, "btc_usdt"]) | JSON,
        "data": st.lists(
            st.dictionaries(
                st.sampled_from(["id", "seq_id", "seqId", "close", "ts"]), JSON, max_size=4
            ),
            max_size=3,
        )
        | JSON,
    },
    optional={"interval": st.sampled_from(["1min", "0"]) | JSON, "event": JSON, "id": JSON},
)


@settings(max_examples=200, deadline=None)
@given(
    st.one_of(
        st.binary(max_size=200),
        st.text(max_size=200),
        PUSHES.map(json.dumps),
        PUSHES.map(lambda p: gzip.compress(json.dumps(p).encode())),
    )
)
def test_any_frame_gives_events_or_value_error(frame: str | bytes) -> None:
    try:
        events = parser()(frame)
    except ValueError:
        return
    assert all(isinstance(e, Event) for e in events)
