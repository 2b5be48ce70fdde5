"""A local go-vite node: JSON-RPC 2.0 over WebSocket, PROTOCOLS.md section 3.

- ``subscribe_subscribe`` with the current topic names (``newSnapshotBlock``...), the
  seed's ``create...Subscription`` names and the legacy v1 ones (``newLogs``...), each
  answered with a go-vite style id (``0x`` + hex, leading zeros trimmed); events are
  pushed only after the id was written, as go-vite activates a subscription;
- polling filters (``subscribe_new...Filter`` / ``create...Filter``),
  ``subscribe_getChangesByFilterId`` and ``subscribe_uninstallFilter``; filters belong to
  the node, not to a connection, and die ``filter_expiry`` to twice that after their last
  poll (go-vite sweeps every 5 minutes for filters idle 5 minutes);
- the ledger methods a client backfills with, ``ledger_getLatestSnapshotBlock`` and
  friends, with go-vite's ``null`` for empty lists and its argument-count errors;
- batch requests, ``subscribe_unsubscribe``, -32601 with go-vite's exact text.

``names`` picks the method spellings: ``"gvite"`` (default) is go-vite v2.14, which
answers the seed's ``subscribe_createVmlogFilter`` and ``ledger_getVmlogsByFilter`` with
-32601; ``"seed"`` knows only the seed's names; ``"both"`` knows everything.

Tests drive it with ``produce_snapshots``, ``produce_account_block``, ``produce_vmlog``,
``receive``, ``rollback_snapshots``, ``rollback_account``, ``expire_filters``,
``drop_connections``, ``push_raw``, ``fail`` and ``absent``, and read ``connections``,
``received`` and ``subscriptions``.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import anyio
import orjson
from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed

from tocsin import WebSocketEmulator

from .chain import (
    AccountBlock,
    Chain,
    Change,
    SnapshotBlock,
    VmLog,
    change_payload,
    log_of,
    matches,
    rpc_account_block,
    rpc_snapshot_block,
    rpc_vmlog,
)
from .protocol import (
    CALLBACK_ERROR,
    INVALID_PARAMS,
    INVALID_REQUEST,
    MAX_PAGE,
    METHOD_NOT_FOUND,
    PARSE_ERROR,
    dumps,
    error_frame,
    height,
    make_address,
    method_missing,
    new_id,
    notification_frame,
    result_frame,
    topic_hash,
    vite_address,
)

Names = Literal["gvite", "seed", "both"]
Handler = Callable[[list[Any]], Any]

MAX_REQUEST = 128 * 1024  # go-vite's maxRequestContentLength
DEMO_CONTRACT = make_address("tocsin demo contract", contract=True)
DEMO_USER = make_address("tocsin demo user")
# keccak-style signature hash of a Transfer event, and the demo's fixed topics [made up].
TRANSFER_TOPIC = "aa65281f5df4b4bd3c71f2ba25905b907205fce0809a816ef8e04b4d496a85bb"

# subscribe_subscribe topic names -> (kind, payload version)
_PUSH_CURRENT = {
    "newSnapshotBlock": ("snapshot", 2),
    "newAccountBlock": ("account", 2),
    "newAccountBlockByAddress": ("account_by_address", 2),
    "newUnreceivedBlockByAddress": ("unreceived", 2),
    "newVmLog": ("vmlog", 2),
}
_PUSH_SEED = {  # deprecated in go-vite but still served; the only ones the seed names
    "createSnapshotBlockSubscription": ("snapshot", 2),
    "createAccountBlockSubscription": ("account", 2),
    "createAccountBlockSubscriptionByAddress": ("account_by_address", 2),
    "createUnreceivedBlockSubscriptionByAddress": ("unreceived", 2),
    "createVmlogSubscription": ("vmlog", 2),
}
_PUSH_V1 = {
    "newSnapshotBlocks": ("snapshot", 1),
    "newAccountBlocks": ("account", 1),
    "newAccountBlocksByAddr": ("account_by_address", 1),
    "newOnroadBlocksByAddr": ("unreceived", 1),
    "newLogs": ("vmlog", 1),
}
_FILTER_CURRENT = {f"subscribe_{name}Filter": kind for name, kind in _PUSH_CURRENT.items()}
_FILTER_DEPRECATED = {
    "subscribe_createSnapshotBlockFilter": ("snapshot", 2),
    "subscribe_createAccountBlockFilter": ("account", 2),
    "subscribe_createAccountBlockFilterByAddress": ("account_by_address", 2),
    "subscribe_createUnreceivedBlockFilterByAddress": ("unreceived", 2),
}
_FILTER_REAL_VMLOG = {"subscribe_createVmLogFilter": ("vmlog", 2)}  # go-vite's spelling
_FILTER_SEED_VMLOG = {"subscribe_createVmlogFilter": ("vmlog", 2)}  # the seed's spelling
_FILTER_V1 = {f"subscribe_{name}Filter": kind for name, kind in _PUSH_V1.items()}


@dataclass(eq=False)
class Sub:
    """A push subscription or a filter: what it watches and how its items look."""

    id: str
    kind: str
    version: int
    address: str = ""
    ranges: dict[str, tuple[int, int]] = field(default_factory=dict)
    topics: list[list[str]] = field(default_factory=list)

    def wants(self, change: Change) -> bool:
        return matches(self.kind, self.address, self.ranges, self.topics, change)

    def payload(self, change: Change) -> dict[str, Any]:
        return change_payload(change, self.kind, self.version)


@dataclass(eq=False)
class Filter:
    sub: Sub
    buffer: list[dict[str, Any]] = field(default_factory=list)
    last_poll: float = field(default_factory=time.monotonic)


@dataclass(eq=False)
class Client:
    ws: ServerConnection
    subs: dict[str, Sub] = field(default_factory=dict)


class RpcFailure(Exception):
    """An error answer: ``code`` and go-vite's ``message``."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class ViteEmulator(WebSocketEmulator):
    """A local go-vite node (WS JSON-RPC) with control methods for tests and the demo."""

    name = "vite"
    path = "/gvite/ws"  # like the public nodes' proxy; go-vite itself ignores the path

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        names: Names = "gvite",
        filter_expiry: float = 300.0,
        sweep_interval: float | None = None,
        demo_interval: float = 1.0,
    ) -> None:
        super().__init__(host, port)
        self.names = names
        self.filter_expiry = filter_expiry
        self.sweep_interval = filter_expiry if sweep_interval is None else sweep_interval
        self.demo_interval = demo_interval
        self.chain = Chain()
        self.clients: set[Client] = set()
        self.filters: dict[str, Filter] = {}
        self.connections = 0  # connections accepted, ever
        self.received: list[Any] = []  # every request object (batch items one by one)
        self.pushed = 0  # notifications sent
        self.failing: dict[str, tuple[int | None, int, str]] = {}  # method -> (times, code, msg)
        self.losing: dict[str, Callable[[Any], bool]] = {}  # method -> which answer to lose
        self.mangling: dict[str, Callable[[Any], Any]] = {}  # method -> what it answers instead
        self.absent: set[str] = set()  # methods that answer -32601
        self._last_sweep = time.monotonic()
        self._push, self._filters, self._vmlog_methods = _tables(names)
        self._ledger: dict[str, tuple[str, int, Handler]] = {
            "ledger_getLatestSnapshotBlock": ("GetLatestSnapshotBlock", 0, self._latest_snapshot),
            "ledger_getSnapshotChainHeight": ("GetSnapshotChainHeight", 0, self._snapshot_height),
            "ledger_getSnapshotBlocks": ("GetSnapshotBlocks", 2, self._snapshot_blocks),
            "ledger_getLatestAccountBlock": ("GetLatestAccountBlock", 1, self._latest_account),
            "ledger_getAccountBlocksByHeightRange": (
                "GetAccountBlocksByHeightRange",
                3,
                self._account_range,
            ),
            "ledger_getUnreceivedBlocksByAddress": (
                "GetUnreceivedBlocksByAddress",
                3,
                self._unreceived_page,
            ),
        }
        for method in self._vmlog_methods:
            self._ledger[method] = ("GetVmLogsByFilter", 1, self._vmlogs)

    def serve_options(self) -> dict[str, Any]:
        return {"max_size": MAX_REQUEST}

    # -- control -------------------------------------------------------------------------

    @property
    def subscriptions(self) -> int:
        """Push subscriptions active on open connections."""
        return sum(len(c.subs) for c in self.clients)

    async def produce_snapshots(self, count: int = 1) -> list[SnapshotBlock]:
        """Add ``count`` snapshot blocks, one notification each."""
        for _ in range(count):
            await self._publish(self.chain.add_snapshot())
        return self.chain.snapshots[-count:]

    async def produce_account_block(
        self, address: str, logs: Iterable[VmLog] = (), to: str = ""
    ) -> AccountBlock:
        """A block on ``address``'s chain (a send to ``to`` when given) with ``logs``."""
        block, changes = self.chain.add_account_block(address, logs, to)
        await self._publish(changes)
        return block

    async def produce_vmlog(
        self, address: str, topics: Sequence[str], payload: bytes | str = b""
    ) -> AccountBlock:
        """A block on ``address`` holding one log with ``topics`` and ``payload``."""
        return await self.produce_account_block(address, [log_of(topics, payload)])

    async def receive(self, address: str, send_hash: str) -> None:
        await self._publish(self.chain.receive(address, send_hash))

    async def rollback_snapshots(self, count: int = 1, readd: bool = False) -> list[str]:
        """Roll back the top ``count`` snapshot blocks (``removed: true``); with ``readd``
        the chain switches back: the same hashes are pushed again. Returns their hashes."""
        dropped, changes = self.chain.rollback_snapshots(count)
        await self._publish(changes)
        if readd:
            await self._publish(self.chain.readd_snapshots(dropped))
        return [b.hash for b in dropped]

    async def rollback_account(
        self, address: str, count: int = 1, readd: bool = False
    ) -> list[AccountBlock]:
        """Roll back the top ``count`` blocks of ``address`` (their logs and unreceived
        sends with them); with ``readd`` the same blocks come back."""
        dropped, changes = self.chain.rollback_account(address, count)
        await self._publish(changes)
        if readd:
            await self._publish(self.chain.readd_account(dropped))
        return dropped

    def expire_filters(self) -> None:
        """Every filter dies now, as if nobody had polled it for 10 minutes."""
        self.filters.clear()

    def fail(
        self, method: str, times: int | None = 1, code: int = CALLBACK_ERROR, message: str = ""
    ) -> None:
        """Answer the next ``times`` calls of ``method`` (all, with None) with an error."""
        self.failing[method] = (times, code, message or "leveldb: not found")

    def lose_answer(self, method: str, when: Callable[[Any], bool] = lambda result: True) -> None:
        """Carry out the next call of ``method`` whose result satisfies ``when``, but lose
        its answer: the connection is cut instead (a network failure mid-answer)."""
        self.losing[method] = when

    def mangle_answer(self, method: str, instead: Callable[[Any], Any]) -> None:
        """Carry out the next call of ``method`` whose result is not empty, but answer
        ``instead(result)`` (a malformed answer; what the call did stays done)."""
        self.mangling[method] = instead

    async def drop_connections(self, code: int = 1011) -> None:
        """Close every connection: their subscriptions die with them."""
        for client in list(self.clients):
            await client.ws.close(code, "dropped by the emulator")

    async def push_raw(self, frame: str | bytes) -> int:
        """Send ``frame`` as is to every client (malformed frames, odd shapes)."""
        sent = 0
        for client in list(self.clients):
            sent += await self._send(client, frame)
        return sent

    def requests(self, method: str) -> list[Any]:
        """The requests received for ``method``, in order."""
        return [r for r in self.received if isinstance(r, dict) and r.get("method") == method]

    # -- serving -------------------------------------------------------------------------

    async def handle(self, ws: ServerConnection) -> None:
        client = Client(ws)
        self.clients.add(client)
        self.connections += 1
        try:
            async for raw in ws:
                await self._on_frame(client, raw)
        except ConnectionClosed:
            pass
        finally:
            self.clients.discard(client)
            client.subs.clear()  # go-vite ends push subscriptions with the connection

    async def _send(self, client: Client, frame: str | bytes) -> bool:
        try:
            await client.ws.send(frame)
        except ConnectionClosed:
            return False
        return True

    async def _on_frame(self, client: Client, raw: str | bytes) -> None:
        try:
            frame = orjson.loads(raw)
        except orjson.JSONDecodeError:
            self.received.append(raw)
            await self._send(client, dumps(error_frame(None, PARSE_ERROR, "parse error")))
            return
        if isinstance(frame, list):
            if not frame:
                await self._send(client, dumps(error_frame(None, INVALID_REQUEST, "empty batch")))
                return
            answers = [self._call(client, item) for item in frame]
            replies = [reply for reply, _ in answers if reply is not None]
            if replies:
                await self._send(client, dumps(replies))
            for _, activate in answers:  # after the write, as go-vite's execBatch does
                if activate is not None:
                    activate()
            return
        reply, activate = self._call(client, frame)
        method = frame.get("method") if isinstance(frame, dict) else None
        lose = self.losing.get(method) if isinstance(method, str) else None
        if reply is not None and lose is not None and "result" in reply and lose(reply["result"]):
            del self.losing[frame["method"]]
            await client.ws.close(1011, "connection lost")
            return
        mangle = self.mangling.get(method) if isinstance(method, str) else None
        if reply is not None and mangle is not None and reply.get("result"):
            del self.mangling[method]  # type: ignore[arg-type]
            reply = {**reply, "result": mangle(reply["result"])}
        if reply is not None:
            await self._send(client, dumps(reply))
        if activate is not None:
            activate()

    def _call(
        self, client: Client, request: Any
    ) -> tuple[dict[str, Any] | None, Callable[[], None] | None]:
        """One request: its answer (None for a notification) and an activation to run
        after the answer is written (a new push subscription)."""
        self.received.append(request)
        if not isinstance(request, dict) or not isinstance(request.get("method"), str):
            rid = request.get("id") if isinstance(request, dict) else None
            return error_frame(rid, INVALID_REQUEST, "invalid request"), None
        rid, method = request.get("id"), request["method"]
        params = request.get("params")
        if params is None:
            params = []
        if not isinstance(params, list):
            return error_frame(rid, INVALID_PARAMS, "non-array args"), None
        activate: Callable[[], None] | None = None
        try:
            self._sweep()
            result, activate = self._dispatch(client, method, params)
        except RpcFailure as err:
            reply = error_frame(rid, err.code, err.message)
        else:
            reply = result_frame(rid, result)
        return (reply if "id" in request else None), activate

    def _dispatch(
        self, client: Client, method: str, params: list[Any]
    ) -> tuple[Any, Callable[[], None] | None]:
        if method in self.absent:
            raise RpcFailure(METHOD_NOT_FOUND, method_missing(method))
        if method in self.failing:
            times, code, message = self.failing[method]
            if times is not None:
                if times <= 1:
                    del self.failing[method]
                else:
                    self.failing[method] = (times - 1, code, message)
            raise RpcFailure(code, message)
        if method == "subscribe_subscribe":
            return self._subscribe(client, params)
        if method == "subscribe_unsubscribe":
            if not params or not isinstance(params[0], str):
                raise RpcFailure(INVALID_PARAMS, "Expected subscription id as first argument")
            if client.subs.pop(params[0], None) is None:
                raise RpcFailure(CALLBACK_ERROR, "subscription not found")
            return True, None
        if method in self._filters:
            kind, version = self._filters[method]
            sub = self._new_sub(kind, version, params, method)
            self.filters[sub.id] = Filter(sub)
            return sub.id, None
        if method in ("subscribe_getChangesByFilterId", "subscribe_getFilterChanges"):
            return self._changes(_arg(params, 0, str)), None
        if method == "subscribe_uninstallFilter":
            return self.filters.pop(_arg(params, 0, str), None) is not None, None
        if method in self._ledger:
            go_name, count, handler = self._ledger[method]
            if len(params) != count:
                raise RpcFailure(
                    INVALID_PARAMS,
                    f"{method.split('_')[0]}_{go_name} expects {count} parameters, got {len(params)}",
                )
            return handler(params), None
        raise RpcFailure(METHOD_NOT_FOUND, method_missing(method))

    def _subscribe(self, client: Client, params: list[Any]) -> tuple[Any, Callable[[], None]]:
        name = _arg(params, 0, str)
        if name not in self._push:
            raise RpcFailure(METHOD_NOT_FOUND, method_missing(f"subscribe_{name}"))
        kind, version = self._push[name]
        sub = self._new_sub(kind, version, params[1:], f"subscribe_{name}")

        def activate() -> None:
            if client in self.clients:
                client.subs[sub.id] = sub

        return sub.id, activate

    def _new_sub(self, kind: str, version: int, args: list[Any], method: str) -> Sub:
        sub = Sub(new_id(), kind, version)
        if kind in ("account_by_address", "unreceived"):
            sub.address = _address(_arg(args, 0, object))
        elif kind == "vmlog":
            sub.ranges, sub.topics = _filter_param(_arg(args, 0, object), version)
        return sub

    def _changes(self, filter_id: str) -> dict[str, Any]:
        found = self.filters.get(filter_id)
        if found is None:
            raise RpcFailure(CALLBACK_ERROR, "filter not found")
        found.last_poll = time.monotonic()
        items, found.buffer = found.buffer, []
        result: list[dict[str, Any]] | None = items
        seed = self.names == "seed"  # the seed: an empty poll "returns an empty array"
        if not items and not seed and (found.sub.kind == "account" or found.sub.version == 1):
            result = None  # a nil Go slice: AccountBlocksMsg and the v1 messages
        return {"result": result, "subscription": filter_id}

    def _sweep(self) -> None:
        now = time.monotonic()
        if now - self._last_sweep < self.sweep_interval:
            return
        self._last_sweep = now
        for fid, found in list(self.filters.items()):
            if now - found.last_poll >= self.filter_expiry:
                del self.filters[fid]

    async def _publish(self, changes: Sequence[Change]) -> None:
        for fil in self.filters.values():
            fil.buffer += [fil.sub.payload(c) for c in changes if fil.sub.wants(c)]
        for client in list(self.clients):
            for sub in list(client.subs.values()):
                items = [sub.payload(c) for c in changes if sub.wants(c)]
                if items and await self._send(client, dumps(notification_frame(sub.id, items))):
                    self.pushed += 1

    # -- the ledger ----------------------------------------------------------------------

    def _latest_snapshot(self, params: list[Any]) -> Any:
        return rpc_snapshot_block(self.chain.snapshots[-1])

    def _snapshot_height(self, params: list[Any]) -> Any:
        return str(self.chain.snapshot_height)

    def _snapshot_blocks(self, params: list[Any]) -> Any:
        top, count = _height(params[0]), _count(params[1])
        blocks = [rpc_snapshot_block(b) for b in self.chain.snapshot_blocks(top, count)]
        return blocks or None

    def _latest_account(self, params: list[Any]) -> Any:
        blocks = self.chain.accounts.get(_address(params[0]))
        return rpc_account_block(blocks[-1]) if blocks else None

    def _account_range(self, params: list[Any]) -> Any:
        address, start, end = _address(params[0]), _height(params[1]), _height(params[2])
        if end < start:
            raise RpcFailure(CALLBACK_ERROR, "start height must be less than end height")
        _count(end - start + 1)
        blocks = [rpc_account_block(b) for b in self.chain.account_blocks(address, start, end)]
        return blocks or None  # [inferred] nil when empty, like the other block lists

    def _unreceived_page(self, params: list[Any]) -> Any:
        address, index, count = _address(params[0]), _height(params[1]), _count(params[2])
        page = self.chain.unreceived_blocks(address)[index * count : (index + 1) * count]
        return [rpc_account_block(b) for b in page]

    def _vmlogs(self, params: list[Any]) -> Any:
        param = params[0]
        ranges, topics = _filter_param(param, 2)
        out = [
            rpc_vmlog(block, log)
            for address, (lo, hi) in ranges.items()
            for block, log in self.chain.vmlogs(address, lo, hi, topics)
        ]
        if isinstance(param, dict) and "pageSize" in param:  # newer nodes page [inferred]
            size, index = _count(param.get("pageSize")), _height(param.get("pageIndex", 0))
            out = out[index * size : (index + 1) * size]
        return out or None  # GetLogs returns a nil slice when nothing matched

    # -- demo ----------------------------------------------------------------------------

    def demo_source(self) -> dict[str, Any]:
        return {
            "plugin": "vite",
            "url": self.url,
            "subscriptions": [
                {"topic": "vmlog", "address": DEMO_CONTRACT},
                {"topic": "snapshot_block"},
            ],
        }

    async def demo_traffic(self) -> None:
        """A snapshot block every ``demo_interval``, a Transfer log on the demo contract
        every few blocks, and now and then a rollback pair of that log's block."""
        n = 0
        while True:
            n += 1
            await self.produce_snapshots()
            if n % 3 == 1:
                amount = (secrets.randbelow(2000) + 1) * 10**18
                to = make_address(f"demo recipient {n % 5}")
                payload = amount.to_bytes(32, "big")
                await self.produce_vmlog(
                    DEMO_CONTRACT, [TRANSFER_TOPIC, _topic_of(DEMO_USER), _topic_of(to)], payload
                )
            if n % 20 == 10:
                await self.rollback_account(DEMO_CONTRACT, readd=True)
            await anyio.sleep(self.demo_interval)


