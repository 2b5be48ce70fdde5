"""The emulator's PROTOCOLS.md scenarios (section 2), driven by a bare WebSocket client."""

from __future__ import annotations

import contextlib
import gzip
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import pytest
from tocsin_bge import BGEEmulator
from tocsin_bge.emulator import DEMO_ACCESS_KEY, DEMO_SECRET_KEY
from tocsin_bge.protocol import sign
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from support import wait_for

from .conftest import ACCESS_KEY, FAST, PAIR, SECRET_KEY, fixture_text


@asynccontextmanager
async def client(emu: BGEEmulator) -> AsyncIterator[ClientConnection]:
    async with connect(emu.url, ping_interval=None) as ws:
        yield ws


async def frame(ws: ClientConnection, *, pings: bool = False, within: float = 3) -> Any:
    """The next frame (gunzipped when binary), answering pings unless ``pings``."""
    with anyio.fail_after(within):
        while True:
            raw = await ws.recv()
            if isinstance(raw, bytes):
                raw = gzip.decompress(raw).decode()
            msg = json.loads(raw)
            if pings or "ping" not in msg:
                return msg
            await ws.send(json.dumps({"pong": msg["ping"]}))


async def request(ws: ClientConnection, **msg: Any) -> Any:
    await ws.send(json.dumps(msg))
    return await frame(ws)


def sub(type_: str, product: str = PAIR, biz: str = "market", **extra: Any) -> dict[str, Any]:
    return {"event": "sub", "biz": biz, "type": type_, "product": product, **extra}


def login(key: str = ACCESS_KEY, secret: str = SECRET_KEY, ts: int | str | None = None) -> Any:
    stamp = int(time.time() * 1000) if ts is None else ts
    params = {"type": "api", "access_key": key, "access_sign": sign(secret, stamp)}
    return {"event": "login", "params": {**params, "access_timestamp": stamp}}


async def closed(
    ws: ClientConnection, *, pongs: bool = False, within: float = 3
) -> tuple[int | None, str | None]:
    """Read (answering pings with ``pongs``) until the server closes; its code and reason."""
    with anyio.fail_after(within), contextlib.suppress(ConnectionClosed):
        async for raw in ws:
            msg = json.loads(gzip.decompress(raw) if isinstance(raw, bytes) else raw)
            if pongs and "ping" in msg:
                await ws.send(json.dumps({"pong": msg["ping"]}))
    return ws.close_code, ws.close_reason


@pytest.fixture
async def emu() -> AsyncIterator[BGEEmulator]:
    async with BGEEmulator(keys={ACCESS_KEY: SECRET_KEY}, **FAST) as emulator:
        yield emulator


# 1. keepalive and the server's limits


async def test_1_pong_with_the_same_ts_keeps_the_socket(emu: BGEEmulator) -> None:
    async with client(emu) as ws:
        ping = await frame(ws, pings=True)
        assert set(ping) == {"ping"} and isinstance(ping["ping"], int)
        assert (await request(ws, **sub("orderbook", interval="0")))["code"] == 200
        while emu.clients[0].pongs < 9:  # 0.9 s: past every timer, the socket stays
            await frame(ws)  # pongs to pings, reads the orderbook snapshots
        assert emu.clients[0].bad_pongs == 0
    assert not emu.closed


async def test_1_no_pong_closes(emu: BGEEmulator) -> None:
    async with client(emu) as ws:
        await ws.send(json.dumps(sub("orderbook", interval="0")))
        await ws.send(json.dumps({"pong": 12345}))  # not a ping's value: does not count
        assert await closed(ws) == (1008, "no pong within 600ms")
    assert emu.closed == {"no pong": 1}
    await wait_for(lambda: not emu.clients)  # the handler has let it go
    assert emu.connections == 1


async def test_1_nothing_subscribed_closes(emu: BGEEmulator) -> None:
    async with client(emu) as ws:
        assert await closed(ws, pongs=True) == (1008, "nothing subscribed within 600ms")
    assert emu.closed == {"nothing subscribed": 1}


async def test_1_nothing_pushed_closes_a_quiet_subscription(emu: BGEEmulator) -> None:
    async with client(emu) as ws:
        assert (await request(ws, **sub("ticker")))["code"] == 200
        # pings only, answered: they are not pushes
        assert await closed(ws, pongs=True) == (1008, "nothing pushed for 600ms")
    assert emu.closed == {"nothing pushed": 1}


