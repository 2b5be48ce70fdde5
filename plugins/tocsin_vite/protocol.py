"""go-vite's JSON-RPC 2.0 subscriptions as pure functions: frames, messages, events, ids.

No I/O here: the client (``source.py``, ``rpc.py``, ``backfill.py``) and the server
(``emulator.py``) are thin loops around these functions, so all of it is tested, and
fuzzed, without a socket. See PROTOCOLS.md section 3 and the seed document.

Client -> server: requests ``{"jsonrpc":"2.0","id":n,"method":..,"params":[..]}``.
Server -> client: responses (``result`` or ``error``), possibly in a batch array, and
notifications ``{"method":"subscribe_subscription","params":{"subscription":id,"result":[..]}}``.

Tolerance, because servers are written independently from the same docs: heights as
strings or numbers, ``null`` where a list is expected, the legacy v1 payload fields
(``heightStr``, ``closed``, ``log``, ``accountHeight``, ``addr``) and the old ledger
spelling ``vmLog``, subscription ids of any length, unknown fields ignored.
"""

from __future__ import annotations

import base64
import hashlib
import re
import secrets
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from tocsin import stable_id, utc_iso

MAX_FRAME = 8 * 1024 * 1024
"""Largest frame accepted (bytes): a ledger page of 1000 account blocks is ~2 MiB."""

MAX_REQUEST = 128 * 1024
"""The largest request a node takes (go-vite's ``maxRequestContentLength``)."""
MAX_PAGE = 1000
"""go-vite refuses ledger pages over 1000 items ("count must be less than 1000")."""

# JSON-RPC error codes (go-vite rpc/errors.go).
PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
CALLBACK_ERROR = -32002  # "filter not found", "addressHeightRange is nil", ...
PANIC_ERROR = -32001
SHUTTING_DOWN = -32000

SUBSCRIBE = "subscribe_subscribe"
UNSUBSCRIBE = "subscribe_unsubscribe"
GET_CHANGES = "subscribe_getChangesByFilterId"
UNINSTALL_FILTER = "subscribe_uninstallFilter"
LATEST_SNAPSHOT = "ledger_getLatestSnapshotBlock"
SNAPSHOT_BLOCKS = "ledger_getSnapshotBlocks"  # (height, count): from height downwards
SNAPSHOT_HEIGHT = "ledger_getSnapshotChainHeight"
LATEST_ACCOUNT_BLOCK = "ledger_getLatestAccountBlock"  # (address)
ACCOUNT_BLOCKS_BY_RANGE = "ledger_getAccountBlocksByHeightRange"  # (address, start, end)
UNRECEIVED_BLOCKS = "ledger_getUnreceivedBlocksByAddress"  # (address, pageIndex, count)
VMLOGS_BY_FILTER = ("ledger_getVmLogsByFilter", "ledger_getVmlogsByFilter")
"""go-vite's real name first, then the seed's spelling (a v2.14 node answers -32601 to it)."""

EVENT_TYPES = ("snapshot_block", "account_block", "unreceived_block", "vmlog")

_HEX = re.compile(r"[0-9a-f]+")
_ADDRESS = re.compile(r"vite_[0-9a-f]{50}")
_MAX_ID = 200
_MAX_TEXT = 200
_MAX_TS = 253_402_300_799  # 9999-12-31: the last second utc_iso() can show


@dataclass(frozen=True, slots=True)
class Topic:
    """One kind of subscription: its event type and every name a server may know it by.

    ``push`` are ``subscribe_subscribe`` topic names and ``filters`` filter-creating
    methods, in the order a client tries them: go-vite's current names, then the seed's
    (deprecated in go-vite, but the only ones a server written from the seed knows).
    """

    key: str
    event_type: str
    push: tuple[str, ...]
    filters: tuple[str, ...]
    by_address: bool  # the subscription takes an address argument
    heights: bool  # items carry a height a client can resume from


