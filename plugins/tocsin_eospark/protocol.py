"""EOSPark's WebSocket protocol as pure functions: parse frames, build messages, normalize.

No I/O here (the client in ``source.py`` and the server in ``emulator.py`` are thin loops
around these functions), so everything can be tested, and fuzzed, without a socket.

Server frames all share one envelope, ``{"errno", "msg_type", "errmsg", "data"}``:
``heartbeat``, ``subscribe``/``unsubscribe`` acks, ``data`` pushes (one transaction each)
and ``auth`` refusals (403 bad key, 406 a second connection with the same key).
See PROTOCOLS.md section 1.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from hashlib import blake2b
from typing import Annotated, Any

import msgspec

from tocsin import parse_json

MAX_FRAME = 1024 * 1024
"""Largest frame accepted (bytes): a transaction push is a few KiB."""

MAX_ACCOUNTS = 5
MAX_CONTRACTS = 5
"""EOSPark's limits per connection (one connection per key, so per key too)."""

EVENT_TYPE = "action"

ERRNO_FORBIDDEN = 403
ERRNO_REPEAT_CONNECTION = 406

# An EOS name: up to 12 characters of a-z, 1-5 and '.', plus a 13th in a-j, 1-5.
_EOS_NAME = re.compile(r"[a-z1-5.]{1,12}[a-j1-5]?")
_ERRNO_TEXT = re.compile(r"-?[0-9]{1,9}")
_MAX_ID_LEN = 256
_MAX_TEXT = 200


def is_eos_name(value: str) -> bool:
    """Whether ``value`` is a valid EOS account, contract or action name."""
    return _EOS_NAME.fullmatch(value) is not None


# -- server -> client ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """``msg_type: heartbeat``; ``at`` is the server's local time (probably CST), as sent."""

    at: str


@dataclass(frozen=True, slots=True)
class Ack:
    """The answer to a (un)subscribe, legacy forms included; ``msg`` is the server's reason."""

    msg_type: str
    ok: bool
    msg: str


@dataclass(frozen=True, slots=True)
class Refusal:
    """A frame with a non-zero ``errno``: ``auth`` 403/406, or an error of another type."""

    errno: int
    msg_type: str
    errmsg: str

    @property
    def bad_key(self) -> bool:
        return self.errno == ERRNO_FORBIDDEN

    @property
    def repeat_connection(self) -> bool:
        return self.errno == ERRNO_REPEAT_CONNECTION


# Action and Transaction are msgspec structs: built in C, they cost less than a NamedTuple
# (a frozen dataclass's __init__, object.__setattr__ per field, was a tenth of the
# per-event CPU in make bench). gc=False: they hold decoded JSON, which cannot form a
# reference cycle, so the collector need not track them.
class Action(msgspec.Struct, frozen=True, gc=False):
    """One action of a pushed transaction, as the server gave it."""

    account: str
    name: str
    authorization: list[dict[str, Any]]
    data: Any  # the decoded args (an object), or whatever the server has when it has no ABI
    hex_data: str
    global_action_seq: int | None


class Transaction(msgspec.Struct, frozen=True, gc=False):
    """A ``data`` push: one transaction and its actions, in order."""

    trx_id: str
    block_num: int | None
    trx_timestamp: str
    global_action_seq: int | None
    actions: tuple[Action, ...]


@dataclass(frozen=True, slots=True)
class Other:
    """A well-formed frame of a type this client does not use (liveness only)."""

    msg_type: str


Message = Heartbeat | Ack | Refusal | Transaction | Other


def _text(value: object, limit: int = _MAX_TEXT) -> str:
    """A server-provided string made safe to log: printable and bounded."""
    text = value if isinstance(value, str) else "" if value is None else str(value)
    text = "".join(ch if ch.isprintable() else " " for ch in text[: limit * 2])
    return text[:limit]


def _int(value: object) -> int | None:
    """A non-negative integer from an int or a digit string, else None."""
    if type(value) is int:  # the common case first (bool is not int here)
        return value if value >= 0 else None
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if value >= 0 else None
    if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= 19:
        number = int(value)
        return number if number < 2**63 else None  # as the typed path: int64 at most
    return None


load_json = parse_json  # orjson, or ``ValueError("not JSON")``


