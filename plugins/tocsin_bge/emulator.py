"""A local BGE v2 server: the protocol of PROTOCOLS.md section 2, strict where BGE is.

- ``{"ping": ts}`` every ``ping_interval``; the connection is closed (1008) when a ping
  goes unanswered for ``pong_timeout``, when nothing is subscribed within
  ``subscribe_timeout`` of connecting, when nothing was pushed for ``idle_timeout`` after
  subscribing (a ``req`` answer counts as a push; a ping does only with
  ``pings_count_as_push``), or when a client sends more than ``rate_limit`` messages in
  ``rate_window`` (pongs count unless ``pongs_count=False``). BGE's timers are all 30 s.
- ``login`` checks the signature (``Base64(HMAC-SHA256(secret, timestamp))``) against
  ``keys`` (access key -> secret key): 40001/40002/40003 for an empty key, sign or
  timestamp, 40005 an unreadable timestamp, 40006 an unknown key, 40013 a banned one,
  40008 a timestamp more than ``timestamp_window`` away, 40010 a wrong signature.
- ``sub``/``unsub``/``req`` in the v2 shape; the v1 shape (``para``/``params``) and any
  invalid channel get the seed's ``{"event", "code": "400", "msg": "Invalid request: ..."}``;
  a private channel before login gets 401; ``assets`` of ``all`` gets
  ``assets_all_code``; ``orders`` of ``all`` receives every pair's orders.
- ``zip: true`` subscriptions receive their pushes as binary gzip frames.
- orderbook and percent10 snapshots are re-sent every ``orderbook_interval`` even when
  unchanged (same ``seq_id``); candles are kept, so a ``req`` with ``from``/``to`` answers.
- ``seq_id`` counts +1 per push on each channel [inferred]; ``skip_seq`` makes a gap and
  ``push_duplicate`` re-sends the last frame of a channel.

Tests push with ``push_ticker``, ``push_candle``, ``set_orderbook``, ``set_percent10``,
``push_fills``, ``push_order``, ``push_assets``, ``push_duplicate``, ``push_raw``; cut
with ``skip_seq``, ``drop_connections``, ``mute``; read ``connections``, ``clients`` (each
with its ``subs``, ``pongs``, ``bad_pongs``), ``received``, ``closed`` (why the emulator
closed connections) and ``peak_rate``; and set ``keys``, ``banned``, ``login_errors``,
``sub_errors``, ``req_errors`` and ``refuse``.
"""

from __future__ import annotations

import contextlib
import gzip
import math
import random
import time
from collections import Counter, deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from http import HTTPStatus
from typing import Any
from urllib.parse import urlsplit

import anyio
import orjson
from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from tocsin import ScrubbingLogger, WebSocketEmulator, format_duration

from .protocol import (
    BIZ_OF,
    CANDLE_INTERVALS,
    MAX_FRAME,
    ORDERBOOK_LEVELS,
    SNAPSHOT_TYPES,
    ChannelKey,
    channel_key,
    sign,
)

DEMO_PRODUCT = "BTC_USDT"
DEMO_ACCESS_KEY = "demo-bge-access-key"
DEMO_SECRET_KEY = "demo-bge-secret-key-4f1c"
DEMO_THRESHOLD = 30_500
_PRODUCT_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_")
ALL_ORDERS = ChannelKey("orders", "ALL", "")


class _Invalid(Exception):
    """The request gets the seed's string-code 400."""


@dataclass(eq=False)
class Client:
    """One accepted connection."""

    ws: ServerConnection
    connected_at: float
    subs: dict[ChannelKey, bool] = field(default_factory=dict)  # channel -> zip
    user: str | None = None  # the access key it logged in with
    pings: dict[int, float] = field(default_factory=dict)  # unanswered: value -> sent at
    subscribed_at: float | None = None
    last_push: float = 0.0
    times: deque[float] = field(default_factory=deque)  # messages within the rate window
    pongs: int = 0
    bad_pongs: int = 0
    silent: bool = False  # muted: TCP open, nothing sent, no rule enforced


def _fmt(price: float) -> str:
    return f"{price:.2f}"