SNAPSHOT = Topic(
    "snapshot_block",
    "snapshot_block",
    ("newSnapshotBlock", "createSnapshotBlockSubscription"),
    ("subscribe_newSnapshotBlockFilter", "subscribe_createSnapshotBlockFilter"),
    by_address=False,
    heights=True,
)
ACCOUNT = Topic(
    "account_block",
    "account_block",
    ("newAccountBlock", "createAccountBlockSubscription"),
    ("subscribe_newAccountBlockFilter", "subscribe_createAccountBlockFilter"),
    by_address=False,
    heights=False,  # {hash, removed}: nothing to resume from
)
ACCOUNT_BY_ADDRESS = Topic(
    "account_block_by_address",
    "account_block",
    ("newAccountBlockByAddress", "createAccountBlockSubscriptionByAddress"),
    ("subscribe_newAccountBlockByAddressFilter", "subscribe_createAccountBlockFilterByAddress"),
    by_address=True,
    heights=True,
)
UNRECEIVED = Topic(
    "unreceived_block",
    "unreceived_block",
    ("newUnreceivedBlockByAddress", "createUnreceivedBlockSubscriptionByAddress"),
    (
        "subscribe_newUnreceivedBlockByAddressFilter",
        "subscribe_createUnreceivedBlockFilterByAddress",
    ),
    by_address=True,
    heights=False,  # {hash, received, removed}
)
VMLOG = Topic(
    "vmlog",
    "vmlog",
    # The subscription really is "createVmlogSubscription" (lowercase l) in go-vite...
    ("newVmLog", "createVmlogSubscription"),
    # ...but the filter is CreateVmLogFilter -> "createVmLogFilter"; the seed (and
    # vite.js) write "createVmlogFilter", which a v2.14 node does not know.
    ("subscribe_newVmLogFilter", "subscribe_createVmLogFilter", "subscribe_createVmlogFilter"),
    by_address=False,  # takes a FilterParam naming the addresses
    heights=True,  # accountBlockHeight, per address
)
TOPICS = {t.key: t for t in (SNAPSHOT, ACCOUNT, ACCOUNT_BY_ADDRESS, UNRECEIVED, VMLOG)}


# -- addresses and hashes --------------------------------------------------------------


def address_checksum(body: bytes, contract: bool = False) -> str:
    """The 5-byte checksum of a Vite address: blake2b-40 of its 20 bytes.

    Contract addresses carry the checksum inverted [inferred from go-vite's types/address.go
    conventions; user addresses checked against the seed's examples].
    """
    digest = hashlib.blake2b(body, digest_size=5).digest()
    if contract:
        digest = bytes(b ^ 0xFF for b in digest)
    return digest.hex()


def vite_address(value: object) -> str:
    """``value`` as a Vite address (lowercased), else ``ValueError`` saying what is wrong."""
    if not isinstance(value, str):
        raise ValueError("a Vite address is a string")
    text = value.strip().lower()
    if not _ADDRESS.fullmatch(text):
        raise ValueError(
            f"{value[:60]!r} is not a Vite address (vite_ followed by 50 hex characters)"
        )
    body, checksum = bytes.fromhex(text[5:45]), text[45:]
    if checksum not in (address_checksum(body), address_checksum(body, contract=True)):
        raise ValueError(f"{text!r} is not a Vite address: its checksum does not match (a typo?)")
    return text


def make_address(seed: bytes | str, contract: bool = False) -> str:
    """A valid Vite address derived from ``seed`` (emulator and tests)."""
    raw = seed.encode() if isinstance(seed, str) else seed
    body = hashlib.blake2b(raw, digest_size=20).digest()
    return "vite_" + body.hex() + address_checksum(body, contract)


def topic_hash(value: object) -> str:
    """A vmlog topic: 64 hex characters (lowercased), else ``ValueError``."""
    if not isinstance(value, str):
        raise ValueError("a topic is a string of 64 hex characters")
    text = value.strip().lower()
    if len(text) != 64 or not _HEX.fullmatch(text):
        raise ValueError(f"{value[:80]!r} is not a topic hash (64 hex characters)")
    return text


def _hash(value: object, what: str = "hash") -> str:
    """A block hash as servers send it (hex, "0x" tolerated), lowercased, else ValueError."""
    if not isinstance(value, str):
        raise ValueError(f"no {what}")
    text = value.strip().lower()
    text = text.removeprefix("0x")
    if not 1 <= len(text) <= 128 or not _HEX.fullmatch(text):
        raise ValueError(f"bad {what}")
    return text


def height(value: object) -> int:
    """A height from an int or a decimal string (go-vite sends both), else ``ValueError``."""
    if isinstance(value, bool):
        raise ValueError("bad height")
    if isinstance(value, int) and 0 <= value < 2**64:
        return value
    if isinstance(value, str):
        text = value.strip()
        if text.isascii() and text.isdigit() and len(text) <= 20 and int(text) < 2**64:
            return int(text)
    raise ValueError("bad height")


def _optional_height(item: Mapping[str, Any], *keys: str) -> int | None:
    """The first of ``keys`` present (and not null) as a height; None if none is."""
    for key in keys:
        value = item.get(key)
        if value is not None and value != "":
            return height(value)
    return None


