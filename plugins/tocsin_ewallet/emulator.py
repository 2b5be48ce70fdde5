"""A local eWallet websocket server, faithful to the provider's code (PROTOCOLS.md section 4).

Strict where eWallet is strict: the exact ``Accept`` value, the scheme allowed on each
socket, HTTP 403 with an empty body and no upgrade for any auth failure, the exact keys
of server frames, ``ref: null`` on broadcasts, the idle timeout, and a socket that drops
on a frame the serializer cannot decode (an array, a binary frame, a missing ``ref``).

Tests and the demo drive it with Python methods: ``request_consumption``, ``finalize``,
``fail_finalize`` (broadcast to every topic eWallet broadcasts to), ``crash_channel``,
``push_raw``, ``drop_connections``, ``answer_heartbeats``, ``forbid``; and read what
happened in ``connections``, ``refused``, ``received``, ``handshakes``, ``joined()``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import itertools
import json
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl

import anyio
from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from tocsin import ScrubbingLogger, WebSocketEmulator

from .ledger import (
    FAILURES,
    Party,
    TransactionRequest,
    consumer_of,
    new_consumption,
    new_id,
    settle,
)
from .protocol import (
    ACCEPT,
    ADMIN_PATH,
    CLIENT_PATH,
    FINALIZED_EVENT,
    PHOENIX_TOPIC,
    REQUEST_EVENT,
    TOPIC_PREFIXES,
    error_object,
    server_frame,
)

DEMO_API_KEY = "demo-api-key-8Fq2"
DEMO_AUTH_TOKEN = "demo-auth-token-Zr61"
DEMO_ACCESS_KEY = "demo-access-key-Lw93"
DEMO_SECRET_KEY = "demo-secret-key-Hy47"
DEMO_USER = "usr_01hdemo0wner000000000000"
DEMO_REQUEST = "txr_01hdemo0request0000000000"
FORBIDDEN = ("websocket:forbidden_channel", "You don't have access to this channel.")
INVALID = ("client:invalid_parameter", "Invalid parameter provided.")
CONNECT_ERROR = "websocket:connect_error"
# The emulator logs received headers at debug like any websockets server: mask the credentials.
SERVER_LOGGER = ScrubbingLogger("websockets.server.ewallet", headers=["authorization"])
_ID_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-.")


@dataclass
class ClientFrame:
    """A frame a client sent, with its connection number and arrival time (monotonic)."""

    connection: int
    raw: str | bytes
    at: float

    def json(self) -> Any:
        return json.loads(self.raw)


@dataclass
class Handshake:
    """An upgrade request: the socket, the headers eWallet read, and the verdict."""

    path: str
    headers: dict[str, str]
    accepted: bool
    at: float


@dataclass(eq=False)
class _Conn:
    number: int
    ws: ServerConnection
    kind: str  # "client" or "admin"
    who: tuple[str, str]  # ("client", user id) / ("provider", access key) / ("admin", user id)
    joined: dict[str, Any] = field(default_factory=dict)  # topic -> ref of its join


class EWalletEmulator(WebSocketEmulator):
    """The eWallet client and admin sockets on loopback, with control methods for tests.

    ``idle_timeout`` is the server's 60 s idle close; ``broken_client_channels`` makes
    ``account:`` and ``address:`` joins crash on the client socket as the provider's code
    does (their channel modules do not exist); ``seed_broadcast_ref`` sends the seed's
    ``"ref": "1"`` on broadcasts instead of the code's ``null``; ``seed_provider_on_client``
    accepts provider credentials (``OMGProvider`` or ``Basic`` with an access and secret
    key) on the client socket as the seed implies, where the code answers 403.
    """

    name = "ewallet"

    path = CLIENT_PATH

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        idle_timeout: float = 60.0,
        broken_client_channels: bool = True,
        seed_broadcast_ref: bool = False,
        seed_provider_on_client: bool = False,
    ) -> None:
        super().__init__(host, port)
        self.idle_timeout = idle_timeout
        self.broken_client_channels = broken_client_channels
        self.seed_broadcast_ref = seed_broadcast_ref
        self.seed_provider_on_client = seed_provider_on_client
        self.answer_heartbeats = True
        # Credentials: api_key -> (auth_token, user id); access_key -> secret_key.
        self.clients: dict[str, tuple[str, str]] = {DEMO_API_KEY: (DEMO_AUTH_TOKEN, DEMO_USER)}
        self.providers: dict[str, str] = {DEMO_ACCESS_KEY: DEMO_SECRET_KEY}
        self.admins: dict[str, str] = {}  # OMGAdmin: user id -> auth token
        self.users: dict[str, Party] = {}
        self.requests: dict[str, TransactionRequest] = {}
        self.consumptions: dict[str, dict[str, Any]] = {}
        self.forbidden: set[str] = set()
        self.owner = self.add_user(DEMO_USER, "5555cer3-15d1-4463-9ec2-02bc8ded7120")
        self.add_request(DEMO_REQUEST, self.owner)
        # What happened, for tests.
        self.connections = 0
        self.refused = 0
        self.idle_closes = 0
        self.received: list[ClientFrame] = []
        self.handshakes: list[Handshake] = []
        self.live: set[_Conn] = set()
        self._numbers = itertools.count(1)
        self._pending: dict[ServerConnection, tuple[str, tuple[str, str]]] = {}
        self._joins = asyncio.Event()  # set and replaced on every join

    # -- lifecycle ---------------------------------------------------------------------

    def serve_options(self) -> dict[str, Any]:
        return {
            "process_request": self._process_request,
            "ping_interval": None,  # Cowboy never pings
            "max_size": 1 << 20,
            "logger": SERVER_LOGGER,
        }

    @property
    def admin_url(self) -> str:
        return f"ws://{self.host}:{self.port}{ADMIN_PATH}"

    # -- data --------------------------------------------------------------------------

    def add_user(self, user_id: str, address: str, account_id: str | None = None) -> Party:
        party = Party(address, user_id, account_id)
        self.users[user_id] = party
        return party

    def add_client(self, api_key: str, auth_token: str, user_id: str) -> None:
        self.clients[api_key] = (auth_token, user_id)

    def add_request(self, request_id: str, owner: Party) -> None:
        self.requests[request_id] = TransactionRequest(request_id, owner)

    def forbid(self, topic: str) -> None:
        """Refuse joins of ``topic`` with ``websocket:forbidden_channel``."""
        self.forbidden.add(topic)

    # -- broadcasts --------------------------------------------------------------------

    async def broadcast(
        self, topics: list[str], event: str, data: Any, *, success: bool = True, error: Any = None
    ) -> int:
        """Send one broadcast to every connection joined to each topic; frames sent."""
        ref = "1" if self.seed_broadcast_ref else None
        sent = 0
        for topic in dict.fromkeys(topics):
            text = server_frame(topic, event, ref, success=success, data=data, error=error)
            for conn in list(self.live):
                if topic in conn.joined:
                    sent += await self._send(conn, text)
        return sent

    async def request_consumption(
        self,
        request_id: str = DEMO_REQUEST,
        consumer: Party | None = None,
        amount: int = 100,
        consumption_id: str | None = None,
    ) -> dict[str, Any]:
        """A new pending consumption, broadcast as ``transaction_consumption_request``
        to the request's ``transaction_request:``, ``address:``, ``user:`` and ``account:``."""
        request = self.requests[request_id]
        consumer = consumer or Party("9999abc1-0000-4000-8000-000000000001", "usr_consumer")
        cid = consumption_id or new_id("txc")
        consumption = new_consumption(request, consumer, amount, cid)
        self.consumptions[cid] = consumption
        await self.broadcast(request.topics(), REQUEST_EVENT, consumption)
        return consumption

    def finalized_topics(self, consumption_id: str) -> list[str]:
        """The request's and the consumption's topics and both parties' (eWallet's list)."""
        consumption = self.consumptions[consumption_id]
        request = self.requests[consumption["transaction_request_id"]]
        return [
            *request.topics(),
            f"transaction_consumption:{consumption_id}",
            *consumer_of(consumption).topics(),
        ]

    async def finalize(self, consumption_id: str, status: str = "confirmed") -> int:
        """Broadcast ``transaction_consumption_finalized`` with ``success: true``; frames sent.

        Calling it twice sends the same fact twice (a duplicate)."""
        consumption = settle(self.consumptions[consumption_id], status)
        topics = self.finalized_topics(consumption_id)
        return await self.broadcast(topics, FINALIZED_EVENT, consumption)

    async def fail_finalize(
        self, consumption_id: str, status: str = "failed", code: str | None = None
    ) -> int:
        """A failed finalize: ``success: false``, the consumption in ``data``, an error.

        The code is the consumption's own error when it failed (``code``, default
        ``transaction:insufficient_funds``), ``transaction_consumption:expired`` when it
        expired, ``transaction_consumption:unfinalized`` while it is pending."""
        consumption = settle(self.consumptions[consumption_id], status)
        default_code, description = FAILURES.get(status, FAILURES["failed"])
        error = error_object(code or default_code, description)
        topics = self.finalized_topics(consumption_id)
        return await self.broadcast(
            topics, FINALIZED_EVENT, consumption, success=False, error=error
        )

    # -- faults ------------------------------------------------------------------------

    async def push_raw(self, raw: str | bytes) -> None:
        """Send ``raw`` as is to every connection (malformed frames, odd shapes)."""
        for conn in list(self.live):
            await self._send(conn, raw)

    async def crash_channel(self, topic: str) -> None:
        """The channel process crashes: ``phx_error`` (ref = the join's) and it is left."""
        for conn in list(self.live):
            ref = conn.joined.pop(topic, None)
            if ref is not None:
                await self._send(conn, server_frame(topic, "phx_error", ref, success=False))

    async def drop_connections(
        self, code: int = 1011, reason: str = "dropped by the emulator"
    ) -> None:
        for conn in list(self.live):
            await conn.ws.close(code, reason)

    def joined(self, topic: str) -> int:
        """How many live connections have joined ``topic``."""
        return sum(topic in conn.joined for conn in self.live)

    def frames(self, event: str | None = None, topic: str | None = None) -> list[dict[str, Any]]:
        """The JSON frames clients sent, optionally only those of an event / topic."""
        out = []
        for item in self.received:
            try:
                msg = item.json()
            except ValueError:
                continue
            if (
                isinstance(msg, dict)
                and (event is None or msg.get("event") == event)
                and (topic is None or msg.get("topic") == topic)
            ):
                out.append(msg)
        return out

    # -- the demo ----------------------------------------------------------------------

    def demo_source(self) -> dict[str, Any]:
        return {
            "plugin": "ewallet",
            "url": self.url,
            "api_key": DEMO_API_KEY,
            "auth_token": DEMO_AUTH_TOKEN,
            # Both topics receive every consumption of the request: one event each.
            "channels": [f"transaction_request:{DEMO_REQUEST}", f"user:{DEMO_USER}"],
            "heartbeat": "5s",
            "stale_after": "15s",
        }

    async def demo_traffic(self) -> None:
        """Consumptions of the demo request, each finalized half a second later: mostly
        confirmed, some failing for lack of funds, some expiring."""
        topic = f"transaction_request:{DEMO_REQUEST}"
        consumers = [
            Party("9999abc1-0000-4000-8000-000000000001", "usr_01hdemoalice000000000000"),
            Party("9999abc1-0000-4000-8000-000000000002", "usr_01hdemobob00000000000000"),
            Party("9999abc1-0000-4000-8000-000000000003", None, "acc_01hdemoshop0000000000000"),
        ]
        for n in itertools.count():
            while not self.joined(topic):
                await self._joins.wait()
            consumption = await self.request_consumption(
                DEMO_REQUEST, consumers[n % len(consumers)], amount=(25, 100, 1500, 40, 7)[n % 5]
            )
            await anyio.sleep(0.5)
            if n % 5 == 3:
                await self.fail_finalize(consumption["id"])
            elif n % 7 == 6:
                await self.fail_finalize(consumption["id"], status="expired")
            else:
                await self.finalize(consumption["id"])
            await anyio.sleep(1.5)

    # -- the server --------------------------------------------------------------------

    def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        path, _, query = request.path.partition("?")
        kind = {CLIENT_PATH: "client", ADMIN_PATH: "admin"}.get(path)
        if kind is None:
            return connection.respond(404, "")  # the Cowboy route is exactly the path
        params = parse_qsl(query, keep_blank_values=True)
        # With a query `headers` map (the admin frontend's form) the real headers are ignored.
        from_query = {
            k[8:-1].lower(): v for k, v in params if k.startswith("headers[") and k.endswith("]")
        }
        headers = from_query or {k.lower(): v for k, v in request.headers.raw_items()}
        who = self._authenticate(kind, headers)
        self.handshakes.append(Handshake(path, headers, who is not None, time.monotonic()))
        if who is None:
            self.refused += 1
            return connection.respond(403, "")
        self._pending[connection] = (kind, who)
        return None

    def _authenticate(self, kind: str, headers: dict[str, str]) -> tuple[str, str] | None:
        if headers.get("accept") != ACCEPT:
            return None
        scheme, _, token = headers.get("authorization", "").partition(" ")
        try:
            user, sep, password = base64.b64decode(token, validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError, ValueError):
            return None
        if not sep:
            return None
        provider = scheme in ("OMGProvider", "Basic") and self.providers.get(user) == password
        if kind == "client":
            if scheme in ("OMGClient", "Basic") and self.clients.get(user, ("",))[0] == password:
                return ("client", self.clients[user][1])
            if provider and self.seed_provider_on_client:
                return ("provider", user)  # the seed's reading
            return None  # OMGProvider and OMGAdmin work only on the admin socket
        if provider:
            return ("provider", user)
        if scheme == "OMGAdmin" and self.admins.get(user) == password:
            return ("admin", user)
        return None

    async def handle(self, ws: ServerConnection) -> None:
        kind, who = self._pending.pop(ws)
        conn = _Conn(next(self._numbers), ws, kind, who)
        self.connections += 1
        self.live.add(conn)
        try:
            while True:
                try:
                    with anyio.fail_after(self.idle_timeout):
                        raw = await ws.recv()
                except TimeoutError:
                    self.idle_closes += 1
                    await ws.close(1000, "idle timeout")
                    return
                self.received.append(ClientFrame(conn.number, raw, time.monotonic()))
                if not await self._dispatch(conn, raw):
                    # The serializer raised: the socket process dies, the socket drops.
                    await ws.close(1011, "")
                    return
        except ConnectionClosed:
            pass
        finally:
            self.live.discard(conn)

    async def _dispatch(self, conn: _Conn, raw: str | bytes) -> bool:
        """Handle one client frame; False when it cannot be decoded (the socket drops)."""
        if isinstance(raw, bytes):
            return False
        try:
            msg = json.loads(raw)
        except ValueError:
            return False
        if not isinstance(msg, dict) or not all(k in msg for k in ("topic", "event", "ref")):
            return False  # a V2 array frame, or Message.from_map! missing a key
        topic, event, ref = msg["topic"], msg["event"], msg["ref"]
        if not isinstance(topic, str) or not isinstance(event, str):
            return False
        if topic == PHOENIX_TOPIC and event == "heartbeat":
            if self.answer_heartbeats:
                await self._send(conn, server_frame(topic, "phx_reply", ref))
        elif event == "phx_join":
            await self._join(conn, topic, ref)
        elif topic in conn.joined:
            join_ref = conn.joined.pop(topic)
            if event == "phx_leave":
                await self._send(conn, server_frame(topic, "phx_reply", ref))
                await self._send(conn, server_frame(topic, "phx_close", join_ref, success=False))
            else:
                # eWallet channels define no handle_in: the channel crashes.
                await self._send(conn, server_frame(topic, "phx_error", join_ref, success=False))
        else:
            await self._refuse(conn, topic, ref, CONNECT_ERROR, "unmatched topic")
        return True

    async def _join(self, conn: _Conn, topic: str, ref: Any) -> None:
        prefix, sep, rest = topic.partition(":")
        if not sep or prefix not in TOPIC_PREFIXES:
            await self._refuse(conn, topic, ref, CONNECT_ERROR, "unmatched topic")
        elif (
            conn.kind == "client"
            and prefix in ("account", "address")
            and self.broken_client_channels
        ):
            await self._refuse(conn, topic, ref, CONNECT_ERROR, "join crashed")
        elif not rest or not set(rest) <= _ID_CHARS:
            await self._refuse(conn, topic, ref, *INVALID)
        elif topic in self.forbidden or not self._may_join(conn.who, prefix, rest):
            await self._refuse(conn, topic, ref, *FORBIDDEN)
        else:
            old = conn.joined.get(topic)
            if old is not None:  # a duplicate join closes the old channel first
                await self._send(conn, server_frame(topic, "phx_close", old, success=False))
            conn.joined[topic] = ref
            await self._send(conn, server_frame(topic, "phx_reply", ref))
            self._joins.set()
            self._joins = asyncio.Event()  # set and replaced on every join

    def _may_join(self, who: tuple[str, str], prefix: str, rest: str) -> bool:
        """Whether ``who`` may see the resource: its own, or any existing one for a provider."""
        role, ident = who
        if prefix == "user":
            return rest in self.users and (role != "client" or rest == ident)
        if prefix == "transaction_request":
            request = self.requests.get(rest)
            return request is not None and (role != "client" or request.owner.user_id == ident)
        if prefix == "transaction_consumption":
            consumption = self.consumptions.get(rest)
            if consumption is None:
                return False
            owner = self.requests[consumption["transaction_request_id"]].owner.user_id
            return role != "client" or ident in (consumption["user_id"], owner)
        if prefix == "address":
            parties = [u for u in self.users.values() if u.address == rest]
            return bool(parties) and (role != "client" or parties[0].user_id == ident)
        return role != "client"  # account: admin only (it crashes on the client socket)

    async def _refuse(self, conn: _Conn, topic: str, ref: Any, code: str, description: str) -> None:
        await self._send(
            conn,
            server_frame(
                topic, "phx_reply", ref, success=False, error=error_object(code, description)
            ),
        )

    async def _send(self, conn: _Conn, text: str | bytes) -> int:
        try:
            await conn.ws.send(text)
        except ConnectionClosed:
            return 0
        return 1