class BGEEmulator(WebSocketEmulator):
    """A local BGE v2 WebSocket server with control methods for tests and the demo."""

    name = "bge"
    path = "/v2/ws"

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        keys: Mapping[str, str] | None = None,
        ping_interval: float = 10.0,
        pong_timeout: float = 30.0,
        subscribe_timeout: float = 30.0,
        idle_timeout: float = 30.0,
        rate_limit: int = 50,
        rate_window: float = 1.0,
        pongs_count: bool = True,
        pings_count_as_push: bool = False,
        orderbook_interval: float | None = 0.5,
        timestamp_window: float = 30.0,
        assets_all_code: int = 400,
        demo_interval: float = 0.5,
    ) -> None:
        super().__init__(host, port)
        self.keys = dict(keys if keys is not None else {DEMO_ACCESS_KEY: DEMO_SECRET_KEY})
        self.ping_interval = ping_interval
        self.pong_timeout = pong_timeout
        self.subscribe_timeout = subscribe_timeout
        self.idle_timeout = idle_timeout
        self.rate_limit = rate_limit
        self.rate_window = rate_window
        self.pongs_count = pongs_count
        self.pings_count_as_push = pings_count_as_push
        self.orderbook_interval = orderbook_interval
        self.timestamp_window = timestamp_window
        self.assets_all_code = assets_all_code
        self.demo_interval = demo_interval
        self.banned: set[str] = set()
        self.login_errors: deque[int] = deque()  # codes forced on the next logins
        self.sub_errors: dict[str, int] = {}  # type -> code its subs are refused with
        self.req_errors: dict[str, int] = {}  # type -> code its reqs are refused with
        self.refuse = False  # answer handshakes with HTTP 503 (an outage)
        self.clients: list[Client] = []
        self.connections = 0  # handshakes received
        self.received: list[Any] = []  # every client message, parsed (or as received)
        self.closed: Counter[str] = Counter()  # why the emulator closed connections
        self.peak_rate = 0  # most messages one client sent within a rate window
        self.pushed = 0  # data frames sent (pushes, snapshots, req answers)
        # A market serial number per channel; starting from the clock keeps ids of one
        # demo run apart from the last one's (the daemon's state outlives a run).
        self._seq_start = int(time.time() * 1000)
        self._seq: dict[ChannelKey, int] = {}
        self._last: dict[ChannelKey, dict[str, Any]] = {}  # last frame per channel
        self.candles: dict[ChannelKey, dict[int, dict[str, Any]]] = {}
        self.books: dict[ChannelKey, dict[str, Any]] = {}  # orderbook / percent10 data
        self.tickers: dict[str, dict[str, Any]] = {}  # product -> last ticker item
        self.open_orders: dict[str, list[dict[str, Any]]] = {}  # product -> orders
        self.balances: dict[str, list[dict[str, Any]]] = {}  # product -> assets
        self._changed: anyio.Event | None = None
        self._log = ScrubbingLogger(
            "websockets.server", hide_frames=[b'"access_sign"', b'"access-sign"']
        )

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        self._changed = anyio.Event()
        await super().start()

    def serve_options(self) -> dict[str, Any]:
        return {
            "process_request": self._process_request,
            "max_size": MAX_FRAME,
            "logger": self._log,
            "ping_interval": None,  # BGE pings in JSON, not with WebSocket pings
        }

    def _process_request(self, ws: ServerConnection, request: Request) -> Response | None:
        self.connections += 1
        if urlsplit(request.path).path != self.path:
            return ws.respond(HTTPStatus.NOT_FOUND, "Not Found\n")
        if self.refuse:
            return ws.respond(HTTPStatus.SERVICE_UNAVAILABLE, "Service Unavailable\n")
        return None

    async def handle(self, ws: ServerConnection) -> None:
        client = Client(ws, anyio.current_time())
        self.clients.append(client)
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._timers, client)
                if self.orderbook_interval:
                    tg.start_soon(self._snapshots, client, self.orderbook_interval)
                try:
                    async for raw in ws:
                        await self._on_message(client, raw)
                except ConnectionClosed:
                    pass
                tg.cancel_scope.cancel()
        finally:
            self.clients.remove(client)
            self._notify()

    # -- control -------------------------------------------------------------------------

    @property
    def subscribed(self) -> int:
        """How many connected clients have at least one subscription."""
        return sum(1 for c in self.clients if c.subs)

    def subscribers(self, type_: str, product: str, interval: str = "") -> int:
        key = channel_key(type_, product, interval)
        return sum(1 for c in self.clients if key in c.subs)

    def next_seq(self, type_: str, product: str, interval: str = "") -> int:
        """The seq_id the next push on this channel will carry."""
        key = channel_key(type_, product, interval)
        return self._seq.get(key, self._seq_start)

    def _take_seq(self, key: ChannelKey) -> int:
        seq = self._seq.get(key, self._seq_start)
        self._seq[key] = seq + 1
        return seq

    def skip_seq(self, type_: str, product: str, interval: str = "", count: int = 1) -> None:
        """Lose ``count`` pushes on a channel: the next one shows a gap in ``seq_id``."""
        key = channel_key(type_, product, interval)
        self._seq[key] = self._seq.get(key, self._seq_start) + count

    async def push_ticker(
        self,
        product: str,
        close: float,
        *,
        open_: float | None = None,
        high: float | None = None,
        low: float | None = None,
        vol: float = 12.5,
    ) -> int:
        """A 24 h ticker push (``data`` a one-element list); returns its seq_id."""
        key = channel_key("ticker", product)
        opened = close if open_ is None else open_
        now = int(time.time())
        seq = self._take_seq(key)
        item = {
            "id": now,
            "seq_id": seq,
            "open": _fmt(opened),
            "close": _fmt(close),
            "high": _fmt(max(close, opened) if high is None else high),
            "low": _fmt(min(close, opened) if low is None else low),
            "filled_size": f"{vol * close:.4f}",
            "vol": f"{vol:.4f}",
            "count": 100 + seq % 1000,
            "change": _fmt(close - opened),
            "change_percent": f"{(close - opened) / opened * 100 if opened else 0:.2f}",
        }
        self.tickers[key.product] = item
        frame = {"id": str(now), "biz": "market", "type": "ticker", "product": key.product}
        await self._publish(key, {**frame, "data": [item]})
        return seq

    async def push_candle(
        self,
        product: str,
        interval: str,
        start: int,
        open_: float,
        close: float,
        *,
        high: float | None = None,
        low: float | None = None,
        vol: float = 1.0,
        push: bool = True,
    ) -> int:
        """Record the candle opening at ``start`` (unix s) and, with ``push``, push it."""
        key = channel_key("candles", product, interval)
        candle = {
            "id": start,
            "open": _fmt(open_),
            "close": _fmt(close),
            "high": _fmt(max(open_, close) if high is None else high),
            "low": _fmt(min(open_, close) if low is None else low),
            "filled_size": f"{vol * close:.4f}",
            "vol": f"{vol:.4f}",
            "count": 3,
        }
        self.candles.setdefault(key, {})[start] = candle
        if not push:
            return -1
        seq = self._take_seq(key)
        frame: dict[str, Any] = {"id": str(start), "biz": "market", "type": "candles"}
        frame |= {"data": {**candle, "seq_id": seq}, "product": key.product}
        await self._publish(key, {**frame, "interval": key.interval})
        return seq

    async def set_orderbook(
        self, product: str, bids: list[list[str]], asks: list[list[str]], interval: str = "0"
    ) -> int:
        """A new book (new seq_id), pushed now and re-sent unchanged every ``orderbook_interval``."""
        key = channel_key("orderbook", product, interval)
        seq = self._take_seq(key)
        self.books[key] = {"seq_id": seq, "bids": bids, "asks": asks}
        await self._publish(key, self._snapshot_frame(key))
        return seq

    async def set_percent10(
        self, product: str, bids: list[list[str]], asks: list[list[str]]
    ) -> int:
        key = channel_key("percent10", product)
        seq = self._take_seq(key)
        self.books[key] = {"bids": bids, "asks": asks, "seq_id": seq}
        await self._publish(key, self._snapshot_frame(key))
        return seq

    async def push_fills(self, product: str, trades: Iterable[Mapping[str, Any]]) -> None:
        """Trades as BGE pushes them: ``{id, ts, price, vol, direction}`` each, no seq_id."""
        key = channel_key("fills", product)
        data = [dict(t) for t in trades]
        frame = {"id": str(data[0].get("id", "")) if data else "", "biz": "market"}
        await self._publish(key, {**frame, "type": "fills", "data": data, "product": key.product})

    async def push_order(self, order: Mapping[str, Any]) -> None:
        """An order update (its ``product`` names the pair); open ones are kept for ``req``."""
        product = str(order["product"]).upper()
        key = channel_key("orders", product)
        book = [
            o
            for o in self.open_orders.get(product, [])
            if o.get("order_id") != order.get("order_id")
        ]
        if str(order.get("status")) in ("0", "1", "2"):
            book.append(dict(order))
        self.open_orders[product] = book
        frame = {"biz": "exchange", "type": "orders", "product": product, "data": [dict(order)]}
        await self._publish(key, frame)

    async def push_assets(self, product: str, balances: Iterable[Mapping[str, Any]]) -> None:
        key = channel_key("assets", product)
        self.balances[key.product] = [dict(b) for b in balances]
        frame = {"biz": "exchange", "type": "assets", "product": key.product}
        await self._publish(key, {**frame, "data": self.balances[key.product]})

    async def push_duplicate(self, type_: str, product: str, interval: str = "") -> int:
        """Re-send the last frame of a channel as is (same seq_id); returns how many got it."""
        key = channel_key(type_, product, interval)
        return await self._publish(key, self._last[key])

    async def push_raw(self, frame: str | bytes) -> int:
        """Send ``frame`` as is to every client (malformed, oversized, compressed...)."""
        return sum([await self._send(c, frame) for c in list(self.clients)])

    async def drop_connections(self, code: int = 1011, abort: bool = False) -> None:
        """Close every connection; ``abort`` cuts TCP with no close frame."""
        for client in list(self.clients):
            if abort:
                client.ws.transport.abort()
            else:
                await client.ws.close(code, "dropped by the emulator")

    def mute(self) -> None:
        """Current connections stay open but get nothing more (a dead server, TCP alive)."""
        for client in self.clients:
            client.silent = True

    async def wait_changed(self) -> None:
        """Wait for a client to subscribe, unsubscribe or go."""
        if self._changed is not None:
            await self._changed.wait()

    # -- sending -------------------------------------------------------------------------

    def _notify(self) -> None:
        if self._changed is not None:
            self._changed.set()
            self._changed = anyio.Event()

    async def _send(self, client: Client, frame: str | bytes) -> bool:
        if client.silent:
            return False
        try:
            await client.ws.send(frame)
        except ConnectionClosed:
            return False
        return True

    async def _push_to(self, client: Client, key: ChannelKey, frame: Mapping[str, Any]) -> bool:
        text = orjson.dumps(frame)
        sent = await self._send(
            client, gzip.compress(text) if client.subs.get(key) else text.decode()
        )
        if sent:
            client.last_push = anyio.current_time()
            self.pushed += 1
        return sent

    async def _publish(self, key: ChannelKey, frame: dict[str, Any]) -> int:
        """Push ``frame`` to each subscriber of ``key`` (and of orders ``all``)."""
        self._last[key] = frame
        sent = 0
        for client in list(self.clients):
            if key in client.subs:
                sent += await self._push_to(client, key, frame)
            elif key.type == "orders" and ALL_ORDERS in client.subs:
                sent += await self._push_to(client, ALL_ORDERS, {**frame, "product": "all"})
        return sent

    def _snapshot_frame(self, key: ChannelKey) -> dict[str, Any]:
        if key not in self.books:  # an empty book until set_* gives one
            self.books[key] = {"seq_id": self._take_seq(key), "bids": [], "asks": []}
        book = self.books[key]
        frame: dict[str, Any] = {"id": str(int(time.time())), "biz": "market", "type": key.type}
        if key.type == "percent10":
            return {**frame, "seq_id": book["seq_id"], "data": book, "product": key.product}
        return {**frame, "data": book, "product": key.product, "interval": key.interval}

    async def _snapshots(self, client: Client, every: float) -> None:
        # BGE sends these at most every 500 ms, changed or not.
        while True:
            await anyio.sleep(every)
            for key in list(client.subs):
                if key.type in SNAPSHOT_TYPES:
                    await self._push_to(client, key, self._snapshot_frame(key))

    async def _close(self, client: Client, why: str, reason: str) -> None:
        self.closed[why] += 1
        with contextlib.suppress(ConnectionClosed):
            await client.ws.close(1008, reason)

    async def _timers(self, client: Client) -> None:
        """Pings, and BGE's three 30 s rules."""
        next_ping = client.connected_at + self.ping_interval
        while True:
            if client.silent:
                await anyio.sleep(self.ping_interval)
                continue
            now = anyio.current_time()
            if now >= next_ping:
                value = int(time.time() * 1000)
                client.pings[value] = now
                await self._send(client, orjson.dumps({"ping": value}).decode())
                if self.pings_count_as_push and client.subs:
                    client.last_push = now
                next_ping = now + self.ping_interval
            wake = [next_ping]
            if client.pings:
                oldest = min(client.pings.values())
                if now - oldest >= self.pong_timeout:
                    await self._close(
                        client, "no pong", f"no pong within {format_duration(self.pong_timeout)}"
                    )
                    return
                wake.append(oldest + self.pong_timeout)
            if client.subscribed_at is None:
                if now - client.connected_at >= self.subscribe_timeout:
                    reason = f"nothing subscribed within {format_duration(self.subscribe_timeout)}"
                    await self._close(client, "nothing subscribed", reason)
                    return
                wake.append(client.connected_at + self.subscribe_timeout)
            elif client.subs:
                if now - client.last_push >= self.idle_timeout:
                    reason = f"nothing pushed for {format_duration(self.idle_timeout)}"
                    await self._close(client, "nothing pushed", reason)
                    return
                wake.append(client.last_push + self.idle_timeout)
            await anyio.sleep(max(0.0, min(wake) - now))

    # -- receiving -----------------------------------------------------------------------

    async def _on_message(self, client: Client, raw: str | bytes) -> None:
        try:
            msg = orjson.loads(raw)
        except orjson.JSONDecodeError:
            msg = None
        if len(self.received) >= 100_000:  # bounded when it runs for days (tocsin emulate)
            del self.received[:50_000]
        self.received.append(msg if msg is not None else raw)
        is_pong = isinstance(msg, dict) and "pong" in msg
        if self.pongs_count or not is_pong:
            now = anyio.current_time()
            client.times.append(now)
            while client.times and client.times[0] <= now - self.rate_window:
                client.times.popleft()
            self.peak_rate = max(self.peak_rate, len(client.times))
            if len(client.times) > self.rate_limit:
                reason = (
                    f"more than {self.rate_limit} messages in {format_duration(self.rate_window)}"
                )
                await self._close(client, "rate limit", reason)
                return
        text = raw if isinstance(raw, str) else raw.decode("utf-8", "replace")
        if not isinstance(msg, dict):
            await self._send(client, _invalid("", text))
            return
        if is_pong:
            self._pong(client, msg["pong"])
            return
        event = msg.get("event")
        try:
            if event == "login":
                reply = self._login(client, msg)
            elif event in ("sub", "unsub", "req"):
                if "para" in msg or "params" in msg:  # the v1 shape
                    raise _Invalid
                reply = self._request(client, event, msg)
            else:
                raise _Invalid
        except _Invalid:
            reply = _invalid(event if isinstance(event, str) else "", text)
        await self._send(client, reply)

    def _pong(self, client: Client, value: object) -> None:
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, int) and not isinstance(value, bool) and value in client.pings:
            answered = client.pings[value]
            client.pings = {v: at for v, at in client.pings.items() if at > answered}
            client.pongs += 1
        else:
            client.bad_pongs += 1

    def _login(self, client: Client, msg: dict[str, Any]) -> str:
        params = msg.get("params")
        if not isinstance(params, dict):
            raise _Invalid
        key = params.get("access_key", params.get("access-key"))
        signature = params.get("access_sign", params.get("access-sign"))
        stamp = params.get("access_timestamp", params.get("access-timestamp"))
        if self.login_errors:
            code = self.login_errors.popleft()
        elif not key:
            code = 40001
        elif not signature:
            code = 40002
        elif stamp is None or stamp == "":
            code = 40003
        elif (moment := _timestamp(stamp)) is None:
            code = 40005
        elif key not in self.keys:
            code = 40006
        elif key in self.banned:
            code = 40013
        elif abs(time.time() - moment) > self.timestamp_window:
            code = 40008
        elif signature != sign(self.keys[key], stamp):
            code = 40010
        else:
            client.user = key
            return _dumps({"ts": _ms(), "code": 200, "status": "OK", "event": "login"})
        return _dumps({"event": "login", "code": code, "msg": LOGIN_MESSAGES.get(code, "error")})

    def _request(self, client: Client, event: str, msg: dict[str, Any]) -> str:
        biz, type_, product, interval = _channel(msg)
        key = channel_key(type_, product, interval)
        head: dict[str, Any] = {"biz": biz, "type": type_, "product": product}
        if interval:
            head["interval"] = int(interval) if type_ == "orderbook" else interval
        fail = {**head, "ts": _ms(), "status": "FAIL", "event": event}
        if biz == "exchange" and client.user is None:
            return _dumps({**fail, "code": 401, "msg": "not logged in"})
        if type_ == "assets" and product.lower() == "all":
            return _dumps({**fail, "code": self.assets_all_code})
        refused = {"sub": self.sub_errors, "req": self.req_errors}.get(event, {})
        if type_ in refused:
            return _dumps({**fail, "code": refused[type_]})
        ok = {**head, "ts": _ms(), "code": 200, "status": "OK", "event": event}
        if event == "sub":
            client.subs[key] = msg.get("zip") is True
            if client.subscribed_at is None:
                client.subscribed_at = client.last_push = anyio.current_time()
            self._notify()
        elif event == "unsub":
            client.subs.pop(key, None)
            self._notify()
        else:
            data = self._answer(key, msg)
            client.last_push = anyio.current_time()
            self.pushed += 1
            return _dumps({**ok, "data": data})
        return _dumps(ok)

    def _answer(self, key: ChannelKey, msg: dict[str, Any]) -> Any:
        """What a ``req`` returns: a ticker or book snapshot, candles in range, or lists."""
        if key.type == "ticker":
            return self.tickers.get(
                key.product, {"id": int(time.time()), "seq_id": self._seq_start}
            )
        if key.type in SNAPSHOT_TYPES:
            return self._snapshot_frame(key)["data"]
        if key.type == "candles":
            start, end = _unix(msg.get("from")), _unix(msg.get("to"))
            if start is None or end is None:
                raise _Invalid
            history = self.candles.get(key, {})
            return [history[t] for t in sorted(history) if start <= t <= end]
        if key.type == "orders":
            return self.open_orders.get(key.product, [])
        if key.type == "assets":
            return self.balances.get(key.product, [])
        raise _Invalid  # fills: no req

    # -- demo ----------------------------------------------------------------------------

    def demo_source(self) -> dict[str, Any]:
        return {
            "plugin": "bge",
            "url": self.url,
            "subscriptions": [
                {"biz": "market", "type": "ticker", "product": DEMO_PRODUCT},
                {"biz": "market", "type": "candles", "product": DEMO_PRODUCT, "interval": "1min"},
            ],
        }

    async def demo_traffic(self) -> None:
        market = DemoMarket()
        while True:
            while not self.subscribed:
                await self.wait_changed()  # nothing to show until a client subscribes
            price = market.step()
            await self.push_ticker(DEMO_PRODUCT, price, open_=market.open, vol=market.volume)
            minute, first, high, low = market.candle(price)
            await self.push_candle(
                DEMO_PRODUCT,
                "1min",
                minute,
                first,
                price,
                high=high,
                low=low,
                vol=market.minute_volume,
            )
            await anyio.sleep(self.demo_interval)


