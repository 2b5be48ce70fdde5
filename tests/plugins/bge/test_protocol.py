"""protocol.py without sockets: recorded frames, decompression, normalization, ids, fuzzing."""

from __future__ import annotations

import gzip
import json
import zlib
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tocsin_bge.protocol import (
    MAX_INFLATED,
    ChannelKey,
    Other,
    Ping,
    Push,
    Reply,
    SeqTracker,
    TokenBucket,
    canonical_interval,
    channel_key,
    decode_frame,
    inflate,
    login_message,
    normalize,
    parse_code,
    parse_frame,
    parse_message,
    pong_message,
    refusal,
    req_message,
    server_text,
    sign,
    snake_case,
    sub_message,
)

from tocsin import SourceAuthError, SourceError
from tocsin.testing import RecordingContext

from .conftest import fixture_json, fixture_text

CANDLES = ChannelKey("candles", "BTC_USDT", "15min")


def push(name: str) -> Push:
    msg = parse_frame(fixture_text(name))
    assert isinstance(msg, Push)
    return msg


# -- frames ----------------------------------------------------------------------------


def test_ping_keeps_its_value_in_the_pong() -> None:
    assert parse_frame(fixture_text("ping.json")) == Ping(1635065532000)
    assert json.loads(pong_message(1635065532000)) == fixture_json("pong.json")
    assert pong_message("1635065532000") == '{"pong":"1635065532000"}'  # a string stays one
    with pytest.raises(ValueError, match="bad ping"):
        parse_message({"ping": None})


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("sub_ack_candles.json", Reply("sub", 200, True, "", CANDLES)),
        # the orderbook ack echoes its interval as a number
        (
            "sub_ack_orderbook.json",
            Reply("sub", 200, True, "", ChannelKey("orderbook", "BTC_USDT", "0")),
        ),
        ("sub_fail_orders_all.json", Reply("sub", 500, False, "", ChannelKey("orders", "ALL", ""))),
        # the seed's 400: a string code, and the request echoed (cut off, it may hold a key)
        ("error_400_seed.json", Reply("sub", 400, False, "Invalid request", None)),
        ("login_error_40001_seed.json", Reply("login", 40001, False, "ACCESS_KEY不能為空", None)),
        # the English docs put the reason in "status"
        (
            "login_error_40001_status.json",
            Reply("login", 40001, False, "ACCESS_KEY cannot be empty", None),
        ),
        ("login_ok.json", Reply("login", 200, True, "", None)),
    ],
)
def test_replies(name: str, expected: Reply) -> None:
    assert parse_frame(fixture_text(name)) == expected


def test_code_as_string_or_int() -> None:
    assert parse_code("400") == parse_code(400) == parse_code(" 400 ") == 400
    assert parse_code(None) is None
    for bad in ("4OO", True, 4.0, [400]):
        with pytest.raises(ValueError, match="bad code"):
            parse_code(bad)
    ok = parse_message({"event": "sub", "code": "200", "type": "ticker", "product": "BTC_USDT"})
    assert isinstance(ok, Reply) and ok.ok


def test_server_text_is_printable_bounded_and_never_echoes_a_request() -> None:
    assert server_text('Invalid request: {"event":"login","params":{"access_key":"AK"}}') == (
        "Invalid request"
    )
    assert server_text("bad\x00\x1b[31m thing") == "bad[31m thing"
    assert len(server_text("x" * 1000)) == 200


def test_decompression_by_sniffing() -> None:
    body = fixture_text("push_ticker.json").encode()
    raw_deflate = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    deflated = raw_deflate.compress(body) + raw_deflate.flush()
    frames = [gzip.compress(body), zlib.compress(body), deflated, body]
    for frame in frames:
        assert decode_frame(frame) == fixture_json("push_ticker.json")
    assert parse_frame(gzip.compress(body)) == push("push_ticker.json")


def test_a_compression_bomb_is_refused() -> None:
    bomb = gzip.compress(b"[" + b" " * (MAX_INFLATED * 8) + b"]")
    assert len(bomb) < 20_000
    with pytest.raises(ValueError, match="decompressed frame too large"):
        decode_frame(bomb)
    with pytest.raises(ValueError, match="decompressed frame too large"):
        inflate(zlib.compress(b"0" * 2000), limit=1000)
    assert inflate(zlib.compress(b"0" * 1000), limit=1000) == b"0" * 1000