def _flag(value: object, what: str) -> bool:
    if value is None:
        return False
    if isinstance(value, bool):
        return value
    raise ValueError(f"bad {what}")


def _text(value: object, limit: int = _MAX_TEXT) -> str:
    """Server-chosen text made safe to log: printable and bounded."""
    text = value if isinstance(value, str) else "" if value is None else str(value)
    return "".join(ch if ch.isprintable() else " " for ch in text[: limit * 2])[:limit]


# -- server -> client frames -----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RpcError:
    """A JSON-RPC ``error`` object."""

    code: int
    message: str

    @property
    def method_missing(self) -> bool:
        """The server does not know the method or topic (-32601): try another spelling.

        Other servers may say so with another code; their text then decides.
        """
        if self.code == METHOD_NOT_FOUND:
            return True
        text = self.message.lower()
        return not self.filter_missing and ("does not exist" in text or "method not found" in text)

    @property
    def filter_missing(self) -> bool:
        """The filter expired or was never there (go-vite: -32002 "filter not found")."""
        return self.code != METHOD_NOT_FOUND and "filter not found" in self.message.lower()

    def __str__(self) -> str:
        return f"{self.message} ({self.code})"


@dataclass(frozen=True, slots=True)
class Response:
    """The answer to one request: ``error`` set, or ``result`` (which may be None)."""

    id: int | str | None
    result: Any
    error: RpcError | None


@dataclass(frozen=True, slots=True)
class Notification:
    """A push for subscription ``subscription``; ``result`` is always a list (null -> [])."""

    subscription: str
    result: list[Any]


@dataclass(frozen=True, slots=True)
class Other:
    """A well-formed frame this client has no use for (a server request, say)."""

    method: str


Message = Response | Notification | Other


def load_json(raw: str | bytes) -> Any:
    """``orjson.loads`` that raises only ``ValueError`` with a fixed message."""
    try:
        return orjson.loads(raw)
    except (ValueError, RecursionError):  # bad JSON, bad UTF-8, absurd nesting
        raise ValueError("not JSON") from None


def parse_frame(raw: str | bytes) -> list[Message]:
    """One server frame (an object or a batch array) as messages, or ``ValueError``.

    The reason never quotes the frame: it is used as a reject label.
    """
    if len(raw) > MAX_FRAME:
        raise ValueError("oversized frame")
    frame = load_json(raw)
    if isinstance(frame, list):
        if not frame:
            raise ValueError("empty batch")
        return [_message(item) for item in frame]
    return [_message(frame)]


def _message(obj: object) -> Message:
    if not isinstance(obj, dict):
        raise ValueError("not a JSON object")
    method = obj.get("method")
    if isinstance(method, str) and method:
        if method.endswith("_subscription"):
            return _notification(obj.get("params"))
        return Other(_text(method, 80))
    if "result" not in obj and "error" not in obj:
        raise ValueError("neither a response nor a notification")
    rid = obj.get("id")
    if isinstance(rid, bool) or not (rid is None or isinstance(rid, int | str)):
        raise ValueError("bad response id")
    if isinstance(rid, str) and len(rid) > _MAX_ID:
        raise ValueError("bad response id")
    error = obj.get("error")
    if error is not None:
        return Response(rid, None, _error(error))
    return Response(rid, obj.get("result"), None)


def _error(error: object) -> RpcError:
    if not isinstance(error, dict):
        raise ValueError("malformed error")
    code = error.get("code")
    if isinstance(code, str) and re.fullmatch(r"-?[0-9]{1,9}", code.strip()):
        code = int(code)
    if isinstance(code, bool) or not isinstance(code, int):
        raise ValueError("malformed error")
    return RpcError(code, _text(error.get("message")))


def _notification(params: object) -> Notification:
    if not isinstance(params, dict):
        raise ValueError("malformed notification")
    sub = params.get("subscription")
    if not isinstance(sub, str) or not sub or len(sub) > _MAX_ID:
        raise ValueError("notification without a subscription id")
    return Notification(sub, as_list(params.get("result"), "malformed notification"))


def as_list(value: object, reason: str = "expected a list") -> list[Any]:
    """A result list: ``null`` is ``[]`` (go-vite's nil slices), one object is ``[object]``."""
    if value is None:
        return []
    if isinstance(value, list):
        return value
    if isinstance(value, dict):
        return [value]
    raise ValueError(reason)


