"""A local EOSPark server: the protocol of PROTOCOLS.md section 1, strict where EOSPark is.

- the key in the ``apikey`` header or the ``?apikey=`` query; a bad key gets the
  ``auth`` 403 message and a close (or, with ``auth_refusal="http"``, an HTTP 403);
- one connection per key: a second one gets ``406 No repeat connection.`` and a close;
- ``subscribe``/``unsubscribe`` (and the legacy ``subscribe_account`` forms), at most
  ``max_accounts`` accounts and ``max_contracts`` contracts per connection;
- a heartbeat ``first_heartbeat`` seconds after a connection is accepted (at once by
  default: a client hears one well within the seed's 10 s), then every
  ``heartbeat_interval`` seconds;
- a transaction is pushed to a client when one of its actions matches a subscription:
  contract in its contracts AND (the actor or a notified account) in its accounts.

Tests drive it with ``push_transaction``, ``push_raw``, ``drop_connections``,
``stop_heartbeats`` and read ``connections``, ``refused``, ``received``.
"""

from __future__ import annotations

import hashlib
import json
import random
import secrets
import time
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from http import HTTPStatus
from typing import Any, Literal
from urllib.parse import parse_qs, urlsplit

import anyio
from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from tocsin import ScrubbingLogger, WebSocketEmulator

from .protocol import (
    ERRNO_FORBIDDEN,
    ERRNO_REPEAT_CONNECTION,
    MAX_FRAME,
    ack_frame,
    data_frame,
    envelope,
    heartbeat_frame,
    refusal_frame,
)

DEMO_KEY = "demo-eospark-key"
DEMO_ACCOUNT = "myaccount"
PATHS = ("/v1/ws", "/test/v1/ws")
ANY = "*"  # a legacy subscribe_account/subscribe_contract leaves the other side open
CST = timezone(timedelta(hours=8))  # heart_beat looks like Beijing time [inferred]
# Keys of an action's data that name an account the contract notifies [inferred].
_NOTIFIED_KEYS = ("from", "to", "receiver", "payer", "owner", "voter", "account")

Triple = tuple[str, str, str]  # (account, contract, action); action "" = all


# -- building transactions (tests and the demo) ----------------------------------------

_NAME_CHARS = ".12345abcdefghijklmnopqrstuvwxyz"


def name_to_u64(name: str) -> int:
    """An EOS name as its 64-bit value (the encoding in ``hex_data``)."""
    value = 0
    for i in range(13):
        c = _NAME_CHARS.index(name[i]) if i < len(name) else 0
        value |= (c & (0x1F if i < 12 else 0x0F)) << (64 - 5 * (i + 1) if i < 12 else 0)
    return value


def transfer_hex(frm: str, to: str, quantity: str, memo: str) -> str:
    """The serialized ``eosio.token::transfer`` args, as ``hex_data`` carries them."""
    amount_text, symbol = quantity.split()
    whole, _, decimals = amount_text.partition(".")
    amount = int(whole + decimals)
    symbol_bytes = bytes([len(decimals)]) + symbol.encode().ljust(7, b"\0")
    memo_bytes = memo.encode()
    length, varuint = len(memo_bytes), b""
    while True:
        byte, length = length & 0x7F, length >> 7
        varuint += bytes([byte | (0x80 if length else 0)])
        if not length:
            break
    return (
        name_to_u64(frm).to_bytes(8, "little")
        + name_to_u64(to).to_bytes(8, "little")
        + amount.to_bytes(8, "little", signed=True)
        + symbol_bytes
        + varuint
        + memo_bytes
    ).hex()


def action(
    contract: str, name: str, actor: str, data: Mapping[str, Any], hex_data: str = ""
) -> dict[str, Any]:
    """One action as EOSPark pushes it."""
    return {
        "account": contract,
        "authorization": [{"actor": actor, "permission": "active"}],
        "data": dict(data),
        "hex_data": hex_data,
        "name": name,
    }


