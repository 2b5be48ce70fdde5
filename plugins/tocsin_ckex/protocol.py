"""The ckex / uni247 "interact ws" protocol as pure functions: no I/O, no clock.

Client -> server frames are ``{"commend": "<command>"}`` ("commend" is the provider's
spelling on the wire). Server -> client frames are ``order-slip`` (sportsbook quotes),
``order-slip-fancy`` (fancy quotes), ``alive``, ``error`` and the bare ``{}`` keepalive.
Every function here is tested without a socket; parsers turn any input into a typed
value or raise ``ValueError`` with a short, fixed reason that never quotes the frame.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final, Literal
from urllib.parse import quote, urlsplit

from tocsin import Numbering, stable_id, wire_number

MAX_FRAME = 1024 * 1024  # a snapshot of a few markets is a few kB; more is a broken server
MAX_VALUE = 256  # longest id, price or time string accepted in a quote

SPORTSBOOK: Final = "sportsbook"
FANCY: Final = "fancy"
MarketKind = Literal["sportsbook", "fancy"]

ORDER_SLIP = "order_slip"  # the event types (SPEC section 4)
ORDER_SLIP_FANCY = "order_slip_fancy"
EVENT_TYPES = (ORDER_SLIP, ORDER_SLIP_FANCY)

# Frame types on the wire. The seed's schema text once spells the fancy one
# "order-slipt-fancy" while its example says "order-slip-fancy": accept both.
SPORTSBOOK_FRAME = "order-slip"
FANCY_FRAMES = ("order-slip-fancy", "order-slipt-fancy")

REGISTER_PREFIX: dict[MarketKind, str] = {
    SPORTSBOOK: "order-slip-quote@chloe-market#",
    FANCY: "order-slip-quote@fancy-market#",
}
UNSUBSCRIBE_PREFIX = "unsubscribe-order-slip-quote#"
START = "start"
STOP = "stop"


# -- markets and client commands ----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Market:
    """One registered market: a sportsbook ("chloe") or a fancy market of an event."""

    kind: MarketKind
    event_id: str
    market_id: str


def check_id(value: str) -> str:
    """An event or market id that fits in a command, or ``ValueError`` saying why not."""
    if not value:
        raise ValueError("must not be empty")
    if len(value) > MAX_VALUE:
        raise ValueError(f"must be at most {MAX_VALUE} characters")
    # '@' and '#' separate the parts of a command; the server could not tell them apart.
    if any(c in "@#" or c.isspace() or not c.isprintable() for c in value):
        raise ValueError("must not contain '@', '#', spaces or control characters")
    return value


def command(text: str) -> str:
    """The frame carrying one command."""
    return json.dumps({"commend": text}, separators=(",", ":"))


def register_command(market: Market) -> str:
    """The frame that registers ``market``: its quotes are pushed for about an hour."""
    return command(f"{REGISTER_PREFIX[market.kind]}{market.event_id}@{market.market_id}")


def unsubscribe_command(event_id: str, market_id: str) -> str:
    """The frame that stops one market (it names no kind: it applies to either)."""
    return command(f"{UNSUBSCRIBE_PREFIX}{event_id}@{market_id}")


def start_command() -> str:
    """The frame that starts (or resumes) the pushes of every registered market."""
    return command(START)


def stop_command() -> str:
    """The frame that pauses every push but the keepalives."""
    return command(STOP)


@dataclass(frozen=True, slots=True)
class Register:
    """A parsed ``order-slip-quote@...`` command."""

    market: Market


@dataclass(frozen=True, slots=True)
class Unsubscribe:
    """A parsed ``unsubscribe-order-slip-quote#...`` command."""

    event_id: str
    market_id: str


@dataclass(frozen=True, slots=True)
class Toggle:
    """A parsed ``start`` (running) or ``stop`` (not running) command."""

    running: bool


Command = Register | Unsubscribe | Toggle


def _event_market(rest: str) -> tuple[str, str]:
    event_id, sep, market_id = rest.partition("@")
    if not sep:
        raise ValueError("unknown commend")
    try:
        return check_id(event_id), check_id(market_id)
    except ValueError:
        raise ValueError("unknown commend") from None