async def test_1_51_messages_in_a_second_close_and_pongs_count() -> None:
    async with BGEEmulator(**FAST) as emu, client(emu) as ws:  # type: ignore[arg-type]
        for _ in range(51):
            await ws.send(json.dumps({"pong": 1}))
        assert await closed(ws) == (1008, "more than 50 messages in 1s")
    assert emu.closed == {"rate limit": 1} and emu.peak_rate == 51


async def test_1_pongs_can_be_left_out_of_the_rate_limit() -> None:
    async with BGEEmulator(pongs_count=False) as emu, client(emu) as ws:
        for _ in range(60):
            await ws.send(json.dumps({"pong": 1}))
        assert (await request(ws, **sub("ticker")))["code"] == 200  # still open
    assert not emu.closed and emu.peak_rate == 1


# 2. the v1 shape


async def test_2_the_v1_para_shape_gets_a_string_400(emu: BGEEmulator) -> None:
    text = fixture_text("sub_request_v1_para.json")
    async with client(emu) as ws:
        await ws.send(text)
        answer = await frame(ws)
        assert await request(ws, event="sub", biz="market") == {
            "event": "sub",
            "code": "400",
            "msg": 'Invalid request: {"event": "sub", "biz": "market"}',
        }
        assert (await request(ws, event="sub", params={"biz": "market"}))["code"] == "400"
    assert answer == {"event": "sub", "code": "400", "msg": f"Invalid request: {text}"}


# 3. private before login


async def test_3_a_private_sub_before_login_gets_401(emu: BGEEmulator) -> None:
    async with client(emu) as ws:
        answer = await request(ws, **sub("orders", "all", "exchange"))
        assert answer["code"] == 401 and answer["status"] == "FAIL"
        assert (answer["event"], answer["type"], answer["product"]) == ("sub", "orders", "all")
        assert (await request(ws, **login()))["code"] == 200
        assert (await request(ws, **sub("orders", "all", "exchange")))["code"] == 200


# 4. login errors


@pytest.mark.parametrize(
    ("fields", "code"),
    [
        ({"key": ""}, 40001),
        ({"secret": "not the secret"}, 40010),
        ({"age_ms": 120_000}, 40008),  # two minutes old
        ({"key": "unknown-key"}, 40006),
        ({"ts": "yesterday"}, 40005),
    ],
)
async def test_4_login_errors(emu: BGEEmulator, fields: dict[str, Any], code: int) -> None:
    age = fields.pop("age_ms", 0)
    if age:  # built here, not at collection: the timestamp must be fresh but for this
        fields["ts"] = int(time.time() * 1000) - age
    async with client(emu) as ws:
        answer = await request(ws, **login(**fields))
    assert answer["event"] == "login" and answer["code"] == code and answer["msg"]


async def test_4_login_accepts_an_iso_timestamp_and_the_v1_spelling() -> None:
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime())
    params = {
        "type": "api",
        "access-key": DEMO_ACCESS_KEY,
        "access-sign": sign(DEMO_SECRET_KEY, stamp),
        "access-timestamp": stamp,
    }
    async with BGEEmulator() as emu, client(emu) as ws:
        answer = await request(ws, event="login", params=params)
    assert answer["code"] == 200 and answer["status"] == "OK"


# 5. orders of all, assets of all


async def test_5_orders_of_all_are_ok_assets_of_all_are_not(emu: BGEEmulator) -> None:
    async with client(emu) as ws:
        await request(ws, **login())
        ok = await request(ws, **sub("orders", "all", "exchange"))
        refused = await request(ws, **sub("assets", "all", "exchange"))
        await emu.push_order({"order_id": "7", "product": "ETH_USDT", "status": "1"})
        pushed = await frame(ws)
    assert (ok["code"], ok["status"]) == (200, "OK")
    assert (refused["code"], refused["status"], refused["type"]) == (400, "FAIL", "assets")
    assert pushed["product"] == "all" and pushed["data"][0]["product"] == "ETH_USDT"


# 6. zip