LOGIN_MESSAGES = {
    40001: "ACCESS_KEY不能為空",
    40002: "ACCESS_SIGN cannot be empty",
    40003: "ACCESS_TIMESTAMP cannot be empty",
    40005: "Invalid ACCESS_TIMESTAMP",
    40006: "Invalid ACCESS_KEY",
    40008: "Request timestamp expired",
    40010: "api verification failed",
    40013: "User banned",
    500: "system error",
}


def _dumps(frame: Mapping[str, Any]) -> str:
    return orjson.dumps(frame).decode()


def _ms() -> int:
    return int(time.time() * 1000)


def _invalid(event: str, text: str) -> str:
    """The seed's answer to a request it cannot read: a string code, the request echoed."""
    frame: dict[str, Any] = {"event": event} if event else {}
    return _dumps({**frame, "code": "400", "msg": f"Invalid request: {text[:500]}"})


def _channel(msg: Mapping[str, Any]) -> tuple[str, str, str, str]:
    """(biz, type, product, interval) of a v2 request, or ``_Invalid``."""
    biz, type_, product = msg.get("biz"), msg.get("type"), msg.get("product")
    if not (isinstance(biz, str) and isinstance(type_, str) and isinstance(product, str)):
        raise _Invalid
    type_ = type_.lower()  # "orderBook" too
    if BIZ_OF.get(type_) != biz or not product or not set(product) <= _PRODUCT_CHARS:
        raise _Invalid
    if product.lower() == "all" and type_ not in ("orders", "assets"):
        raise _Invalid
    interval = msg.get("interval", "")
    if isinstance(interval, int) and not isinstance(interval, bool):
        interval = str(interval)
    if not isinstance(interval, str):
        raise _Invalid
    if type_ == "candles" and interval.replace(" ", "").lower() not in CANDLE_INTERVALS:
        raise _Invalid
    if type_ == "orderbook" and interval not in ORDERBOOK_LEVELS:
        raise _Invalid
    if type_ not in ("candles", "orderbook"):
        interval = ""
    return biz, type_, product, interval