@pytest.mark.parametrize(
    ("frame", "reason"),
    [
        (gzip.compress(b'{"ping": 1}', mtime=0)[:-6], "truncated compressed frame"),
        (b"\x00\x01garbage", "bad compressed frame"),
        (b"", "truncated compressed frame"),
        (gzip.compress(b"not json", mtime=0), "not JSON"),
        ("[1, 2", "not JSON"),
        ("[1, 2]", "not a JSON object"),
        ('{"data": [], "type": "ticker"}', "data without type or product"),
        ('{"data": 5, "type": "ticker", "product": "BTC_USDT"}', "malformed data"),
        ('{"data": [], "type": "ticker", "product": "B", "seq_id": "x"}', "bad seq_id"),
        ('{"event": "sub", "code": "four hundred"}', "bad code"),
        ('{"event": ["sub"]}', "bad event"),
    ],
)
def test_malformed_frames(frame: str | bytes, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        parse_frame(frame)


@settings(max_examples=150, deadline=None)
@given(st.one_of(st.binary(max_size=300), st.text(max_size=300)))
def test_any_frame_is_a_message_or_a_value_error(raw: str | bytes) -> None:
    try:
        msg = parse_frame(raw)
    except ValueError:
        return
    assert isinstance(msg, Ping | Reply | Push | Other)


JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)
KEYS = st.sampled_from(
    [
        "ping",
        "event",
        "code",
        "status",
        "msg",
        "type",
        "product",
        "interval",
        "data",
        "seq_id",
        "seqId",
        "id",
        "ts",
        "biz",
    ]
)
FRAMES = st.dictionaries(
    KEYS,
    JSON
    | st.sampled_from(["ticker", "candles", "orderBook", "BTC_USDT", "15min", "req", "sub", "200"]),
    max_size=8,
)
ITEMS = st.dictionaries(
    st.sampled_from(
        ["id", "seq_id", "seqId", "close", "orders_id", "status", "bids", "ts", "product", "x"]
    ),
    JSON,
    max_size=6,
)


@settings(max_examples=150, deadline=None)
@given(FRAMES, st.lists(ITEMS, max_size=3))
def test_any_json_frame_normalizes_or_raises_value_error(
    frame: dict[str, Any], items: list[Any]
) -> None:
    if "data" in frame and items:
        frame["data"] = items
    for raw in (orjson.dumps(frame), gzip.compress(orjson.dumps(frame))):
        try:
            msg = parse_frame(raw)
            if isinstance(msg, Push):
                for item in normalize(msg):
                    orjson.dumps(item.data)  # what the daemon will serialize
                    assert item.id
        except ValueError:
            pass


# -- normalization and ids -------------------------------------------------------------


def test_ticker_push_becomes_one_event_with_numbers() -> None:
    (item,) = normalize(push("push_ticker.json"))
    assert item.type == "ticker"
    assert item.seq_id == 112588640
    assert item.time == "2023-07-12T06:48:07.000Z"  # the item's id is its unix time
    assert item.data == {
        "id": 1689144487,
        "seq_id": 112588640,
        "open": 3.7366,
        "close": 3.7366,
        "high": 3.7366,
        "low": 3.7366,
        "filled_size": 0,
        "vol": 0,
        "count": 0,
        "change": 0,
        "change_percent": 0,
        "product": "BTC_USDT",
        "interval": None,
    }


def test_camel_case_and_orderbook_spellings() -> None:
    (camel,) = normalize(push("push_ticker_camel.json"))
    (snake,) = normalize(push("push_ticker.json"))
    assert camel.id == snake.id  # the same tick, however it is spelled
    assert camel.data["seq_id"] == 112588640
    assert camel.data["change_percent"] == 0 and camel.data["turn_over"] == 0
    assert "seqId" not in camel.data and "changePercent" not in camel.data
    book = push("push_orderbook_camel.json")
    assert book.channel == ChannelKey("orderbook", "BTC_USDT", "0")  # "orderBook", interval 0
    (old,) = normalize(book)
    (new,) = normalize(push("push_orderbook.json"))
    assert old.type == new.type == "orderbook"
    assert old.data["bids"] == [[3.7366, 0.66], [3.6866, 0.98], [3.4666, 0.33]]
    # the same book under another seq_id and frame id: the same fact
    assert old.id == new.id


def test_a_seq_id_beyond_64_bits_is_refused() -> None:
    # the daemon writes events with orjson, which takes no integer beyond 64 bits
    msg = parse_message({"type": "ticker", "product": "B", "data": {"seq_id": "9" * 19}})
    assert isinstance(msg, Push)
    with pytest.raises(ValueError, match="bad seq_id"):
        normalize(msg)


