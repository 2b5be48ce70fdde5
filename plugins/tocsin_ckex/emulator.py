"""A local ckex "interact ws" server: quotes for registered markets, as PROTOCOLS.md section 5.

Strict where the provider is: the token must be an HS256 JWT signed with the emulator's
secret whose ``expires_at`` (RFC 3339) is in the future, else HTTP 401 at the upgrade;
frames are ``{"commend": ...}``; an unknown command or malformed JSON gets an error
frame and the socket stays open. A registration lasts ``market_ttl`` seconds (an hour,
like the provider). Quotes flow only after ``start`` (``require_start``), are re-sent
every ``quote_interval`` (the provider streams snapshots), and ``alive`` frames come every
``alive_interval`` whether started or not.

What PROTOCOLS.md marks [inferred] has a switch for the other reading: ``refusal`` (how a
refused token is answered: HTTP 401, HTTP 403, or ``"close"``: the upgrade accepted, an
error frame, then a 1008 close) and ``snapshot`` (``False``: each push to a connection
carries only the products that changed since the last push to it).

Tests drive it with the control methods: ``quote``/``fancy_quote`` (set and push),
``flip_status``, ``push`` (re-send a snapshot: a duplicate), ``send_alive``,
``send_empty``, ``send_error``, ``send_raw``, ``drop_connections``, ``silent`` (no frame
at all, TCP open), ``reject_all``, and the records ``connections``, ``refused``,
``commands``.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import json
import math
import random
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http import HTTPStatus
from typing import Any, Literal
from urllib.parse import parse_qs, urlsplit

import anyio
from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from tocsin import ScrubbingLogger, WebSocketEmulator

from .protocol import (
    FANCY,
    FANCY_FRAMES,
    MAX_FRAME,
    SPORTSBOOK,
    SPORTSBOOK_FRAME,
    Market,
    Register,
    Toggle,
    Unsubscribe,
    b64url_decode,
    parse_command,
    parse_time,
)

PATH = "/dev-f/quote/do-not-look-back"
DEMO_SECRET = "tocsin-ckex-emulator-secret"  # the demo's token is signed with it
DEMO_ISSUED = datetime(2024, 1, 1, tzinfo=UTC)
DEMO_EXPIRES = datetime(2099, 12, 31, tzinfo=UTC)  # fixed: the demo token never changes

REFUSALS = (401, 403, "close")
Refusal = Literal[401, 403, "close"]
REFUSAL_CLOSE_CODE = 1008  # policy violation: a refused token, told after the upgrade [inferred]

# The demo's markets: the seed's examples.
DEMO_MARKETS = (
    Market(SPORTSBOOK, "41115853-e", "1_31260330"),
    Market(SPORTSBOOK, "40789105-e", "219_33753655"),
    Market(FANCY, "44914246-e", "878_55854706_f"),
)


# -- tokens ---------------------------------------------------------------------------


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def rfc3339(moment: datetime) -> str:
    """A time as the provider's Go code writes it (UTC, ``Z``, nanoseconds)."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f") + "000Z"


def mint_token(
    secret: str,
    *,
    expires_at: datetime | None = None,
    issued_at: datetime | None = None,
    player_id: str = "tocsin_demo_player",
) -> str:
    """An HS256 JWT with the provider's claims; ``expires_at`` defaults to a day from now."""
    now = datetime.now(UTC)
    header = {"alg": "HS256", "typ": "JWT"}
    claims = {
        "user_id": "4da1e9d8-1e1e-44c3-916c-5818d2be4bda",
        "player_id": player_id,
        "merchant_code": "backoffice-d9e32",
        "issued_at": rfc3339(issued_at or now),
        "expires_at": rfc3339(expires_at or now + timedelta(days=1)),
        "language": "en",
    }
    signing = ".".join(
        _b64url(json.dumps(part, separators=(",", ":")).encode()) for part in (header, claims)
    )
    signature = hmac.new(secret.encode(), signing.encode(), hashlib.sha256).digest()
    return f"{signing}.{_b64url(signature)}"