def created_id(result: object) -> str | None:
    """The id in the answer to ``subscribe_subscribe`` or a filter-creating call, or None
    when the answer holds none (a string of at most 200 characters: any length is fine)."""
    if isinstance(result, str) and result and len(result) <= _MAX_ID:
        return result
    return None


def poll_changes(result: object) -> list[Any]:
    """The items of a ``getChangesByFilterId`` answer ``{"result":[..],"subscription":id}``."""
    if isinstance(result, dict) and ("result" in result or "subscription" in result):
        return as_list(result.get("result"), "malformed poll answer")
    return as_list(result, "malformed poll answer")  # a bare list, or null


# -- normalization ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Fact:
    """What one result item becomes: an event's type, id, data, time and removed flag,
    plus the height a client's cursor follows and the address the item concerns."""

    type: str
    id: str
    data: dict[str, Any]
    removed: bool
    height: int | None
    address: str | None
    time: str = ""


def snapshot_id(block_hash: str) -> str:
    return stable_id("vite", "snapshot_block", block_hash)


def account_block_id(block_hash: str) -> str:
    """An account block is its hash, whichever topic (all accounts or one) reports it."""
    return stable_id("vite", "account_block", block_hash)


def unreceived_id(block_hash: str, received: bool) -> str:
    """New and received are two facts about one send block, each with its own id."""
    return stable_id("vite", "unreceived_block", block_hash, "received" if received else "new")


def vmlog_id(block_hash: str, topics: Sequence[str], log_data: str, occurrence: int = 0) -> str:
    """A log is its account block, topics and data; ``occurrence`` numbers identical logs
    of one block (0 for the first, which is all there ever is in practice)."""
    parts: list[object] = ["vite", "vmlog", block_hash, ",".join(topics), log_data]
    if occurrence:
        parts.append(occurrence)
    return stable_id(*parts)


def _time(item: Mapping[str, Any]) -> str:
    """The item's ``timestamp`` (ledger blocks: unix seconds) as ISO UTC, else ``""``."""
    ts = item.get("timestamp")
    if isinstance(ts, bool) or not isinstance(ts, int) or not 0 < ts <= _MAX_TS:
        return ""
    return utc_iso(ts)


def normalize(topic: Topic, item: object, address: str | None = None) -> Fact:
    """One result item (pushed, polled or from a ledger call) as a fact, else ValueError.

    ``address`` is the subscription's address for the by-address topics (their items do
    not carry it). A vmlog's occurrence number is 0; ``normalize_items`` sets it.
    """
    if not isinstance(item, dict):
        raise ValueError("result item is not an object")
    removed = _flag(item.get("removed"), "removed flag")
    if topic is VMLOG:
        return _vmlog(item, removed, 0)
    block_hash = _hash(item.get("hash"))
    time = _time(item)
    if topic is SNAPSHOT:
        # v1 payloads: "height" is a number and "heightStr" the same as text.
        h = _optional_height(item, "heightStr", "height")
        if h is None:
            raise ValueError("snapshot block without a height")
        data: dict[str, Any] = {"hash": block_hash, "height": h}
        return Fact(topic.event_type, snapshot_id(block_hash), data, removed, h, None, time)
    if topic is UNRECEIVED:
        received = _flag(item.get("received", item.get("closed")), "received flag")
        data = {"hash": block_hash, "received": received}
        if address is not None:
            data["address"] = address
        fact_id = unreceived_id(block_hash, received)
        return Fact(topic.event_type, fact_id, data, removed, None, address, time)
    h = _optional_height(item, "heightStr", "height")
    if topic is ACCOUNT_BY_ADDRESS and h is None:
        raise ValueError("account block without a height")
    data = {"hash": block_hash}
    if h is not None:
        data["height"] = h
    if address is not None:
        data["address"] = address
    return Fact(topic.event_type, account_block_id(block_hash), data, removed, h, address, time)


def _vmlog(item: Mapping[str, Any], removed: bool, occurrence: int) -> Fact:
    log = item.get("vmlog", item.get("vmLog", item.get("log")))  # v2, old ledger, v1
    if not isinstance(log, dict):
        raise ValueError("vmlog without a log")
    topics = log.get("topics")
    if topics is None:
        topics = []
    if not isinstance(topics, list) or len(topics) > 64:
        raise ValueError("bad vmlog topics")
    topics = [_hash(t, "topic") for t in topics]
    log_data = log.get("data")
    if log_data is None:
        log_data = ""  # Go's nil []byte
    if not isinstance(log_data, str):
        raise ValueError("bad vmlog data")
    block_hash = _hash(item.get("accountBlockHash"), "account block hash")
    h = _optional_height(item, "accountBlockHeight", "accountHeight")
    if h is None:
        raise ValueError("vmlog without an account block height")
    try:
        address = vite_address(item.get("address", item.get("addr")))
    except ValueError:
        raise ValueError("vmlog without a Vite address") from None
    data = {
        "address": address,
        "account_block_hash": block_hash,
        "account_block_height": h,
        "topics": topics,
        "log_data": log_data,
    }
    fact_id = vmlog_id(block_hash, topics, log_data, occurrence)
    return Fact("vmlog", fact_id, data, removed, h, address)