def test_snake_case_wins_over_its_camel_twin() -> None:
    msg = parse_message(
        {"type": "ticker", "product": "BTC_USDT", "data": [{"seqId": 1, "seq_id": 2, "close": "5"}]}
    )
    assert isinstance(msg, Push)
    assert normalize(msg)[0].data["seq_id"] == 2
    assert snake_case("changePercent") == "change_percent" and snake_case("seq_id") == "seq_id"


def test_candles_pushed_and_fetched_agree() -> None:
    (pushed,) = normalize(push("push_candles.json"))
    assert pushed.time == "2023-07-12T06:45:00.000Z"
    assert pushed.data["interval"] == "15min" and pushed.data["seq_id"] == 112588635
    answer = push("req_candles.json")
    assert answer.answer and answer.channel == CANDLES
    fetched = normalize(answer)
    assert [i.data["id"] for i in fetched] == [1688398200, 1688399100]
    assert all(i.seq_id is None for i in fetched)
    # The same candle, pushed (with a seq_id) and fetched (without): the same id.
    same = parse_message(
        {
            "type": "candles",
            "product": "BTC_USDT",
            "interval": "15min",
            "event": "req",
            "code": 200,
            "data": [{**fixture_json("push_candles.json")["data"], "seq_id": None}],
        }
    )
    assert isinstance(same, Push)
    assert normalize(same)[0].id == pushed.id
    # An update of the open candle is a new fact.
    moved = fixture_json("push_candles.json")
    moved["data"] |= {"close": "3.8", "high": "3.8", "seq_id": 112588636}
    assert normalize(parse_frame(json.dumps(moved)))[0].id != pushed.id  # type: ignore[arg-type]


def test_fills_orders_assets_percent10() -> None:
    (fill,) = normalize(push("push_fills.json"))
    assert fill.time == "2023-07-12T08:57:59.117Z"
    assert fill.data["price"] == 3.4134 and fill.data["direction"] == "buy"
    (order,) = normalize(push("push_orders.json"))
    assert order.data["order_id"] == order.data["orders_id"] == "179577241915696235"
    assert order.data["status"] == 1 and order.data["price"] == 3.5334
    filled = fixture_json("push_orders.json")
    filled["data"][0] |= {"status": "3", "filled_size": "1"}
    assert normalize(parse_frame(json.dumps(filled)))[0].id != order.id  # type: ignore[arg-type]
    usdt, eth = normalize(push("push_assets.json"))
    assert (usdt.data["symbol"], eth.data["symbol"]) == ("USDT", "ETH")
    assert usdt.data["available"] == 999970.5238 and usdt.id != eth.id
    (depth,) = normalize(push("push_percent10.json"))
    assert depth.seq_id == 112588640 and depth.data["asks"][0] == [3.8685333, 0]


def test_ids_are_stable_and_channel_specific() -> None:
    a = normalize(push("push_ticker.json"))[0].id
    assert a == normalize(push("push_ticker.json"))[0].id
    other = fixture_json("push_ticker.json")
    other["product"] = "ETH_USDT"
    assert normalize(parse_frame(json.dumps(other)))[0].id != a  # type: ignore[arg-type]


def test_intervals() -> None:
    assert canonical_interval("4 hours") == canonical_interval("4hour") == "4hour"
    assert canonical_interval("1hour") == canonical_interval("60min") == "60min"
    assert channel_key("orderBook", "btc_usdt", "0") == ChannelKey("orderbook", "BTC_USDT", "0")
    assert channel_key("candles", "BTC_USDT", "15min").label == "candles BTC_USDT 15min"


# -- client -> server ------------------------------------------------------------------


def test_sign_matches_an_independent_hmac() -> None:
    # openssl dgst -sha256 -hmac SECRET -binary | base64, over the timestamp alone
    secret = "43767b4dec6e78e07c81f89af47018dc3ab57585721bf57a389f7637a9d0506b"
    assert sign(secret, 1690364037503) == "/VbzZNaWdqoG6/h13wywI4WZcPvEzqh0CnpM8rlMlGw="
    assert sign(secret, "2022-01-08T07:19:56.339Z") == (
        "HzcaoowUcwyMbgf2yJ63rV6O7dji8+sGvnGl3PfowTI="
    )