def parse_command(raw: str | bytes) -> Command:
    """A client frame as the server reads it (used by the emulator)."""
    frame = _json_object(raw)
    text = frame.get("commend")
    if not isinstance(text, str):
        raise ValueError("no commend")
    if text in (START, STOP):
        return Toggle(running=text == START)
    for kind, prefix in REGISTER_PREFIX.items():
        if text.startswith(prefix):
            event_id, market_id = _event_market(text[len(prefix) :])
            return Register(Market(kind, event_id, market_id))
    if text.startswith(UNSUBSCRIBE_PREFIX):
        return Unsubscribe(*_event_market(text[len(UNSUBSCRIBE_PREFIX) :]))
    raise ValueError("unknown commend")


# -- the URL and the token ------------------------------------------------------------


def connect_url(url: str, token: str) -> str:
    """``url`` with the token as the ``authorization=bearer%20<token>`` query parameter."""
    sep = "&" if urlsplit(url).query else "?"
    return f"{url}{sep}authorization=bearer%20{quote(token, safe='')}"


def safe_url(url: str) -> str:
    """``scheme://host/path`` only: what may be logged (the query carries the token)."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}{parts.path}"


_QUERY_TOKEN = re.compile(r"(authorization=)[^&\s]*", re.IGNORECASE)


def redact_query(text: str) -> str:
    """``text`` with every ``authorization=...`` query value replaced by ``***``."""
    return _QUERY_TOKEN.sub(r"\1***", text)


def b64url_decode(text: str) -> bytes:
    """base64url without padding, as in a JWT; ``ValueError`` when it is not."""
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise ValueError("not base64url") from None


def token_claims(token: str) -> dict[str, Any]:
    """The payload of a JWT, unverified (only the server can verify it)."""
    parts = token.split(".")
    if len(parts) != 3:
        raise ValueError("not a JWT")
    try:
        claims = json.loads(b64url_decode(parts[1]))
    except (ValueError, RecursionError):
        raise ValueError("not a JWT") from None
    if not isinstance(claims, dict):
        raise ValueError("not a JWT")
    return claims


def token_expiry(token: str) -> float | None:
    """When the token expires (unix seconds), from ``expires_at`` (RFC 3339) or ``exp``."""
    try:
        claims = token_claims(token)
    except ValueError:
        return None
    expires = claims.get("expires_at")
    if isinstance(expires, str):
        return parse_time(expires)
    exp = claims.get("exp")
    if isinstance(exp, int | float) and not isinstance(exp, bool) and 0 < exp < 253402300800:
        return float(exp)
    return None


_RFC3339 = re.compile(
    r"(\d{4}-\d{2}-\d{2})[Tt ](\d{2}:\d{2}:\d{2})(?:\.(\d+))?([Zz]|[+-]\d{2}:\d{2})"
)


def parse_time(text: str) -> float | None:
    """Unix seconds from an RFC 3339 time (any number of decimals, as Go writes), else None."""
    match = _RFC3339.fullmatch(text.strip())
    if match is None:
        return None
    day, clock, fraction, zone = match.groups()
    fraction = (fraction or "0")[:6]  # Go writes nanoseconds; datetime holds microseconds
    zone = "+00:00" if zone in "Zz" else zone
    try:
        moment = datetime.fromisoformat(f"{day}T{clock}.{fraction.ljust(6, '0')}{zone}")
        return moment.timestamp()
    except (ValueError, OverflowError, OSError):
        return None


# -- server frames --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SportsbookQuote:
    """One product's odds of a sportsbook market; every value as the provider gave it."""

    event_id: str
    market_id: str
    product_id: str
    price: str
    status: str


@dataclass(frozen=True, slots=True)
class FancyQuote:
    """One product's back/lay line and odds of a fancy market."""

    mid: str
    pid: str
    bl: str
    bo: str
    ll: str
    lo: str
    status: str
    ut: str
    eid: str | None = None


Quote = SportsbookQuote | FancyQuote


@dataclass(frozen=True, slots=True)
class Keepalive:
    """``{"type":"alive"}`` or ``{}``: only proves the connection lives."""


@dataclass(frozen=True, slots=True)
class ServerError:
    """``{"type":"error","error":"..."}``: the server complains; the connection stays."""

    message: str


@dataclass(frozen=True, slots=True)
class Quotes:
    """A pushed batch: the quotes that parsed, and how many items did not."""

    quotes: tuple[Quote, ...]
    invalid: int = 0


Frame = Keepalive | ServerError | Quotes


def _json_object(raw: str | bytes) -> dict[str, Any]:
    if len(raw) > MAX_FRAME:
        raise ValueError("oversized frame")
    try:
        frame = json.loads(raw)
    except (ValueError, RecursionError):  # bad JSON, bad UTF-8, absurd nesting
        raise ValueError("not JSON") from None
    if not isinstance(frame, dict):
        raise ValueError("not a JSON object")
    return frame