def transfer(
    frm: str, to: str, quantity: str, memo: str = "", contract: str = "eosio.token"
) -> dict[str, Any]:
    """An ``eosio.token``-style ``transfer`` action."""
    data = {"from": frm, "to": to, "quantity": quantity, "memo": memo}
    return action(contract, "transfer", frm, data, transfer_hex(frm, to, quantity, memo))


def transaction(
    actions: Iterable[Mapping[str, Any]],
    trx_id: str = "",
    block_num: int = 25_477_790,
    timestamp: str = "",
    global_action_seq: int | None = None,
) -> dict[str, Any]:
    """A ``data`` push payload; ``trx_id`` defaults to a random 64-hex id."""
    trx: dict[str, Any] = {
        "trx_id": trx_id or secrets.token_hex(32),
        "block_num": block_num,
        "trx_timestamp": timestamp or eos_time(),
        "actions": [dict(a) for a in actions],
    }
    if global_action_seq is not None:
        trx["global_action_seq"] = global_action_seq
    return trx


def eos_time(moment: float | None = None) -> str:
    """EOS block time: UTC without a zone, on a half-second slot (``2018-11-06T06:30:50.500``)."""
    now = time.time() if moment is None else moment
    slot = datetime.fromtimestamp(round(now * 2) / 2, tz=UTC)
    return slot.strftime("%Y-%m-%dT%H:%M:%S.") + f"{slot.microsecond // 1000:03d}"


def involved(act: Mapping[str, Any]) -> set[str]:
    """The accounts an action concerns: its contract, its actors, and accounts it notifies."""
    names = {str(act.get("account", ""))}
    for auth in act.get("authorization") or []:
        if isinstance(auth, Mapping) and isinstance(auth.get("actor"), str):
            names.add(auth["actor"])
    data = act.get("data")
    if isinstance(data, Mapping):
        names.update(data[k] for k in _NOTIFIED_KEYS if isinstance(data.get(k), str))
    return names


def matches(subs: Iterable[Triple], act: Mapping[str, Any]) -> bool:
    """Whether one action matches any of the subscriptions."""
    accounts = involved(act)
    return any(
        (contract in (ANY, act.get("account")))
        and (account == ANY or account in accounts)
        and (not wanted or wanted == act.get("name"))
        for account, contract, wanted in subs
    )


# -- the server ------------------------------------------------------------------------


@dataclass(eq=False)
class Client:
    """One accepted connection."""

    ws: ServerConnection
    key: str
    subs: set[Triple] = field(default_factory=set)
    heartbeats: bool = True