def verify_token(token: str, secret: str, now: float) -> dict[str, Any]:
    """The claims of a valid token, or ``ValueError`` saying why it is refused."""
    parts = token.split(".")
    if len(parts) != 3:
        raise ValueError("malformed token")
    try:
        header = json.loads(b64url_decode(parts[0]))
        claims = json.loads(b64url_decode(parts[1]))
        signature = b64url_decode(parts[2])
    except (ValueError, RecursionError):
        raise ValueError("malformed token") from None
    if not isinstance(header, dict) or header.get("alg") != "HS256":
        raise ValueError("unsupported token algorithm")
    expected = hmac.new(secret.encode(), f"{parts[0]}.{parts[1]}".encode(), hashlib.sha256).digest()
    if not hmac.compare_digest(signature, expected):
        raise ValueError("invalid token signature")
    expires = claims.get("expires_at") if isinstance(claims, dict) else None
    deadline = parse_time(expires) if isinstance(expires, str) else None
    if deadline is None:
        raise ValueError("token has no expires_at")
    if deadline <= now:
        raise ValueError("token expired")
    assert isinstance(claims, dict)
    return claims


# -- the server -----------------------------------------------------------------------


@dataclass
class _Session:
    """One client connection and what it registered."""

    ws: ServerConnection
    number: int
    started: bool
    registered: dict[tuple[str, str], tuple[str, float]] = field(default_factory=dict)
    """(event_id, market_id) -> (kind, monotonic time of the registration)."""
    sent: dict[tuple[str, str], dict[str, dict[str, str]]] = field(default_factory=dict)
    """(event_id, market_id) -> product id -> the item as last pushed (``snapshot=False``)."""


@dataclass
class _Market:
    kind: str
    items: dict[str, dict[str, str]] = field(default_factory=dict)  # product id -> wire item