def _text(value: object) -> str | None:
    """A quote value as text: strings as given; a number the server sent bare, as JSON wrote it."""
    if isinstance(value, str):
        return value if len(value) <= MAX_VALUE else None
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return None
    text = str(value)
    return text if len(text) <= MAX_VALUE else None


def _fields(item: object, required: tuple[str, ...], optional: tuple[str, ...]) -> dict[str, str]:
    if not isinstance(item, dict):
        raise ValueError("quote is not an object")
    out: dict[str, str] = {}
    for key in required:
        value = _text(item.get(key))
        if not value:
            raise ValueError("quote lacks a field")
        out[key] = value
    for key in optional:
        # A locked quote may well come without a price; keep it, with the value empty.
        value = _text(item.get(key)) if item.get(key) is not None else ""
        if value is None:
            raise ValueError("quote has a bad value")
        out[key] = value
    return out


def _sportsbook(item: object) -> SportsbookQuote:
    f = _fields(item, ("event_id", "market_id", "product_id", "status"), ("price",))
    return SportsbookQuote(f["event_id"], f["market_id"], f["product_id"], f["price"], f["status"])


def _fancy(item: object) -> FancyQuote:
    f = _fields(item, ("mid", "pid", "status"), ("bl", "bo", "ll", "lo", "ut", "eid"))
    return FancyQuote(
        f["mid"],
        f["pid"],
        f["bl"],
        f["bo"],
        f["ll"],
        f["lo"],
        f["status"],
        f["ut"],
        f["eid"] or None,
    )


def parse_frame(raw: str | bytes) -> Frame:
    """One server frame, typed; ``ValueError`` when it is none of the known frames.

    A batch with some bad items is kept: the good quotes, and the count of bad ones.
    """
    frame = _json_object(raw)
    if not frame:
        return Keepalive()  # the sister client skips "{}": a keepalive
    kind = frame.get("type")
    if kind == "alive":
        return Keepalive()
    if kind == "error":
        message = frame.get("error")
        text = message if isinstance(message, str) else json.dumps(message)
        return ServerError(text)  # whole: the source scrubs the token out, then shortens it
    parse: Callable[[object], Quote]
    if kind == SPORTSBOOK_FRAME:
        parse = _sportsbook
    elif kind in FANCY_FRAMES:
        parse = _fancy
    elif isinstance(kind, str):
        raise ValueError("unknown frame type")
    else:
        raise ValueError("no frame type")
    data = frame.get("data")
    if data is None:
        data = []
    elif isinstance(data, dict):
        data = [data]  # a single quote not wrapped in a list: the same fact
    elif not isinstance(data, list):
        raise ValueError("data is not a list")
    quotes: list[Quote] = []
    invalid = 0
    for item in data:
        try:
            quotes.append(parse(item))
        except ValueError:
            invalid += 1
    return Quotes(tuple(quotes), invalid)


# -- events ---------------------------------------------------------------------------


def quote_event(
    quote: Quote, previous: tuple[str, ...] = (), move: int = 0
) -> tuple[str, dict[str, Any], str]:
    """The event ``(type, data, id)`` of a quote (SPEC section 4).

    A fact is a change. A product's first quote is identified by its values alone, so the
    same snapshot re-sent after a restart gets the same id (and alerts once). A move
    (``previous``, the values it replaced, from ``QuoteBook.news``) is identified by its
    values, the values it replaced and its ``move`` number (``QuoteBook.move``): odds that
    move 1.9 -> 2.1 -> 1.9 -> 2.1 make a new fact at every move, also when a move repeats
    an earlier one. A re-sent snapshot is no move (the book drops it). A fancy quote's
    ``ut`` is left out: a snapshot re-sent with a newer ``ut`` but the same values is not
    a new fact.

    Odds and lines are numbers in ``data`` (``"2.37"`` -> 2.37, so a rule says
    ``price > 2.0``); one that is not a decimal (a locked quote's ``""``) stays as sent.
    The id is made of the strings as sent.
    """
    after = ("after", *previous, str(move)) if previous else ()
    open_ = quote.status == "1"  # "1": open and shown; anything else: locked
    if isinstance(quote, SportsbookQuote):
        data: dict[str, Any] = {
            "event_id": quote.event_id,
            "market_id": quote.market_id,
            "product_id": quote.product_id,
            "price": wire_number(quote.price),
            "status": quote.status,
            "open": open_,
        }
        parts: tuple[str, ...] = (
            quote.event_id,
            quote.market_id,
            quote.product_id,
            quote.price,
            quote.status,
        )
        return ORDER_SLIP, data, stable_id("ckex", ORDER_SLIP, *parts, *after)
    data = {
        "mid": quote.mid,
        "pid": quote.pid,
        "bl": wire_number(quote.bl),
        "bo": wire_number(quote.bo),
        "ll": wire_number(quote.ll),
        "lo": wire_number(quote.lo),
        "ut": quote.ut,
        "status": quote.status,
        "open": open_,
    }
    if quote.eid is not None:
        data["eid"] = quote.eid
    parts = (quote.mid, quote.pid, quote.bl, quote.bo, quote.ll, quote.lo, quote.status)
    return ORDER_SLIP_FANCY, data, stable_id("ckex", ORDER_SLIP_FANCY, *parts, *after)