def test_messages() -> None:
    assert json.loads(sub_message("market", "candles", "BTC_USDT", "15min", zip=False)) == (
        fixture_json("sub_request_candles.json")
    )
    assert json.loads(sub_message("market", "ticker", "BTC_USDT", zip=True)) == {
        "event": "sub",
        "biz": "market",
        "type": "ticker",
        "product": "BTC_USDT",
        "zip": True,
    }
    assert json.loads(
        req_message("market", "candles", "BTC_USDT", "15min", zip=False, start=1, end=2)
    ) == {
        "event": "req",
        "biz": "market",
        "type": "candles",
        "product": "BTC_USDT",
        "interval": "15min",
        "zip": False,
        "from": 1,
        "to": 2,
    }
    login = json.loads(login_message("", "sign", 14000000000))
    assert login == fixture_json("login_request_seed.json")


def test_refusals() -> None:
    bad_key = refusal("login", 40006, "Invalid ACCESS_KEY", None)
    assert isinstance(bad_key, SourceAuthError)
    assert (
        str(bad_key)
        == "BGE refused the login: the access key is invalid (40006: Invalid ACCESS_KEY)"
    )
    for code in (40001, 40010, 40013, 40016):
        assert isinstance(refusal("login", code, "", None), SourceAuthError)
    for code in (40005, 40008, 500, None):
        error = refusal("login", code, "", None)
        assert isinstance(error, SourceError) and not isinstance(error, SourceAuthError)
    assert "is the clock right?" in str(refusal("login", 40008, "", None))
    sub = refusal("sub", 401, "", ChannelKey("orders", "ALL", ""))
    assert str(sub) == "BGE refused the subscription to orders ALL: not logged in (401)"
    assert str(refusal("sub", 400, "Invalid request", None)) == (
        "BGE refused a sub: invalid request (400: Invalid request)"
    )


# -- stateful helpers ------------------------------------------------------------------


def test_seq_tracker_drops_repeats_and_reports_gaps() -> None:
    tracker = SeqTracker()
    key = ChannelKey("ticker", "BTC_USDT", "")
    assert tracker.admit(key, [10]) == ({10}, [])
    assert tracker.admit(key, [10]) == (set(), [])  # a duplicate
    assert tracker.admit(key, [11]) == ({11}, [])
    assert tracker.admit(key, [15]) == ({15}, [(12, 14)])
    assert tracker.admit(key, [18], gaps=False) == ({18}, [])
    # A late push (20 after 21) is new, and reports no gap of what came already.
    assert tracker.admit(key, [21]) == ({21}, [(19, 20)])
    assert tracker.admit(key, [20]) == ({20}, [])
    assert tracker.admit(key, [22]) == ({22}, [])
    tracker.reset()  # a new connection: the jump is the reconnect's gap, not a seq gap
    assert tracker.admit(key, [30]) == ({30}, [])
    assert tracker.admit(key, [15]) == (set(), [])  # seen before the reconnect
    assert tracker.admit(ChannelKey("ticker", "ETH_USDT", ""), [15]) == ({15}, [])


def test_token_bucket_keeps_any_second_under_50_and_pongs_first() -> None:
    bucket = TokenBucket(now=0.0)
    sent, now = [], 0.0
    while now < 5.0:  # a queue of subscriptions sent as fast as the bucket allows
        wait = bucket.take(now)
        if wait:
            now += wait
        else:
            sent.append(now)
    assert max(sum(1 for t in sent if start <= t < start + 1) for start in sent) <= 40
    # with the ordinary tokens spent, a pong still leaves at once
    while bucket.take(now) == 0:
        pass
    assert bucket.take(now, priority=True) == 0.0


def test_a_book_returning_to_an_earlier_state_is_a_new_fact_each_time() -> None:
    from tocsin_bge.intake import PushIntake

    key = ChannelKey("orderbook", "BTC_USDT", "")
    intake = PushIntake([key])
    ctx = RecordingContext("market", "bge")

    def book(bid: str, seq: int) -> dict[str, Any]:
        data = {"asks": [["30001", "1"]], "bids": [[bid, "1"]], "seq_id": seq}
        return {
            "biz": "market",
            "type": "orderbook",
            "product": "BTC_USDT",
            "code": 200,
            "data": data,
        }

    ids = []
    for seq, bid in enumerate(["30000", "30000", "29000", "30000", "29000"]):
        push = parse_message(book(bid, seq))
        assert isinstance(push, Push)
        ids += [e.id for e in intake.take(key, push, ctx, backfill=False, gaps=True).events]
    # A, (A again: no news), B, A, B: four facts, four ids.
    assert len(ids) == 4 == len(set(ids))
    # The first is the content's id: a restart re-sent the same book is no news.
    fresh = PushIntake([key])
    push = parse_message(book("30000", 9))
    assert isinstance(push, Push)
    assert [e.id for e in fresh.take(key, push, ctx, backfill=False, gaps=True).events] == ids[:1]
