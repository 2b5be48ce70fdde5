"""BGE exchange v2 WebSocket protocol as pure functions: frames, messages, events, ids.

No I/O here (the client in ``source.py`` and the server in ``emulator.py`` are thin loops
around these functions), so everything can be tested, and fuzzed, without a socket.
See PROTOCOLS.md section 2; what the documents leave open is marked [inferred].

- Client -> server: ``{"event": "sub"|"unsub"|"req", "biz", "type", "product",
  "interval"?, "zip"}``, ``{"event": "login", "params": {...}}`` and ``{"pong": ts}``.
- Server -> client: ``{"ping": ts}``; replies ``{"event", "code", "status"|"msg", ...}``
  whose ``code`` is an int or a string; pushes and ``req`` answers
  ``{"biz", "type", "product", "interval"?, "data": [...] | {...}}``. With ``zip`` a frame
  may arrive as binary gzip (zlib and raw deflate are accepted too).
- Field spellings of older revisions are accepted: ``seqId``, ``turnOver``,
  ``changePercent``, ``"type": "orderBook"``, ``orders_id`` (for ``order_id``).
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import re
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import orjson

from tocsin import (
    RecentIds,
    SourceAuthError,
    SourceError,
    printable,
    stable_id,
    utc_iso,
    wire_number,
)

DEFAULT_URL = "wss://ws.bg.exchange/v2/ws"

MAX_FRAME = 1 << 20
"""Largest frame accepted (bytes): an orderbook of depth 150 is ~10 KiB."""
MAX_INFLATED = 1 << 20
"""Largest decompressed frame: the same budget as a text frame (a bomb is refused)."""

MARKET_TYPES = ("candles", "fills", "orderbook", "percent10", "ticker")
EXCHANGE_TYPES = ("orders", "assets")
EVENT_TYPES = (*MARKET_TYPES, *EXCHANGE_TYPES)
BIZ_OF = {**dict.fromkeys(MARKET_TYPES, "market"), **dict.fromkeys(EXCHANGE_TYPES, "exchange")}

SNAPSHOT_TYPES = frozenset({"orderbook", "percent10"})
"""Pushed every 500 ms even when unchanged, each a full picture: no gaps, no backfill."""
SEQ_GAP_TYPES = frozenset({"ticker", "candles"})
"""Incremental streams whose ``seq_id`` tells a lost push [inferred: +1 per push]."""
ALL = "ALL"
"""``"product": "all"`` (any case), which only ``orders`` accepts."""

# The spellings the documents use for candle intervals, to one canonical name each
# (the English page says "4hours", the table "4hour", PROTOCOLS "60min/1hour").
CANDLE_INTERVALS = {
    "1min": "1min",
    "5min": "5min",
    "15min": "15min",
    "30min": "30min",
    "60min": "60min",
    "1hour": "60min",
    "4hour": "4hour",
    "4hours": "4hour",
    "1day": "1day",
    "1week": "1week",
    "1mon": "1mon",
}
INTERVAL_SECONDS = {
    "1min": 60,
    "5min": 300,
    "15min": 900,
    "30min": 1800,
    "60min": 3600,
    "4hour": 14_400,
    "1day": 86_400,
    "1week": 604_800,
    "1mon": 2_592_000,  # 30 days: only used to size a backfill
}
ORDERBOOK_LEVELS = tuple(str(n) for n in range(12))

OK = 200
WS_CODES = {400: "invalid request", 401: "not logged in", 500: "server error"}
# Auth codes (PROTOCOLS, bg-docs _biz-errorcode.md): (meaning, only the user can fix it).
AUTH_CODES: dict[int, tuple[str, bool]] = {
    40001: ("the access key is empty", True),
    40002: ("the signature is empty", True),
    40003: ("the timestamp is empty", True),
    40005: ("the timestamp is invalid (is the clock right?)", False),
    40006: ("the access key is invalid", True),
    40008: ("the timestamp has expired (is the clock right?)", False),
    40010: ("the signature did not verify (check secret_key)", True),
    40011: ("the access key or passphrase is wrong", True),
    40012: ("the API user is invalid", True),
    40013: ("the API user is banned", True),
    40014: ("the API user is frozen", True),
    40015: ("the key does not allow this IP address", True),
    40016: ("the access key has expired", True),
}

MAX_TS_S = 253_402_300_799  # 9999-12-31: the last time utc_iso() can show
_CODE_TEXT = re.compile(r"-?[0-9]{1,9}")
_DIGITS = re.compile(r"[0-9]{1,19}")
_CAMEL = re.compile(r"(?<=[a-z0-9])([A-Z])")
_MAX_TEXT = 200

NUMERIC_FIELDS = frozenset(
    {
        "open",
        "close",
        "high",
        "low",
        "vol",
        "filled_size",
        "count",
        "change",
        "change_percent",
        "turn_over",
        "turnover",
        "price",
        "size",
        "filled_amount",
        "funds",
        "available",
        "hold",
        "amount",
    }
)
"""Price-like fields turned from decimal strings into numbers, so ``close > 30000`` works.
Ids (``id``, ``order_id``, ``client_oid``...) are never converted."""
BOOK_FIELDS = frozenset({"bids", "asks"})


# -- frames ----------------------------------------------------------------------------


def inflate(data: bytes, limit: int = MAX_INFLATED) -> bytes:
    """A compressed binary frame, sniffed: gzip, zlib, else raw deflate; at most ``limit``.

    Raises ``ValueError`` (a short fixed reason) for anything that is not one complete
    compressed stream, or that inflates past ``limit`` (a compression bomb).
    """
    if data[:2] == b"\x1f\x8b":
        candidates = [16 + zlib.MAX_WBITS]
    elif len(data) >= 2 and data[0] & 0x0F == 8 and (data[0] << 8 | data[1]) % 31 == 0:
        # Looks like a zlib header (deflate, and a header checksum that holds); raw
        # deflate can start the same way by chance, so it is the fallback.
        candidates = [zlib.MAX_WBITS, -zlib.MAX_WBITS]
    else:
        candidates = [-zlib.MAX_WBITS]
    for wbits in candidates:
        inflater = zlib.decompressobj(wbits)
        try:
            out = inflater.decompress(data, limit + 1)
        except zlib.error:
            continue
        if len(out) > limit or inflater.unconsumed_tail:
            raise ValueError("decompressed frame too large")
        if not inflater.eof:
            raise ValueError("truncated compressed frame")
        return out
    raise ValueError("bad compressed frame")


def decode_frame(raw: str | bytes) -> Any:
    """The JSON value of one frame: text as is, binary decompressed first when compressed.

    Raises ``ValueError`` with a short fixed reason; never quotes the frame.
    """
    if len(raw) > MAX_FRAME:
        raise ValueError("oversized frame")
    if isinstance(raw, bytes | bytearray | memoryview):
        data = bytes(raw)
        # A binary frame may also be plain JSON [inferred]: sniff before inflating.
        if data.lstrip()[:1] not in (b"{", b"["):
            data = inflate(data)
        raw = data
    try:
        return orjson.loads(raw)
    except (orjson.JSONDecodeError, RecursionError):  # bad JSON or UTF-8, absurd nesting
        raise ValueError("not JSON") from None


# -- server -> client messages ---------------------------------------------------------


class ChannelKey(NamedTuple):
    """What identifies a channel in subscriptions, replies and pushes, compared loosely:
    ``type`` lower case, ``product`` upper case, ``interval`` canonical (``""`` for none)."""

    type: str
    product: str
    interval: str

    @property
    def label(self) -> str:
        """``"candles BTC_USDT 15min"``: how messages and gap events name the channel."""
        return " ".join(filter(None, self))


def channel_key(type_: str, product: str, interval: str = "") -> ChannelKey:
    """The ``ChannelKey`` of a channel however the server or the user spelled it."""
    return ChannelKey(type_.lower(), product.upper(), canonical_interval(interval))


def canonical_interval(value: str) -> str:
    """``"4 hours"`` -> ``"4hour"``, ``"1hour"`` -> ``"60min"``; others lower-cased as is."""
    text = value.strip().lower().replace(" ", "")
    return CANDLE_INTERVALS.get(text, text)


@dataclass(frozen=True, slots=True)
class Ping:
    """``{"ping": ts}``: answer at once with ``{"pong": ts}``, the same value."""

    value: int | float | str


@dataclass(frozen=True, slots=True)
class Reply:
    """An answer to ``login``/``sub``/``unsub``/``req`` carrying no data (or a failure).

    ``channel`` is None when the server did not say which channel (the seed's 400 form).
    """

    event: str
    code: int | None
    ok: bool
    msg: str
    channel: ChannelKey | None


@dataclass(frozen=True, slots=True)
class Push:
    """Data on a channel: a push, or (``answer``) the answer to a ``req``."""

    biz: str
    channel: ChannelKey
    product: str  # as the server spelled it
    interval: str  # as the server spelled it ("" when none)
    seq_id: int | None  # the frame's own seq_id (percent10 has one)
    id: str  # the frame's id (the candle's time for candles)
    ts: int | None  # the frame's ts (unix ms), in req answers
    items: tuple[dict[str, Any], ...]
    answer: bool


@dataclass(frozen=True, slots=True)
class Other:
    """A well-formed frame this client has no use for (liveness only)."""

    what: str


Message = Ping | Reply | Push | Other


def server_text(value: object) -> str:
    """A server-given message made safe to show: printable, bounded, and cut before any
    echoed request (``"Invalid request: {...}"`` quotes what was sent, login and all)."""
    text = value if isinstance(value, str) else "" if value is None else str(value)
    return printable(text.split("{", 1)[0].strip().rstrip(":").strip(), _MAX_TEXT)


def parse_code(value: object) -> int | None:
    """A status ``code`` given as an int or a string (``"400"``); None when absent."""
    if value is None:
        return None
    if isinstance(value, str) and _CODE_TEXT.fullmatch(value.strip()):
        return int(value.strip())
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    raise ValueError("bad code")


def _text(value: object, what: str, limit: int = 64) -> str:
    if value is None:
        return ""
    if not isinstance(value, str) or len(value) > limit or not value.isprintable():
        raise ValueError(f"bad {what}")
    return value.strip()


def _id_text(value: object) -> str:
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return _text(value, "id", 40)


def interval_text(value: object) -> str:
    """``interval`` as a string whether sent as ``"15min"``, ``"0"`` or ``0``."""
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return _text(value, "interval", 16)


def seq_number(value: object) -> int | None:
    """A ``seq_id`` (an int or digit string, from 0), or None when absent."""
    if value is None:
        return None
    if isinstance(value, str) and _DIGITS.fullmatch(value.strip()):
        value = int(value.strip())
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 1 << 63:
        return value  # within 64 bits: the daemon stores events with orjson
    raise ValueError("bad seq_id")


def _unix_ms(value: object) -> int | None:
    """A unix time in ms (an int or digit string) within range, else None."""
    if isinstance(value, str) and _DIGITS.fullmatch(value.strip()):
        value = int(value.strip())
    if isinstance(value, int) and not isinstance(value, bool) and 0 < value <= MAX_TS_S * 1000:
        return value
    return None


def parse_message(frame: object) -> Message:
    """One decoded frame as a message, or ``ValueError`` with a short fixed reason."""
    if not isinstance(frame, dict):
        raise ValueError("not a JSON object")
    if "ping" in frame:
        value = frame["ping"]
        if isinstance(value, bool) or not isinstance(value, int | float | str):
            raise ValueError("bad ping")
        if isinstance(value, str) and len(value) > 64:
            raise ValueError("bad ping")
        return Ping(value)
    event = _text(frame.get("event"), "event", 16).lower()
    code = parse_code(frame.get("code"))
    status = frame.get("status")
    ok = code == OK if code is not None else str(status).upper() == "OK" or "data" in frame
    type_ = _text(frame.get("type"), "type").lower()
    product = _text(frame.get("product"), "product")
    interval = interval_text(frame.get("interval"))
    channel = channel_key(type_, product, interval) if type_ and product else None
    if "data" in frame and ok and event in ("", "req"):
        if channel is None:
            raise ValueError("data without type or product")
        return Push(
            biz=_text(frame.get("biz"), "biz").lower(),
            channel=channel,
            product=product,
            interval=interval,
            seq_id=seq_number(frame.get("seq_id", frame.get("seqId"))),
            id=_id_text(frame.get("id")),
            ts=_unix_ms(frame.get("ts")),
            items=_items(frame["data"]),
            answer=event == "req",
        )
    if event or code is not None:
        msg = frame.get("msg")
        if msg is None and isinstance(status, str) and status.upper() not in ("OK", "FAIL"):
            msg = status  # the English login example puts the reason in "status"
        return Reply(event, code, ok, server_text(msg), channel)
    return Other(type_ or "unknown")


def parse_frame(raw: str | bytes) -> Message:
    """``parse_message(decode_frame(raw))``: any bytes in, a message or ``ValueError`` out."""
    return parse_message(decode_frame(raw))


def _items(data: object) -> tuple[dict[str, Any], ...]:
    # A list is items (ticker, fills, orders, assets, candle req answers); an object is one.
    if isinstance(data, dict):
        return (data,)
    if isinstance(data, list) and all(isinstance(item, dict) for item in data):
        return tuple(data)
    raise ValueError("malformed data")


# -- errors ----------------------------------------------------------------------------


def refusal(event: str, code: int | None, msg: str, channel: ChannelKey | None) -> SourceError:
    """The error for a failed ``login`` or ``sub``: ``SourceAuthError`` when only the
    user can fix it (a bad, banned or expired key...), else ``SourceError`` (retried)."""
    said = f": {msg}" if msg else ""
    if code in AUTH_CODES:
        meaning, users_fault = AUTH_CODES[code]
        error = SourceAuthError if users_fault else SourceError
        return error(f"BGE refused the login: {meaning} ({code}{said})")
    what = (
        "the login"
        if event == "login"
        else f"the subscription to {channel.label}"
        if channel
        else f"a {event or 'request'}"
    )
    meaning = WS_CODES.get(code or 0, "failed")
    return SourceError(
        f"BGE refused {what}: {meaning} ({code if code is not None else 'no code'}{said})"
    )


# -- client -> server ------------------------------------------------------------------


def _dumps(frame: Mapping[str, Any]) -> str:
    return orjson.dumps(frame).decode()


def channel_fields(biz: str, type_: str, product: str, interval: str = "") -> dict[str, Any]:
    fields: dict[str, Any] = {"biz": biz, "type": type_, "product": product}
    if interval:
        fields["interval"] = interval
    return fields


def sub_message(biz: str, type_: str, product: str, interval: str = "", *, zip: bool) -> str:
    """``{"event": "sub", ...}`` for one channel."""
    return _dumps({"event": "sub", **channel_fields(biz, type_, product, interval), "zip": zip})


def req_message(
    biz: str,
    type_: str,
    product: str,
    interval: str = "",
    *,
    zip: bool,
    start: int | None = None,
    end: int | None = None,
) -> str:
    """``{"event": "req", ...}``; candles take ``from``/``to`` (unix seconds)."""
    frame: dict[str, Any] = {"event": "req", **channel_fields(biz, type_, product, interval)}
    frame["zip"] = zip
    if start is not None:
        frame["from"] = start
    if end is not None:
        frame["to"] = end
    return _dumps(frame)


def sign(secret_key: str, timestamp: int | str) -> str:
    """``access_sign``: Base64(HMAC-SHA256(secret, preHash)); for WS the preHash is the
    timestamp alone (method, path, query and body are all empty)."""
    digest = hmac.new(secret_key.encode(), str(timestamp).encode(), hashlib.sha256).digest()
    return base64.b64encode(digest).decode()


def login_message(access_key: str, access_sign: str, timestamp_ms: int) -> str:
    """``{"event": "login", "params": {...}}``; v2 spells the keys with underscores."""
    params = {
        "type": "api",
        "access_key": access_key,
        "access_sign": access_sign,
        "access_timestamp": timestamp_ms,
    }
    return _dumps({"event": "login", "params": params})


def pong_message(value: int | float | str) -> str:
    """``{"pong": ts}`` with the ping's own value."""
    return _dumps({"pong": value})


# -- normalization ---------------------------------------------------------------------


@functools.lru_cache(maxsize=1024)  # a feed's few field names, every push: 0.1 us, not 2
def snake_case(key: str) -> str:
    """``seqId`` -> ``seq_id``, ``changePercent`` -> ``change_percent``."""
    return _CAMEL.sub(r"_\1", key).lower()


def _book(levels: Any) -> Any:
    if not isinstance(levels, list):
        return levels
    return [[wire_number(v) for v in lvl] if isinstance(lvl, list) else lvl for lvl in levels]


def snake_fields(item: Mapping[str, Any]) -> dict[str, Any]:
    """The item's fields in snake_case; a field already in snake_case wins over its camel twin."""
    out: dict[str, Any] = {}
    for key, value in item.items():
        if snake_case(key) != key:
            out[snake_case(key)] = value
    for key, value in item.items():
        if snake_case(key) == key:
            out[key] = value
    if "order_id" not in out and "orders_id" in out:
        out["order_id"] = out["orders_id"]  # the field table's spelling
    return out


class Item(NamedTuple):
    """What one pushed item becomes: an event's ``type``, ``id``, ``time``, ``data``."""

    type: str
    id: str
    time: str
    seq_id: int | None
    data: dict[str, Any]


def _digest(fields: Mapping[str, Any], leave_out: Iterable[str] = ()) -> str:
    skip = set(leave_out)
    content = {k: v for k, v in fields.items() if k not in skip}
    try:
        return orjson.dumps(content, option=orjson.OPT_SORT_KEYS).decode()
    except (TypeError, orjson.JSONEncodeError):
        raise ValueError("unhashable item") from None


def candle_time(item: Mapping[str, Any], push: Push) -> int | None:
    """A candle's open time (unix seconds): its ``id``, else the frame's."""
    for value in (item.get("id"), push.id):
        ms = _unix_ms(value)
        if ms is not None:
            return ms // 1000 if ms > 100_000_000_000 else ms  # ms or s
    return None


def _event_time(type_: str, item: Mapping[str, Any], push: Push) -> str:
    ts = _unix_ms(item.get("ts"))
    if ts is not None and ts > 100_000_000_000:  # a unix ms
        return utc_iso(ts / 1000)
    if type_ in ("candles", "ticker"):
        seconds = candle_time(item, push)  # their id is their time in unix seconds
        if seconds is not None and seconds <= MAX_TS_S:
            return utc_iso(seconds)
    if push.ts is not None:
        return utc_iso(push.ts / 1000)
    return ""


def item_id(type_: str, push: Push, fields: Mapping[str, Any], seq: int | None, index: int) -> str:
    """The stable id of one item: the same fact gets it again whoever sends it when.

    - orderbook, percent10: the book's content (an unchanged snapshot, pushed twice a
      second, is the same fact);
    - candles: the candle's time and values (a push and a ``req`` of the same candle agree;
      each update of an open candle is a new fact);
    - orders: the order and its state (id, status, filled amounts);
    - assets: the product's balance entry as given;
    - ticker: the ``seq_id``; fills: the trade's ``id``; else the content.
    """
    key = push.channel
    unsequenced = ("seq_id", "id", "ts", "product", "interval")
    if type_ in SNAPSHOT_TYPES:
        return stable_id("bge", type_, key.product, key.interval, _digest(fields, unsequenced))
    if type_ == "candles":
        when = candle_time(fields, push)
        return stable_id(
            "bge", type_, key.product, key.interval, when, _digest(fields, unsequenced)
        )
    if type_ == "orders" and fields.get("order_id") is not None:
        state = [fields.get(k) for k in ("status", "filled_size", "filled_amount")]
        return stable_id("bge", type_, fields["order_id"], *state)
    if type_ == "fills" and fields.get("id") is not None:
        return stable_id("bge", type_, key.product, fields["id"])
    if seq is not None and type_ != "assets":
        return stable_id("bge", type_, key.product, key.interval, seq, index)
    return stable_id("bge", type_, key.product, key.interval, _digest(fields, ("seq_id",)))


def normalize(push: Push) -> list[Item]:
    """One ``Item`` per item of a push (SPEC section 4): the payload fields in snake_case,
    price-like strings as numbers, plus ``product``, ``interval`` and ``seq_id``."""
    type_ = push.channel.type
    out = []
    seen_seq: dict[int | None, int] = {}
    for item in push.items:
        fields = snake_fields(item)
        seq = seq_number(fields.get("seq_id"))
        if seq is None:
            seq = push.seq_id
        for name in NUMERIC_FIELDS & fields.keys():
            fields[name] = wire_number(fields[name])
        for name in BOOK_FIELDS & fields.keys():
            fields[name] = _book(fields[name])
        if type_ == "orders" and isinstance(fields.get("status"), str):
            fields["status"] = wire_number(fields["status"])  # "1" -> 1: statuses are 0-7
        index = seen_seq.get(seq, 0)
        seen_seq[seq] = index + 1
        ident = item_id(type_, push, fields, seq, index)
        own_product = fields.get("product")
        product = own_product if isinstance(own_product, str) and own_product else push.product
        own_interval = fields.get("interval")
        # One spelling per channel (its canonical one): a req answer echoes the client's.
        interval = canonical_interval(
            push.interval or (interval_text(own_interval) if own_interval is not None else "")
        )
        data = {**fields, "product": product, "interval": interval or None, "seq_id": seq}
        out.append(Item(type_, ident, _event_time(type_, fields, push), seq, data))
    return out


# -- sequence numbers ------------------------------------------------------------------


class SeqTracker:
    """Per channel: which ``seq_id`` were seen (several connections, or a resubscribe,
    repeat them) and which were skipped (a lost push).

    ``reset()`` at each new connection: the jump across a reconnect is the reconnect's
    gap, reported (or backfilled) on its own.
    """

    def __init__(self, size: int = 10_000) -> None:
        self.seen = RecentIds(size)
        self.last: dict[ChannelKey, int] = {}

    def reset(self) -> None:
        self.last.clear()

    def admit(
        self, channel: ChannelKey, seqs: Sequence[int], *, gaps: bool = True
    ) -> tuple[set[int], list[tuple[int, int]]]:
        """The new ones among ``seqs`` (one push), and the ranges skipped before them.

        A lower unseen ``seq_id`` than the last is a late push (one a gap was reported
        for): it is new, and the numbering goes on from the highest seen.
        """
        fresh = {s for s in dict.fromkeys(seqs) if not self.seen.seen(f"{channel.label}|{s}")}
        missing: list[tuple[int, int]] = []
        for seq in sorted(fresh):
            last = self.last.get(channel)
            if last is not None and seq <= last:
                continue
            if gaps and last is not None and seq > last + 1:
                missing.append((last + 1, seq - 1))
            self.last[channel] = seq
        return fresh, missing


# -- rate limit ------------------------------------------------------------------------


class TokenBucket:
    """Keeps outgoing messages under the server's 50 per second, pongs first.

    ``rate`` tokens per second up to ``burst``: in any one second at most
    ``burst + rate`` messages leave (40 by default, a margin under 50 for frames the
    network bunches together). Ordinary messages leave ``reserve`` tokens untouched, so a
    pong never waits behind a queue of subscriptions.
    """

    def __init__(
        self, now: float, rate: float = 30.0, burst: float = 10.0, reserve: float = 3.0
    ) -> None:
        self.rate, self.burst, self.reserve = rate, burst, reserve
        self.tokens = burst
        self.at = now

    def _refill(self, now: float) -> None:
        self.tokens = min(self.burst, self.tokens + max(0.0, now - self.at) * self.rate)
        self.at = now

    def spend(self, now: float) -> None:
        """Take a token even if there is none (a pong that waited): later messages wait longer."""
        self._refill(now)
        self.tokens -= 1

    def take(self, now: float, *, priority: bool = False) -> float:
        """0.0 with a token taken, or how many seconds until one is available."""
        self._refill(now)
        floor = 0.0 if priority else self.reserve
        if self.tokens - 1 >= floor - 1e-9:
            self.tokens -= 1
            return 0.0
        return (floor + 1 - self.tokens) / self.rate