async def test_6_zip_subscriptions_get_binary_gzip_pushes(emu: BGEEmulator) -> None:
    async with client(emu) as ws:
        await request(ws, **sub("ticker", zip=True))
        await request(ws, **sub("ticker", "ETH_USDT", zip=False))
        await emu.push_ticker(PAIR, 30_000)
        await emu.push_ticker("ETH_USDT", 2_000)
        raws = []
        while len(raws) < 2:
            raw = await ws.recv()
            if b"ping" not in (raw if isinstance(raw, bytes) else raw.encode()):
                raws.append(raw)
    zipped, plain = raws
    assert isinstance(zipped, bytes) and zipped[:2] == b"\x1f\x8b"
    assert json.loads(gzip.decompress(zipped))["data"][0]["close"] == "30000.00"
    assert isinstance(plain, str) and json.loads(plain)["product"] == "ETH_USDT"


# 7. a duplicate and a gap in seq_id


async def test_7_a_duplicate_and_a_gap_in_seq_id(emu: BGEEmulator) -> None:
    async with client(emu) as ws:
        await request(ws, **sub("ticker"))
        first = await emu.push_ticker(PAIR, 1)
        await emu.push_duplicate("ticker", PAIR)
        emu.skip_seq("ticker", PAIR, count=2)
        await emu.push_ticker(PAIR, 2)
        seqs = [(await frame(ws))["data"][0]["seq_id"] for _ in range(3)]
    assert seqs == [first, first, first + 3]


# 8. the orderbook snapshot repeats unchanged


async def test_8_the_orderbook_snapshot_repeats_unchanged(emu: BGEEmulator) -> None:
    async with client(emu) as ws:
        ack = await request(ws, **sub("orderbook", interval="0"))
        assert ack["interval"] == 0  # echoed as a number
        seq = await emu.set_orderbook(PAIR, [["3.7366", "0.66"]], [["3.9966", "0.9"]])
        books = [await frame(ws) for _ in range(5)]
    books = [b for b in books if b["data"]["seq_id"] == seq]
    assert len(books) >= 3 and all(b["data"] == books[0]["data"] for b in books)
    assert books[0]["data"] == {
        "seq_id": seq,
        "bids": [["3.7366", "0.66"]],
        "asks": [["3.9966", "0.9"]],
    }


# and the rest: req, candles history, demo, refusals at the handshake


async def test_req_answers_candles_in_range_and_a_ticker_snapshot(emu: BGEEmulator) -> None:
    for start in (600, 660, 720):
        await emu.push_candle(PAIR, "1min", start, 1, 2, push=False)
    async with client(emu) as ws:
        candles = await request(
            ws,
            event="req",
            biz="market",
            type="candles",
            product=PAIR,
            interval="1min",
            **{"from": 650, "to": 720},
        )
        await emu.push_ticker(PAIR, 30_000)
        snapshot = await request(ws, event="req", biz="market", type="ticker", product=PAIR)
        fills = await request(ws, event="req", biz="market", type="fills", product=PAIR)
    assert candles["event"] == "req" and candles["code"] == 200
    assert [c["id"] for c in candles["data"]] == [660, 720]
    assert isinstance(snapshot["data"], dict) and snapshot["data"]["close"] == "30000.00"
    assert fills["code"] == "400"


async def test_unknown_paths_and_outages_are_refused_at_the_handshake(emu: BGEEmulator) -> None:
    with pytest.raises(Exception, match="HTTP 404"):
        async with connect(emu.url.replace("/v2/ws", "/ws")):
            pass
    emu.refuse = True
    with pytest.raises(Exception, match="HTTP 503"):
        async with connect(emu.url):
            pass
    assert emu.connections == 2


async def test_demo_traffic_waits_for_a_subscriber_then_wanders_around_30000() -> None:
    async with BGEEmulator(demo_interval=0.01) as emu:
        source = emu.demo_source()
        assert source["url"] == emu.url and source["plugin"] == "bge"
        async with anyio.create_task_group() as tg:
            tg.start_soon(emu.demo_traffic)
            async with client(emu) as ws:
                await request(ws, **sub("ticker"))
                closes = []
                while len(closes) < 60:
                    msg = await frame(ws)
                    closes.append(float(msg["data"][0]["close"]))
            tg.cancel_scope.cancel()
    assert all(29_000 < c < 31_000 for c in closes)
    assert any(c > 30_500 for c in closes[:10])  # the first alert comes early
    assert any(c < 30_500 for c in closes)