class CkexEmulator(WebSocketEmulator):
    """A protocol-faithful local ckex interact ws server, with controls for tests and demos."""

    name = "ckex"

    path = PATH

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        secret: str = DEMO_SECRET,
        market_ttl: float = 3600.0,
        quote_interval: float = 1.0,
        alive_interval: float = 10.0,
        require_start: bool = True,
        fancy_type: str = FANCY_FRAMES[0],
        fancy_eid: bool = False,
        refusal: Refusal = 401,
        snapshot: bool = True,
    ) -> None:
        if refusal not in REFUSALS:
            raise ValueError(f"refusal must be one of {REFUSALS}, not {refusal!r}")
        super().__init__(host, port)
        self.secret = secret
        self.market_ttl = market_ttl
        self.quote_interval = quote_interval
        self.alive_interval = alive_interval
        self.require_start = require_start
        self.fancy_type = fancy_type  # "order-slipt-fancy" for the seed's schema spelling
        self.fancy_eid = fancy_eid  # the schema lists eid; the example lacks it
        # 401 or 403: an HTTP refusal at the upgrade; "close": the upgrade is accepted, an
        # error frame sent, the socket closed (1008). Which one the provider does is a guess.
        self.refusal = refusal
        # True: each push is the market's full snapshot (a guess); False: only the
        # products that changed since the last push to that connection.
        self.snapshot = snapshot
        self.silent = False  # True: no frame at all, the TCP connection stays open
        self.reject_all = False  # True: every token is refused, as ``refusal`` says
        self.connections = 0  # connections admitted with a good token, ever
        # (monotonic time, reason) per refusal: 404, and every refused token whatever
        # ``refusal`` is.
        self.refused: list[tuple[float, str]] = []
        self.commands: list[str] = []  # every frame a client sent, as text
        self.sent_alive = 0
        self.sent_quotes = 0  # quote frames sent (snapshots, their repeats, or deltas)
        self.expired = 0  # registrations dropped after market_ttl
        self._markets: dict[tuple[str, str], _Market] = {}
        self._sessions: list[_Session] = []
        self._refusing: dict[ServerConnection, str] = {}  # "close": upgraded, then refused
        self._logger = ScrubbingLogger("websockets.server", query=["authorization"])

    # -- lifecycle --------------------------------------------------------------------

    def serve_options(self) -> dict[str, Any]:
        return {
            "process_request": self._check_request,
            "max_size": MAX_FRAME,
            "logger": self._logger,
        }

    def token(self, *, expired: bool = False) -> str:
        """A token this emulator accepts, or one that expired an hour ago."""
        if expired:
            past = datetime.now(UTC) - timedelta(hours=1)
            return mint_token(self.secret, issued_at=past - timedelta(days=1), expires_at=past)
        return mint_token(self.secret, issued_at=DEMO_ISSUED, expires_at=DEMO_EXPIRES)

    # -- records ----------------------------------------------------------------------

    @property
    def open_connections(self) -> int:
        return len(self._sessions)

    def registered(self) -> set[tuple[str, str, str]]:
        """(kind, event_id, market_id) registered and not expired, over every connection."""
        return {
            (kind, event_id, market_id)
            for session in self._sessions
            for (event_id, market_id), (kind, _) in self._live(session).items()
        }

    # -- control ----------------------------------------------------------------------

    async def quote(
        self,
        event_id: str,
        market_id: str,
        product_id: str,
        price: str,
        status: str = "1",
        *,
        push: bool = True,
    ) -> None:
        """Set one sportsbook product's price and status, and push the market."""
        market = self._markets.setdefault((event_id, market_id), _Market(SPORTSBOOK))
        market.items[product_id] = {
            "event_id": event_id,
            "market_id": market_id,
            "product_id": product_id,
            "price": price,
            "status": status,
        }
        if push:
            await self.push(event_id, market_id)

    async def fancy_quote(
        self,
        event_id: str,
        market_id: str,
        pid: str,
        *,
        bl: str,
        bo: str,
        ll: str,
        lo: str,
        status: str = "1",
        ut: str | None = None,
        push: bool = True,
    ) -> None:
        """Set one fancy product's lines and odds (``ut`` defaults to now), and push."""
        market = self._markets.setdefault((event_id, market_id), _Market(FANCY))
        item = {"mid": market_id, "pid": pid, "bl": bl, "bo": bo, "ll": ll, "lo": lo}
        item["status"] = status
        item["ut"] = ut or rfc3339(datetime.now(UTC))[:23] + "Z"  # as the seed: milliseconds
        if self.fancy_eid:
            item["eid"] = event_id
        market.items[pid] = item
        if push:
            await self.push(event_id, market_id)

    async def flip_status(self, event_id: str, market_id: str, status: str) -> None:
        """Set the status of every product of a market (``"1"`` open, else locked); push."""
        market = self._markets[(event_id, market_id)]
        for item in market.items.values():
            item["status"] = status
        await self.push(event_id, market_id)

    async def push(self, event_id: str, market_id: str) -> None:
        """Send the market to every started client that registered it.

        The whole market (a duplicate if nothing changed), or with ``snapshot=False`` what
        changed since the last push to that client (nothing at all if nothing did).
        """
        for session in list(self._sessions):
            if session.started and (event_id, market_id) in self._live(session):
                await self._send_market(session, event_id, market_id)

    async def send_alive(self) -> None:
        await self._broadcast({"type": "alive"})

    async def send_empty(self) -> None:
        await self._broadcast({})

    async def send_error(self, message: str) -> None:
        await self._broadcast({"type": "error", "error": message})

    async def send_raw(self, text: str | bytes) -> None:
        """Send ``text`` as is (malformed frames, oversized ones)."""
        for session in list(self._sessions):
            await self._send(session, text)

    async def drop_connections(self, *, abort: bool = False) -> None:
        """Close every connection (1011), or with ``abort`` cut the TCP without a close."""
        for session in list(self._sessions):
            if abort:
                session.ws.transport.abort()
            else:
                await session.ws.close(1011, "dropped by the emulator")

    # -- protocol ---------------------------------------------------------------------

    def _check_request(self, connection: ServerConnection, request: Request) -> Response | None:
        parts = urlsplit(request.path)
        if parts.path != PATH:
            self.refused.append((time.monotonic(), "not found"))
            return connection.respond(HTTPStatus.NOT_FOUND, "not found\n")
        reason = self._token_refusal(parts.query)
        if not reason:
            return None
        self.refused.append((time.monotonic(), reason))
        if self.refusal == "close":
            self._refusing[connection] = reason  # told once the socket is open
            return None
        return connection.respond(HTTPStatus(self.refusal), f"{reason}\n")

    def _token_refusal(self, query: str) -> str:
        """Why the query's token is refused, or ``""`` when it is good."""
        value = parse_qs(query).get("authorization", [""])[0]
        scheme, _, token = value.partition(" ")
        if self.reject_all:
            return "token revoked"
        if scheme.lower() != "bearer" or not token:
            return "missing bearer token"
        try:
            verify_token(token, self.secret, time.time())
        except ValueError as err:
            return str(err)
        return ""

    async def handle(self, ws: ServerConnection) -> None:
        reason = self._refusing.pop(ws, "")
        if reason:
            # The error frame's shape is the inferred one of every ckex error frame.
            with contextlib.suppress(ConnectionClosed):
                await ws.send(json.dumps({"type": "error", "error": reason}))
                await ws.close(REFUSAL_CLOSE_CODE, reason)
            return
        self.connections += 1
        session = _Session(ws, self.connections, started=not self.require_start)
        self._sessions.append(session)
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._alive_loop, session)
                tg.start_soon(self._quote_loop, session)
                try:
                    async for message in ws:
                        await self._command(session, message)
                except ConnectionClosed:
                    pass
                tg.cancel_scope.cancel()
        finally:
            self._sessions.remove(session)

    async def _command(self, session: _Session, message: str | bytes) -> None:
        text = message if isinstance(message, str) else message.decode("utf-8", "replace")
        self.commands.append(text)
        try:
            command = parse_command(message)
        except ValueError as err:
            reason = "invalid message" if str(err) == "not JSON" else str(err)
            await self._send(session, {"type": "error", "error": reason})
            return
        if isinstance(command, Register):
            market = command.market
            key = (market.event_id, market.market_id)
            session.registered[key] = (market.kind, time.monotonic())
            session.sent.pop(key, None)  # a new registration starts with the whole market
            if session.started:
                await self._send_market(session, *key)
        elif isinstance(command, Unsubscribe):
            session.registered.pop((command.event_id, command.market_id), None)
            session.sent.pop((command.event_id, command.market_id), None)
        elif isinstance(command, Toggle):
            was, session.started = session.started, command.running
            if session.started and not was:
                for key in list(self._live(session)):
                    await self._send_market(session, *key)

    def _live(self, session: _Session) -> dict[tuple[str, str], tuple[str, float]]:
        """The session's registrations, after dropping those older than ``market_ttl``."""
        now = time.monotonic()
        for key, (_, since) in list(session.registered.items()):
            if now - since >= self.market_ttl:
                del session.registered[key]
                session.sent.pop(key, None)
                self.expired += 1
        return session.registered

    async def _send_market(self, session: _Session, event_id: str, market_id: str) -> None:
        market = self._markets.get((event_id, market_id))
        kind = session.registered.get((event_id, market_id), ("", 0.0))[0]
        if market is None or not market.items or market.kind != kind:
            return  # unknown market, or registered as the other kind: nothing to quote
        frame_type = SPORTSBOOK_FRAME if market.kind == SPORTSBOOK else self.fancy_type
        items = list(market.items.values())
        if not self.snapshot:
            last = session.sent.get((event_id, market_id), {})
            items = [item for pid, item in market.items.items() if last.get(pid) != item]
            if not items:
                return  # nothing changed since the last push to this client
        if self.silent:
            return  # nothing goes out, so nothing counts as pushed
        if not self.snapshot:
            pushed = session.sent.setdefault((event_id, market_id), {})
            pushed.update((pid, dict(item)) for pid, item in market.items.items())
        self.sent_quotes += 1
        await self._send(session, {"type": frame_type, "data": items})

    async def _alive_loop(self, session: _Session) -> None:
        while True:
            await anyio.sleep(self.alive_interval)
            if not self.silent:
                self.sent_alive += 1
            await self._send(session, {"type": "alive"})

    async def _quote_loop(self, session: _Session) -> None:
        while True:
            await anyio.sleep(self.quote_interval)
            if session.started:
                for key in list(self._live(session)):
                    await self._send_market(session, *key)

    async def _broadcast(self, frame: dict[str, Any]) -> None:
        for session in list(self._sessions):
            await self._send(session, frame)

    async def _send(self, session: _Session, frame: dict[str, Any] | str | bytes) -> None:
        if self.silent:
            return
        text = frame if isinstance(frame, str | bytes) else json.dumps(frame)
        with contextlib.suppress(ConnectionClosed):  # it went away: the handler cleans up
            await session.ws.send(text)

    # -- demo -------------------------------------------------------------------------

    def demo_source(self) -> dict[str, Any]:
        return {
            "plugin": "ckex",
            "url": self.url,
            "token": self.token(),
            "markets": [
                {"kind": m.kind, "event_id": m.event_id, "market_id": m.market_id}
                for m in DEMO_MARKETS
            ],
        }

    async def demo_traffic(self) -> None:
        """Odds drifting around 2.0 on two markets, locks now and then, a fancy line moving.

        Set before any client registers, so a registering client gets a snapshot at once
        in which the away odds are above 2.0: a demo rule fires within a second. Then one
        product moves every tick and a market is suspended for a few seconds now and then.
        """
        rng = random.Random()
        (e1, m1), (e2, m2), (ef, mf) = ((m.event_id, m.market_id) for m in DEMO_MARKETS)
        centres = {(e1, m1, "1"): 1.61, (e1, m1, "2"): 2.05, (e1, m1, "3"): 10.26}
        centres |= {(e2, m2, "1"): 1.98, (e2, m2, "2"): 1.9}
        prices = dict(centres)
        prices[(e1, m1, "2")] = 2.37
        for (event_id, market_id, product_id), price in prices.items():
            await self.quote(event_id, market_id, product_id, f"{price:.2f}", push=False)
        line = 181
        await self.fancy_quote(ef, mf, "1", bl=str(line), bo="100", ll=str(line + 1), lo="100")
        movers = [key for key in centres if centres[key] < 3]  # the long odds stay put
        tick = 0
        while True:
            await anyio.sleep(1.0)
            tick += 1
            key = movers[tick % len(movers)]
            # A mean-reverting random walk: the odds near 2.0 cross it every few moves.
            drift = 0.4 * math.log(centres[key] / prices[key]) + rng.gauss(0, 0.05)
            prices[key] = max(1.01, round(prices[key] * math.exp(drift), 2))
            await self.quote(*key, f"{prices[key]:.2f}")
            if tick % 20 == 12:
                await self.flip_status(e2, m2, "2")  # suspended: a goal is being checked
            elif tick % 20 == 16:
                await self.flip_status(e2, m2, "1")
            if tick % 5 == 0:
                line += rng.choice((-1, 1))
                status = "-3" if tick % 30 == 0 else "1"
                await self.fancy_quote(
                    ef, mf, "1", bl=str(line), bo="100", ll=str(line + 1), lo="100", status=status
                )