class EOSParkEmulator(WebSocketEmulator):
    """A local EOSPark WebSocket server with control methods for tests and the demo."""

    name = "eospark"

    path = PATHS[0]

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        api_keys: Iterable[str] = (DEMO_KEY,),
        heartbeat_interval: float = 10.0,
        first_heartbeat: float = 0.0,
        max_accounts: int = 5,
        max_contracts: int = 5,
        auth_refusal: Literal["message", "http"] = "message",
        unsubscribe_ack_key: Literal["subscribe", "unsubscribe"] = "subscribe",
        demo_account: str = DEMO_ACCOUNT,
        demo_interval: float = 0.5,
    ) -> None:
        super().__init__(host, port)
        self.api_keys = set(api_keys)
        self.heartbeat_interval = heartbeat_interval
        self.first_heartbeat = first_heartbeat
        self.max_accounts = max_accounts
        self.max_contracts = max_contracts
        self.auth_refusal = auth_refusal
        self.unsubscribe_ack_key = unsubscribe_ack_key
        self.demo_account = demo_account
        self.demo_interval = demo_interval
        self.clients: dict[str, Client] = {}  # by key: one connection per key
        self.connections = 0  # handshakes received
        self.accepted = 0  # connections that got past auth
        self.refused: Counter[int] = Counter()  # errno -> count (403, 406)
        self.received: list[Any] = []  # every client message, parsed (or the raw text)
        self.pushed = 0  # data frames sent
        self._changed: anyio.Event | None = None  # set when subscriptions change
        self._log = ScrubbingLogger("websockets.server", headers=["apikey"], query=["apikey"])

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        self._changed = anyio.Event()
        await super().start()

    def serve_options(self) -> dict[str, Any]:
        return {
            "process_request": self._process_request,
            "max_size": MAX_FRAME,
            "logger": self._log,
        }

    # -- control -------------------------------------------------------------------------

    @property
    def subscribed(self) -> int:
        """How many connected clients have at least one subscription."""
        return sum(1 for c in self.clients.values() if c.subs)

    async def push_transaction(self, trx: Mapping[str, Any], times: int = 1) -> int:
        """Push ``trx`` (``times`` times) to each client it matches; returns how many."""
        frame = data_frame(trx)
        sent = 0
        for client in list(self.clients.values()):
            if any(matches(client.subs, a) for a in trx.get("actions", [])):
                for _ in range(times):
                    if await self._send(client, frame):
                        self.pushed += 1
                sent += 1
        return sent

    async def push_raw(self, frame: str | bytes) -> int:
        """Send ``frame`` as is to every client (malformed or oversized frames)."""
        return sum([await self._send(c, frame) for c in list(self.clients.values())])

    async def drop_connections(self, code: int = 1011, abort: bool = False) -> None:
        """Close every connection; ``abort`` cuts TCP with no close frame."""
        for client in list(self.clients.values()):
            if abort:
                client.ws.transport.abort()
            else:
                await client.ws.close(code, "dropped by the emulator")

    def stop_heartbeats(self) -> None:
        """Current connections stay open but get no more heartbeats; new ones do."""
        for client in self.clients.values():
            client.heartbeats = False

    def resume_heartbeats(self) -> None:
        for client in self.clients.values():
            client.heartbeats = True

    # -- protocol ------------------------------------------------------------------------

    @staticmethod
    def _key(request: Request) -> str:
        key = request.headers.get("apikey")
        if key:
            return key
        return parse_qs(urlsplit(request.path).query).get("apikey", [""])[0]

    def _process_request(self, ws: ServerConnection, request: Request) -> Response | None:
        self.connections += 1
        if urlsplit(request.path).path not in PATHS:
            return ws.respond(HTTPStatus.NOT_FOUND, "Not Found\n")
        if self.auth_refusal == "http" and self._key(request) not in self.api_keys:
            self.refused[ERRNO_FORBIDDEN] += 1
            return ws.respond(HTTPStatus.FORBIDDEN, refusal_frame(ERRNO_FORBIDDEN))
        return None

    async def handle(self, ws: ServerConnection) -> None:
        assert ws.request is not None
        key = self._key(ws.request)
        errno = 0
        if key not in self.api_keys:
            errno = ERRNO_FORBIDDEN
        elif key in self.clients:
            errno = ERRNO_REPEAT_CONNECTION  # the first connection wins
        if errno:
            self.refused[errno] += 1
            try:
                await ws.send(refusal_frame(errno))
                await ws.close(1008, "Forbidden" if errno == 403 else "No repeat connection.")
            except ConnectionClosed:
                pass
            return
        client = Client(ws, key)
        self.clients[key] = client
        self.accepted += 1
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._heartbeats, client)
                try:
                    async for raw in ws:
                        await self._on_message(client, raw)
                except ConnectionClosed:
                    pass
                tg.cancel_scope.cancel()
        finally:
            if self.clients.get(key) is client:
                del self.clients[key]

    def _notify(self) -> None:
        if self._changed is not None:
            self._changed.set()
            self._changed = anyio.Event()

    async def _send(self, client: Client, frame: str | bytes) -> bool:
        try:
            await client.ws.send(frame)
        except ConnectionClosed:
            return False
        return True

    async def _heartbeats(self, client: Client) -> None:
        await anyio.sleep(self.first_heartbeat)
        while True:
            if client.heartbeats:
                now = datetime.now(CST).strftime("%Y-%m-%d %H:%M:%S")
                if not await self._send(client, heartbeat_frame(now)):
                    return
            await anyio.sleep(self.heartbeat_interval)

    async def _on_message(self, client: Client, raw: str | bytes) -> None:
        try:
            msg = json.loads(raw)
        except (ValueError, RecursionError):
            msg = None
        self.received.append(msg if msg is not None else raw)
        if not isinstance(msg, dict) or not isinstance(msg.get("msg_type"), str):
            await self._send(client, envelope("error", errno=400, errmsg="Invalid message"))
            return
        kind: str = msg["msg_type"]
        if kind == "subscribe":
            reply = self._subscribe(client, msg)
        elif kind == "unsubscribe":
            reply = self._unsubscribe(client, msg)
        elif kind in ("subscribe_account", "subscribe_contract"):
            reply = self._legacy_subscribe(client, kind, msg)
        elif kind in ("unsubscribe_account", "unsubscribe_contract"):
            reply = self._legacy_unsubscribe(client, kind, msg)
        else:
            reply = envelope(kind[:40], errno=400, errmsg="Unknown msg_type")
        await self._send(client, reply)

    def _add(self, client: Client, kind: str, triples: set[Triple]) -> str:
        """Add subscriptions within the limits; the ack frame either way."""
        merged = client.subs | triples
        accounts = {a for a, _, _ in merged if a != ANY}
        contracts = {c for _, c, _ in merged if c != ANY}
        if len(accounts) > self.max_accounts:
            return ack_frame(kind, False, f"Subscribe up to {self.max_accounts} accounts")
        if len(contracts) > self.max_contracts:
            return ack_frame(kind, False, f"Subscribe up to {self.max_contracts} contracts")
        client.subs = merged  # idempotent: subscribing twice changes nothing
        self._notify()
        return ack_frame(kind, True, "ok")

    def _subscribe(self, client: Client, msg: dict[str, Any]) -> str:
        accounts, contracts = _names(msg.get("account")), _names(msg.get("contract"))
        action_name = msg.get("action_name", "")
        if not accounts:
            return ack_frame("subscribe", False, "account can not be empty")
        if not contracts:
            return ack_frame("subscribe", False, "contract can not be empty")
        if not isinstance(action_name, str):
            return ack_frame("subscribe", False, "action_name must be a string")
        triples = {(a, c, action_name.strip()) for a in accounts for c in contracts}
        return self._add(client, "subscribe", triples)

    def _unsubscribe(self, client: Client, msg: dict[str, Any]) -> str:
        accounts, contracts = _names(msg.get("account")), _names(msg.get("contract"))
        action_name = msg.get("action_name", "")
        ok, why = True, "ok"
        if len(accounts) != 1 or len(contracts) != 1 or not isinstance(action_name, str):
            ok, why = False, "only one account and one contract at a time"
        else:
            pair = (accounts[0], contracts[0])
            client.subs = {
                t for t in client.subs if t[:2] != pair or (action_name and t[2] != action_name)
            }
        return envelope("unsubscribe", {self.unsubscribe_ack_key: ok, "msg": why})

    def _legacy_subscribe(self, client: Client, kind: str, msg: dict[str, Any]) -> str:
        name = msg.get("name")
        if not isinstance(name, str) or not name.strip():
            return ack_frame(kind, False, "name can not be empty")
        triple = (name.strip(), ANY, "") if kind.endswith("account") else (ANY, name.strip(), "")
        return self._add(client, kind, {triple})

    def _legacy_unsubscribe(self, client: Client, kind: str, msg: dict[str, Any]) -> str:
        name = msg.get("name")
        if not isinstance(name, str) or not name.strip():
            return ack_frame(kind, False, "name can not be empty")
        triple = (name.strip(), ANY, "") if kind.endswith("account") else (ANY, name.strip(), "")
        client.subs.discard(triple)
        return ack_frame(kind, True, "ok")

    # -- demo ----------------------------------------------------------------------------

    def demo_source(self) -> dict[str, Any]:
        return {
            "plugin": "eospark",
            "url": self.url,
            "api_key": next(iter(sorted(self.api_keys)), DEMO_KEY),
            "subscriptions": [
                {"account": self.demo_account, "contract": ["eosio.token", "eosio"], "action": ""}
            ],
        }

    async def demo_traffic(self) -> None:
        script = DemoScript(self.demo_account)
        while True:
            while not self.subscribed and self._changed is not None:
                await self._changed.wait()  # nothing to show until a client subscribes
            for trx, times in script.cycle():
                await self.push_transaction(trx, times)
                await anyio.sleep(self.demo_interval)