# -- the typed path of data pushes -------------------------------------------------------
# Almost every frame is a data push. msgspec decodes one into these structs, checking the
# types as it goes, faster than orjson plus the checks below (timeit on make bench's
# frames: parse_frame 3.6 -> 2.4 us, the args included). It only ever accepts
# what the checked path accepts, and gives the same message: whatever it refuses
# (another msg_type, a tolerated variation such as an errno or a block_num as a string, a
# malformed push) goes through the checked path, which gives the reason. The action args
# stay raw and are read by ``parse_json``, as before: msgspec reads an integer beyond 64
# bits exactly, which the JSON encoder of the outbox cannot write; for the same reason
# the integers it reads itself are bounded (to int64: msgspec takes no wider bound). Args
# of scalars only are the exception (below): read in the same pass, int64 at most.

_UINT = Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]
_ARG = str | Annotated[int, msgspec.Meta(ge=-(2**63), le=2**63 - 1)] | bool | None
"""An action arg the first decoder reads itself: a string, an int64, a bool or null (a
transfer's args are all strings)."""


def _push_decoder(args: Any, default: Any) -> tuple[msgspec.json.Decoder[Any], type]:
    """A decoder of data pushes whose actions' ``data`` (the args) is read as ``args``, and
    the type it gives the push's ``data`` (the transaction)."""
    action = msgspec.defstruct(
        "_PushAction",
        [
            ("account", str),
            ("name", str),
            ("authorization", list[dict[str, str]] | None, None),
            ("data", args, default),
            ("hex_data", str, ""),
            ("global_action_seq", _UINT | None, None),
        ],
    )
    data = msgspec.defstruct(
        "_PushData",
        [
            ("trx_id", str),
            ("actions", list[action]),  # type: ignore[valid-type]
            ("block_num", _UINT | None, None),
            ("trx_timestamp", str, ""),
            ("global_action_seq", _UINT | None, None),
        ],
    )
    push = msgspec.defstruct("_Push", [("msg_type", str), ("data", data), ("errno", int, 0)])
    return msgspec.json.Decoder(push), data


# Args of scalars only are read in the same pass (a transfer's: 3.0 against 4.5 us for
# the whole frame, timeit on make bench's frames); any other args (a list, an object, a
# float, an integer beyond int64) make it decline, and the second decoder keeps them raw.
_PUSH_SCALAR_ARGS, PushData = _push_decoder(dict[str, _ARG] | None, None)
_PUSH, _ = _push_decoder(msgspec.Raw, msgspec.Raw(b"null"))


def _decoded_push(raw: str | bytes) -> tuple[Any, bool] | None:
    """The transaction of a well-formed data push as decoded, and whether its actions'
    args are still raw; None to take the checked path."""
    try:
        push = _PUSH_SCALAR_ARGS.decode(raw)
        raw_args = False
    except (msgspec.DecodeError, RecursionError):  # ValidationError included; absurd nesting
        try:
            push = _PUSH.decode(raw)
        except (msgspec.DecodeError, RecursionError):
            return None
        raw_args = True
    trx = push.data
    trx_id = trx.trx_id
    if push.msg_type != "data" or push.errno != 0 or not trx_id or len(trx_id) > _MAX_ID_LEN:
        return None
    for a in trx.actions:
        if not a.account or not a.name:
            return None
    return trx, raw_args


def _typed_transaction(trx: Any, raw_args: bool) -> Transaction:
    actions = tuple(
        Action(
            a.account,
            a.name,
            [] if a.authorization is None else a.authorization,
            parse_json(bytes(a.data)) if raw_args else a.data,
            a.hex_data,
            a.global_action_seq,
        )
        for a in trx.actions
    )
    return Transaction(
        trx.trx_id, trx.block_num, trx.trx_timestamp[:64], trx.global_action_seq, actions
    )


def _typed_push(raw: str | bytes) -> Transaction | None:
    """A well-formed data push as the checked path reads it, or None to take that path."""
    decoded = _decoded_push(raw)
    return None if decoded is None else _typed_transaction(*decoded)


def parse_frame(raw: str | bytes) -> Message:
    """One server frame as a message, or ``ValueError`` with a short fixed reason.

    The reason never quotes the frame: it is used as a reject label.
    """
    msg = read_frame(raw)
    return _typed_transaction(msg, False) if type(msg) is PushData else msg


def read_frame(raw: str | bytes) -> Message | Any:
    """``parse_frame`` for the live loop, which takes every frame: a data push whose args
    the first decoder read (a transfer's) comes as that decoder's ``PushData``, not as a
    ``Transaction`` built from it (``action_parts`` reads both; 0.45 us a frame saved)."""
    if len(raw) > MAX_FRAME:
        raise ValueError("oversized frame")
    decoded = _decoded_push(raw)
    if decoded is None:
        return checked_frame(raw)
    trx, raw_args = decoded
    return _typed_transaction(trx, raw_args) if raw_args else trx