def normalize_items(
    topic: Topic, items: Iterable[object], address: str | None = None
) -> tuple[list[Fact], list[str]]:
    """Every item of one result list as facts, and the reject reasons of those that failed.

    Identical logs (same block, topics and data) in one list get occurrence numbers
    1, 2, ... after the first, so two of them in one block do not share an id. go-vite
    sends all logs of a block in one notification and a ledger page holds whole blocks,
    so the numbering is the same whichever path delivers them.
    """
    facts: list[Fact] = []
    rejects: list[str] = []
    seen: dict[tuple[str, bool], int] = {}
    for item in items:
        try:
            fact = normalize(topic, item, address)
        except ValueError as err:
            rejects.append(f"malformed {topic.event_type} item: {err}")
            continue
        if topic is VMLOG:
            n = seen.get((fact.id, fact.removed), 0)
            seen[(fact.id, fact.removed)] = n + 1
            if n and isinstance(item, dict):  # (it is: it normalized)
                fact = _vmlog(item, fact.removed, n)
        facts.append(fact)
    return facts, rejects


def latest_height(result: object) -> int:
    """The height in a ``getLatest...`` answer: a block object, a bare number, or null (0).

    go-vite answers ``getLatestAccountBlock`` of an account with no blocks with null.
    """
    if result is None:
        return 0
    if isinstance(result, dict):
        h = _optional_height(result, "height", "heightStr")
        if h is None:
            raise ValueError("latest block without a height")
        return h
    return height(result)


# -- client -> server ------------------------------------------------------------------


def request(rid: int, method: str, params: Sequence[Any] = ()) -> bytes:
    """One JSON-RPC request frame."""
    return orjson.dumps({"jsonrpc": "2.0", "id": rid, "method": method, "params": list(params)})


def vmlog_request_size(addresses: Sequence[str], topics: Sequence[Sequence[str]] = ()) -> int:
    """The bytes of the largest request a vmlog subscription of ``addresses`` makes (its
    subscribe or filter-creating call: every address in one FilterParam)."""
    param = filter_param({a: (0, 0) for a in addresses}, topics)
    calls = [(SUBSCRIBE, [name, param]) for name in VMLOG.push]
    calls += [(method, [param]) for method in VMLOG.filters]
    return max(len(request(2**31, method, params)) for method, params in calls)


def filter_param(
    ranges: Mapping[str, tuple[int, int]], topics: Sequence[Sequence[str]] = ()
) -> dict[str, Any]:
    """A FilterParam: per address a height range (0 = open), and the topic prefixes."""
    param: dict[str, Any] = {
        "addressHeightRange": {
            addr: {"fromHeight": str(lo), "toHeight": str(hi)} for addr, (lo, hi) in ranges.items()
        }
    }
    if topics:
        param["topics"] = [list(t) for t in topics]
    return param


# -- server side (the emulator) --------------------------------------------------------


def new_id() -> str:
    """A subscription or filter id as go-vite makes it: "0x" + 16 random bytes in hex with
    the leading zeros trimmed (rpc/utils.go), so it may be shorter than 34 characters."""
    text = secrets.token_bytes(16).hex().lstrip("0") or "0"
    return "0x" + text


def result_frame(rid: Any, result: Any) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": rid, "result": result}


def error_frame(rid: Any, code: int, message: str) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": rid, "error": {"code": code, "message": message}}


def notification_frame(subscription: str, result: list[Any]) -> dict[str, Any]:
    return {
        "jsonrpc": "2.0",
        "method": "subscribe_subscription",
        "params": {"subscription": subscription, "result": result},
    }


def method_missing(method: str) -> str:
    """go-vite's -32601 text (rpc/errors.go ``methodNotFoundError``)."""
    return f"The method {method} does not exist/is not available"


def dumps(obj: Any) -> str:
    return orjson.dumps(obj).decode()


def log_data(payload: bytes) -> str:
    """Log data as go-vite sends it: base64 of the raw bytes."""
    return base64.b64encode(payload).decode()