def _tables(
    names: Names,
) -> tuple[dict[str, tuple[str, int]], dict[str, tuple[str, int]], tuple[str, ...]]:
    """Push topic names, filter methods and vmlog ledger methods a node of ``names`` knows."""
    if names == "seed":
        filters = {**_FILTER_DEPRECATED, **_FILTER_SEED_VMLOG}
        return dict(_PUSH_SEED), filters, ("ledger_getVmlogsByFilter",)
    push = {**_PUSH_CURRENT, **_PUSH_SEED, **_PUSH_V1}
    filters = {**_FILTER_CURRENT, **_FILTER_DEPRECATED, **_FILTER_REAL_VMLOG, **_FILTER_V1}
    if names == "gvite":
        return push, filters, ("ledger_getVmLogsByFilter",)
    filters.update(_FILTER_SEED_VMLOG)
    return push, filters, ("ledger_getVmLogsByFilter", "ledger_getVmlogsByFilter")


def _topic_of(address: str) -> str:
    """An address as an indexed event argument: 32 bytes, left-padded [made-up layout]."""
    return address[5:45].rjust(64, "0")


def _arg(params: Sequence[Any], index: int, kind: type) -> Any:
    if len(params) <= index:
        raise RpcFailure(INVALID_PARAMS, f"missing value for required argument {index}")
    value = params[index]
    if kind is not object and not isinstance(value, kind):
        raise RpcFailure(INVALID_PARAMS, f"invalid argument {index}: wrong type")
    return value