def checked_frame(raw: str | bytes) -> Message:
    """``parse_frame`` without the typed path of data pushes (what that path must agree with)."""
    frame = parse_json(raw)
    if not isinstance(frame, dict):
        raise ValueError("not a JSON object")
    msg_type = frame.get("msg_type")
    if not isinstance(msg_type, str) or not msg_type:
        raise ValueError("no msg_type")
    errno = frame.get("errno", 0)
    if isinstance(errno, str) and _ERRNO_TEXT.fullmatch(errno.strip()):
        errno = int(errno.strip())  # tolerate "403"
    if isinstance(errno, bool) or not isinstance(errno, int):
        raise ValueError("bad errno")
    if errno != 0:
        return Refusal(errno, _text(msg_type, 40), _text(frame.get("errmsg")))
    data = frame.get("data")
    if msg_type == "heartbeat":
        beat = data.get("heart_beat") if isinstance(data, dict) else None
        return Heartbeat(_text(beat, 40))
    if msg_type == "data":
        return _transaction(data)
    if msg_type.startswith(("subscribe", "unsubscribe")):
        return _ack(msg_type, data)
    return Other(_text(msg_type, 40))


def _ack(msg_type: str, data: object) -> Ack:
    # The seed's unsubscribe example says "subscribe", its field table "unsubscribe":
    # accept either key; with neither, errno 0 means it worked.
    if data is None:
        return Ack(_text(msg_type, 40), True, "")
    if not isinstance(data, dict):
        raise ValueError("malformed ack")
    ok = data.get("subscribe", data.get("unsubscribe", True))
    if not isinstance(ok, bool):
        raise ValueError("malformed ack")
    return Ack(_text(msg_type, 40), ok, _text(data.get("msg")))


def _transaction(data: object) -> Transaction:
    if not isinstance(data, dict):
        raise ValueError("data push without a transaction")
    trx_id = data.get("trx_id")
    if not isinstance(trx_id, str) or not trx_id or len(trx_id) > _MAX_ID_LEN:
        raise ValueError("data push without a trx_id")
    actions = data.get("actions")
    if not isinstance(actions, list):
        raise ValueError("data push without actions")
    block_num = data.get("block_num")
    if block_num is not None and (block_num := _int(block_num)) is None:
        raise ValueError("bad block_num")
    timestamp = data.get("trx_timestamp", "")
    if not isinstance(timestamp, str):
        raise ValueError("bad trx_timestamp")
    return Transaction(
        trx_id,
        block_num,
        timestamp[:64],
        _int(data.get("global_action_seq")),
        tuple([_action(a) for a in actions]),
    )


def _action(raw: object) -> Action:
    if not isinstance(raw, dict):
        raise ValueError("malformed action")
    account, name = raw.get("account"), raw.get("name")
    if not isinstance(account, str) or not account or not isinstance(name, str) or not name:
        raise ValueError("malformed action")
    authorization = raw.get("authorization", [])
    if authorization is None:
        authorization = []
    if not isinstance(authorization, list):
        raise ValueError("malformed action")
    for entry in authorization:
        if not isinstance(entry, dict):
            raise ValueError("malformed action")
    hex_data = raw.get("hex_data", "")
    if not isinstance(hex_data, str):
        raise ValueError("malformed action")
    return Action(
        account, name, authorization, raw.get("data"), hex_data, _int(raw.get("global_action_seq"))
    )


# -- normalization ---------------------------------------------------------------------


def action_id(trx_id: str, action_index: int) -> str:
    """An action is its transaction and its place in it: stable across re-sends.

    ``stable_id("eospark", trx_id, action_index)``, spelt out: it runs for every action.
    """
    text = f"eospark\x1f{trx_id}\x1f{action_index}\x1f"
    return blake2b(text.encode(), digest_size=16).hexdigest()


@functools.lru_cache(maxsize=1024)  # every action of a block shares its timestamp
def event_time(trx_timestamp: str) -> str:
    """``"2018-11-06T06:30:50.000"`` (UTC, EOS block time) -> ``"2018-11-06T06:30:50.000Z"``.

    An empty or unreadable timestamp gives ``""`` (the event then takes receipt time).
    """
    try:
        moment = datetime.fromisoformat(trx_timestamp.strip())
        if moment.tzinfo is None:  # EOS timestamps are UTC without a zone
            moment = moment.replace(tzinfo=UTC)
        moment = moment.astimezone(UTC)
    except (ValueError, OverflowError, OSError):
        return ""
    return (
        f"{moment.year:04d}-{moment.month:02d}-{moment.day:02d}T{moment.hour:02d}:"
        f"{moment.minute:02d}:{moment.second:02d}.{moment.microsecond // 1000:03d}Z"
    )