def event_time(quote: Quote) -> float | None:
    """The provider's time of a quote (a fancy quote's ``ut``), else None (receipt time)."""
    if isinstance(quote, FancyQuote) and quote.ut:
        return parse_time(quote.ut)
    return None


class QuoteBook:
    """The last value seen per product, to drop the server's repeated snapshots.

    ``accept(quote)`` is True when the quote is news: its values differ from the last
    ones seen for its product. Fancy quotes are last-write-wins by ``ut``: one older than
    the newest seen for its ``(mid, pid)`` is ignored. Bounded: the least recently
    updated products are forgotten first. The live source saves what the book knows of a
    product (``saved``) as a cursor and gives it back after a restart, or when the book
    forgot the product (``recall``); a replay's book starts empty.
    """

    def __init__(
        self, max_products: int = 10_000, clock: Callable[[], float] | None = None
    ) -> None:
        self.max_products = max_products
        self.moves = Numbering(clock)
        self._last: OrderedDict[tuple[str, ...], tuple[tuple[str, ...], float | None]] = (
            OrderedDict()
        )

    def __len__(self) -> int:
        return len(self._last)

    @property
    def move(self) -> int:
        """The number of the last move (see ``tocsin.Numbering``)."""
        return self.moves.last

    def accept(self, quote: Quote) -> bool:
        """Whether ``quote`` is news (see ``news``)."""
        return self.news(quote) is not None

    def __contains__(self, key: object) -> bool:
        return key in self._last

    @staticmethod
    def key(quote: Quote) -> tuple[str, ...]:
        """The product a quote is of: ``("s", event_id, market_id, product_id)`` or
        ``("f", mid, pid)``."""
        if isinstance(quote, SportsbookQuote):
            return ("s", quote.event_id, quote.market_id, quote.product_id)
        return ("f", quote.mid, quote.pid)

    def saved(self, key: tuple[str, ...]) -> str:
        """What the book knows of a product, as text to save (``recall`` reads it)."""
        values, when = self._last[key]
        return json.dumps([list(values), when], separators=(",", ":"))

    def recall(self, key: tuple[str, ...], text: str) -> None:
        """Know a product's last values from ``saved`` text of an earlier run, so that a
        snapshot re-sent after a restart is no news and a change is a move (a new fact).
        Unreadable text is ignored: the product's next quote is then a first quote."""
        try:
            values, when = json.loads(text)
            last = (tuple(str(v) for v in values), None if when is None else float(when))
        except (ValueError, TypeError):
            return
        self._remember(key, last)

    def news(self, quote: Quote) -> tuple[str, ...] | None:
        """The values ``quote`` replaces (``()`` when none are known), or None if no news."""
        key = self.key(quote)
        values: tuple[str, ...]
        if isinstance(quote, SportsbookQuote):
            values = (quote.price, quote.status)
            when = None
        else:
            values = (quote.bl, quote.bo, quote.ll, quote.lo, quote.status)
            when = parse_time(quote.ut) if quote.ut else None
        last = self._last.get(key)
        previous: tuple[str, ...] = ()
        if last is not None:
            previous, last_when = last
            if when is not None and last_when is not None and when < last_when:
                return None  # out of order: a newer quote of this product was seen
            if values == previous:
                if when is not None:
                    self._last[key] = (values, when)
                return None
        self._remember(key, (values, when))
        if previous:
            self.moves.next()
        return previous

    def _remember(self, key: tuple[str, ...], last: tuple[tuple[str, ...], float | None]) -> None:
        self._last[key] = last
        self._last.move_to_end(key)
        while len(self._last) > self.max_products:
            self._last.popitem(last=False)