def _timestamp(value: object) -> float | None:
    """A login timestamp in unix seconds: epoch ms (number or digits) or ISO-8601."""
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return float(value) / 1000
    if isinstance(value, str) and value.isdigit():
        return int(value) / 1000
    if isinstance(value, str):
        try:
            return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
        except ValueError:
            return None
    return None


def _unix(value: object) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and value.isdigit():
        return int(value)
    return None


class DemoMarket:
    """BTC_USDT wandering around 30 000: a slow swing of +-700 with noise, so the price
    crosses 30 500 for a few seconds about every half minute (the first time within a
    second or two)."""

    def __init__(self, level: float = 30_000.0, swing: float = 700.0, period: int = 60) -> None:
        self.level, self.swing, self.period = level, swing, period
        self.n = 7  # a little before the first crest: the first alert comes quickly
        self.open = level - 180.0  # 24 h ago
        self.volume = 1_800.0
        self._minute = (0, 0.0, 0.0, 0.0)
        self.minute_volume = 0.0

    def step(self) -> float:
        self.n += 1
        wave = math.sin(2 * math.pi * self.n / self.period)
        self.volume += random.uniform(0.05, 2.0)
        return round(self.level + self.swing * wave + random.uniform(-40.0, 40.0), 2)

    def candle(self, price: float) -> tuple[int, float, float, float]:
        """(open time, open, high, low) of the current 1-minute candle after ``price``."""
        minute = int(time.time()) // 60 * 60
        start, first, high, low = self._minute
        if start != minute:
            start, first, high, low = minute, price, price, price
            self.minute_volume = 0.0
        self._minute = (start, first, max(high, price), min(low, price))
        self.minute_volume += random.uniform(0.05, 2.0)
        return self._minute