def _address(value: Any) -> str:
    try:
        return vite_address(value)
    except ValueError:
        raise RpcFailure(INVALID_PARAMS, "invalid argument 0: error address format") from None


def _height(value: Any) -> int:
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # JSON numbers reach go-vite's parseHeight as float64
    try:
        return height(value)
    except ValueError:
        raise RpcFailure(INVALID_PARAMS, "invalid argument: bad height") from None


def _count(value: Any) -> int:
    count = _height(value)
    if count > MAX_PAGE:
        raise RpcFailure(CALLBACK_ERROR, f"count must be less than {MAX_PAGE}")
    return count


def _filter_param(param: Any, version: int) -> tuple[dict[str, tuple[int, int]], list[list[str]]]:
    """go-vite's ToFilterParam: the address ranges and topics, or its errors."""
    if not isinstance(param, dict):
        raise RpcFailure(INVALID_PARAMS, "invalid argument 0: expected an object")
    raw = param.get("addrRange" if version == 1 else "addressHeightRange")
    if not raw:
        raise RpcFailure(CALLBACK_ERROR, "addressHeightRange is nil")
    if not isinstance(raw, dict):
        raise RpcFailure(INVALID_PARAMS, "invalid argument 0: bad addressHeightRange")
    ranges: dict[str, tuple[int, int]] = {}
    for addr, span in raw.items():
        lo = hi = 0
        if span is not None:
            if not isinstance(span, dict):
                raise RpcFailure(INVALID_PARAMS, "invalid argument 0: bad height range")
            lo, hi = _height(span.get("fromHeight") or "0"), _height(span.get("toHeight") or "0")
            if hi < lo and hi != 0:
                raise RpcFailure(CALLBACK_ERROR, "to height < from height")
        ranges[_address(addr)] = (lo, hi)
    topics = param.get("topics") or []
    if not isinstance(topics, list) or not all(isinstance(t, list) for t in topics):
        raise RpcFailure(INVALID_PARAMS, "invalid argument 0: bad topics")
    try:
        return ranges, [[topic_hash(h) for h in options] for options in topics]
    except ValueError:
        raise RpcFailure(INVALID_PARAMS, "invalid argument 0: bad topic hash") from None