def action_parts(
    trx: Transaction | Any, sift: Callable[[str, dict[str, Any]], bool] | None = None
) -> list[tuple[int, str, dict[str, Any]]]:
    """``(index, time, data)`` of the ``action`` event of each action of ``trx`` (SPEC
    section 4; its id is ``action_id(trx.trx_id, index)``); ``source.transaction_events``
    builds the events. ``trx`` is a ``Transaction`` or ``read_frame``'s ``PushData``;
    with ``sift`` (``SourceContext.sift``), only the actions it keeps."""
    trx_id, block_num = trx.trx_id, trx.block_num
    trx_timestamp = trx.trx_timestamp[:64]  # as a Transaction has it
    time = event_time(trx_timestamp)
    out = []
    for index, action in enumerate(trx.actions):
        authorization = action.authorization
        data: dict[str, Any] = {
            "contract": action.account,
            "action": action.name,
            "authorization": [] if authorization is None else authorization,
            "args": action.data,
            "hex_data": action.hex_data,
            "trx_id": trx_id,
            "block_num": block_num,
            "trx_timestamp": trx_timestamp,
            "action_index": index,
        }
        # Seen on the transaction in real pushes; an action's own value is more precise.
        seq = action.global_action_seq
        if seq is None:
            seq = trx.global_action_seq
        if seq is not None:
            data["global_action_seq"] = seq
        if sift is None or sift(EVENT_TYPE, data):
            out.append((index, time, data))
    return out


# -- client -> server ------------------------------------------------------------------


def subscribe_message(accounts: Sequence[str], contracts: Sequence[str], action: str = "") -> str:
    """Subscribe to ``action`` ("" = all) of ``contracts`` involving ``accounts``."""
    return json.dumps(
        {
            "msg_type": "subscribe",
            "account": ",".join(accounts),
            "contract": ",".join(contracts),
            "action_name": action,
        }
    )


def unsubscribe_message(account: str, contract: str, action: str = "") -> str:
    """Unsubscribe one account+contract pair (``action`` "" removes the whole pair)."""
    return json.dumps(
        {"msg_type": "unsubscribe", "account": account, "contract": contract, "action_name": action}
    )


def legacy_message(msg_type: str, name: str) -> str:
    """The legacy ``subscribe_account``/``subscribe_contract``/``unsubscribe_account`` form."""
    return json.dumps({"msg_type": msg_type, "name": name})


# -- server side (the emulator) --------------------------------------------------------


def envelope(msg_type: str, data: object = None, errno: int = 0, errmsg: str = "") -> str:
    """A server frame in EOSPark's envelope; ``data`` is left out when None (auth errors)."""
    frame: dict[str, Any] = {"errno": errno, "msg_type": msg_type, "errmsg": errmsg}
    if data is not None:
        frame["data"] = data
    return json.dumps(frame)


def refusal_frame(errno: int) -> str:
    """The seed's ``auth`` refusals: 403 Forbidden, 406 No repeat connection."""
    errmsg = "Forbidden" if errno == ERRNO_FORBIDDEN else "No repeat connection."
    return envelope("auth", errno=errno, errmsg=errmsg)


def heartbeat_frame(at: str) -> str:
    return envelope("heartbeat", {"heart_beat": at})


def ack_frame(msg_type: str, ok: bool, msg: str) -> str:
    return envelope(msg_type, {"subscribe": ok, "msg": msg})


def data_frame(trx: Mapping[str, Any]) -> str:
    return envelope("data", dict(trx))


def split_names(value: object) -> list[str]:
    """``"a1, a2"`` or ``["a1", "a2"]`` -> ``["a1", "a2"]`` (order kept, no repeats)."""
    parts: Iterable[object]
    if isinstance(value, str):
        parts = value.split(",")
    elif isinstance(value, list):
        parts = [
            p for item in value for p in (item.split(",") if isinstance(item, str) else [item])
        ]
    else:
        raise ValueError("expected a string or a list of strings")
    names: list[str] = []
    for part in parts:
        if not isinstance(part, str):
            raise ValueError("expected a string or a list of strings")
        name = part.strip()
        if name and name not in names:
            names.append(name)
    return names