def _names(value: object) -> list[str]:
    """EOSPark's comma-separated ``account``/``contract`` strings (nothing else)."""
    if not isinstance(value, str):
        return []
    return list(dict.fromkeys(n.strip() for n in value.split(",") if n.strip()))


class DemoScript:
    """Endless realistic traffic around one account: incoming transfers above and below
    100 EOS, outgoing ones, system actions, a fake-token transfer and a re-sent push."""

    SENDERS = ("alicewallet1", "bobtrader123", "carolminer55", "daveholder12")

    def __init__(self, account: str) -> None:
        self.account = account
        self.nonce = secrets.token_hex(8)  # new ids for every run: the demo's state persists
        self.block = 300_000_000 + random.randrange(1_000_000)
        self.seq = 40_000_000_000 + random.randrange(1_000_000)
        self.n = 0

    def _trx(self, *actions: dict[str, Any]) -> dict[str, Any]:
        self.block += random.randint(1, 4)
        self.seq += len(actions)
        trx_id = hashlib.sha256(f"{self.nonce}:{self.block}:{self.seq}".encode()).hexdigest()
        return transaction(actions, trx_id, self.block, global_action_seq=self.seq)

    def cycle(self) -> list[tuple[dict[str, Any], int]]:
        """One round of ~6 pushes; the first one is a transfer a demo rule alerts on."""
        self.n += 1
        me, n = self.account, self.n
        sender = self.SENDERS[n % len(self.SENDERS)]
        big = f"{100 + (n * 37) % 900}.{n % 10000:04d} EOS"
        incoming = self._trx(transfer(sender, me, big, f"invoice #{1000 + n}"))
        rounds: list[tuple[dict[str, Any], int]] = [
            (incoming, 2 if n % 4 == 2 else 1),  # now and then EOSPark sends a push twice
            (self._trx(transfer(me, "binancecold1", f"{n % 50 + 1}.5000 EOS", "deposit")), 1),
            (self._trx(transfer("smallfry1234", me, f"{n % 99}.2500 EOS", "tip")), 1),
            (
                self._trx(
                    action(
                        "eosio",
                        "delegatebw",
                        me,
                        {
                            "from": me,
                            "receiver": me,
                            "stake_net_quantity": "1.0000 EOS",
                            "stake_cpu_quantity": "150.0000 EOS",
                            "transfer": 0,
                        },
                    )
                ),
                1,
            ),
            (
                self._trx(  # a look-alike token: same action, same args, another contract
                    transfer("scamairdrop1", me, "5000.0000 EOS", "claim", contract="eosiotoken12")
                ),
                1,
            ),
            (
                self._trx(
                    action(
                        "eosio", "buyrambytes", me, {"payer": me, "receiver": me, "bytes": 8192}
                    ),
                    transfer(me, "eosio.ram", "0.8000 EOS", "buy ram"),
                ),
                1,
            ),
        ]
        return rounds
