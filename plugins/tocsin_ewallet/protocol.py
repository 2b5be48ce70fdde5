"""The OmiseGO eWallet websocket protocol as pure functions: no I/O, testable without a socket.

eWallet runs Phoenix 1.3 with its own serializer (PROTOCOLS.md sections 4 and 6):

- the client sends JSON objects ``{"topic", "event", "ref", "data"}``;
- the server sends JSON objects with exactly ``success``, ``version``, ``data``, ``error``,
  ``topic``, ``event`` and ``ref``; broadcasts carry ``ref: null``, replies echo the ref
  with the JSON type the client sent (string or number).

A stock Phoenix V1 reply (``payload: {status, response}``) is read too, so the client
also works behind a server that kept Phoenix's own serializer.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

from tocsin import parse_json, stable_id, utc_iso

ACCEPT = "application/vnd.omisego.v1+json"
CLIENT_PATH = "/api/client/socket"
ADMIN_PATH = "/api/admin/socket"
PHOENIX_TOPIC = "phoenix"

# The channel prefixes both sockets route (PROTOCOLS.md section 4, "Channels").
TOPIC_PREFIXES = ("user", "address", "account", "transaction_request", "transaction_consumption")

REQUEST_EVENT = "transaction_consumption_request"
FINALIZED_EVENT = "transaction_consumption_finalized"
CONSUMPTION_EVENTS = (REQUEST_EVENT, FINALIZED_EVENT)

# Scheme names of the Authorization header.
CLIENT_SCHEME = "OMGClient"
PROVIDER_SCHEME = "OMGProvider"

Ref = str | int | None


# -- addresses and credentials ---------------------------------------------------------


def socket_kind(url: str) -> str:
    """``"client"`` or ``"admin"`` for a socket URL; ``ValueError`` saying what is wrong."""
    parts = urlsplit(url)
    if parts.scheme not in ("ws", "wss"):
        raise ValueError("expected a ws:// or wss:// URL")
    if not parts.hostname:
        raise ValueError("the URL has no host")
    if parts.query or parts.fragment:
        # Credentials never go in the URL: websockets logs the request line at debug.
        raise ValueError(
            "the URL takes no query string: credentials go in api_key/auth_token"
            " or access_key/secret_key"
        )
    if parts.path.endswith(CLIENT_PATH):
        return "client"
    if parts.path.endswith(ADMIN_PATH):
        return "admin"
    raise ValueError(f"the URL must end with {CLIENT_PATH} or {ADMIN_PATH}")


def check_topic(topic: str) -> str:
    """``topic`` if it is a channel the eWallet sockets route, else ``ValueError``."""
    prefix, sep, rest = topic.partition(":")
    if not sep or prefix not in TOPIC_PREFIXES:
        choices = ", ".join(f"{p}:ID" for p in TOPIC_PREFIXES)
        raise ValueError(f"{topic!r} is not an eWallet channel: expected one of {choices}")
    if not rest or rest != rest.strip() or any(c.isspace() for c in rest):
        raise ValueError(f"{topic!r}: the channel needs an id after {prefix!r}: (no spaces)")
    return topic


def authorization(scheme: str, user: str, password: str) -> str:
    """The ``Authorization`` value: ``"<scheme> base64(user:password)"``."""
    token = base64.b64encode(f"{user}:{password}".encode()).decode("ascii")
    return f"{scheme} {token}"


def upgrade_headers(authorization_value: str) -> dict[str, str]:
    """The headers of the upgrade request; the server wants this exact ``Accept``."""
    return {"Authorization": authorization_value, "Accept": ACCEPT}


# -- client messages -------------------------------------------------------------------


def client_message(topic: str, event: str, ref: Ref, data: dict[str, Any] | None = None) -> str:
    """One client frame. eWallet reads ``data`` (not Phoenix's ``payload``) and needs ``ref``."""
    return json.dumps({"topic": topic, "event": event, "ref": ref, "data": data or {}})


def join_message(topic: str, ref: str) -> str:
    return client_message(topic, "phx_join", ref)


def leave_message(topic: str, ref: str) -> str:
    return client_message(topic, "phx_leave", ref)


def heartbeat_message(ref: str) -> str:
    return client_message(PHOENIX_TOPIC, "heartbeat", ref)


def ref_key(ref: Ref) -> str | None:
    """A ref as the client compares it: the server may echo ``"3"`` or ``3``."""
    return None if ref is None else str(ref)


def server_frame(
    topic: str, event: str, ref: Ref, *, success: bool = True, data: Any = None, error: Any = None
) -> str:
    """A server frame, exactly as eWallet's response serializer writes it (for the emulator)."""
    return json.dumps(
        {
            "success": success,
            "version": "1",
            "data": data,
            "error": error,
            "topic": topic,
            "event": event,
            "ref": ref,
        }
    )


def error_object(code: str, description: str) -> dict[str, Any]:
    """eWallet's error object, as in a refused join or a failed finalize."""
    return {"object": "error", "code": code, "description": description, "messages": None}


# -- server frames ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ServerFrame:
    """One frame from the server, whatever its event."""

    topic: str
    event: str
    ref: Ref
    success: bool
    data: Any
    error: Any


@dataclass(frozen=True, slots=True)
class ReplyError:
    """The error of a refused join (or any ``success: false`` reply)."""

    code: str
    description: str


def parse_frame(raw: str | bytes) -> ServerFrame:
    """A server frame, or ``ValueError`` with a short fixed reason (never frame content)."""
    frame = parse_json(raw)
    if not isinstance(frame, dict):
        raise ValueError("not a JSON object")
    topic, event, ref = frame.get("topic"), frame.get("event"), frame.get("ref")
    if not isinstance(topic, str) or not isinstance(event, str):
        raise ValueError("no topic or event")
    if isinstance(ref, bool) or not isinstance(ref, str | int | None):
        raise ValueError("bad ref")
    if "success" in frame:
        success = frame["success"]
        if not isinstance(success, bool):
            raise ValueError("bad success flag")
        return ServerFrame(topic, event, ref, success, frame.get("data"), frame.get("error"))
    payload = frame.get("payload")
    if isinstance(payload, dict):
        # Stock Phoenix V1: replies wrap {status, response}; broadcasts are the payload.
        if event == "phx_reply" and isinstance(payload.get("status"), str):
            ok = payload["status"] == "ok"
            response = payload.get("response")
            return ServerFrame(
                topic, event, ref, ok, response if ok else None, None if ok else response
            )
        return ServerFrame(topic, event, ref, event != "phx_error", payload, None)
    raise ValueError("no success flag")


def reply_error(frame: ServerFrame) -> ReplyError:
    """The code and description of a refused reply, in whichever shape it came."""
    error = frame.error
    if isinstance(error, dict):
        code = error.get("code") or error.get("reason")
        description = error.get("description") or error.get("reason") or ""
        return ReplyError(_short(code or "unknown"), _short(description))
    if isinstance(error, str) and error:
        return ReplyError(_short(error), "")
    return ReplyError("unknown", "")


def _short(value: object, limit: int = 200) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text if len(text) <= limit else text[: limit - 1] + "…"


# -- events ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ConsumptionEvent:
    """A normalized event: SPEC section 4's ``type``, ``data``, stable ``id`` and ``time``."""

    type: str
    data: dict[str, Any]
    id: str
    time: str


def consumption_event(frame: ServerFrame) -> ConsumptionEvent:
    """The event of a consumption broadcast; ``ValueError`` when it is not one.

    ``data`` is the consumption plus ``topic`` (the channel it came on), ``success`` and
    ``error``. The id is the same on every topic the broadcast reaches, so one fact that
    arrives on two joined channels (or twice) is one event.
    """
    if frame.event not in CONSUMPTION_EVENTS:
        raise ValueError("not a consumption event")
    if frame.data is not None and not isinstance(frame.data, dict):
        raise ValueError("consumption is not an object")
    consumption: dict[str, Any] = dict(frame.data or {})
    data = {**consumption, "topic": frame.topic, "success": frame.success, "error": frame.error}
    cid = consumption.get("id")
    if isinstance(cid, str) and cid:
        status = consumption.get("status")
        event_id = stable_id("ewallet", frame.event, cid, "" if status is None else status)
    else:
        # A failed event may come without a consumption: its content is all there is.
        event_id = stable_id(
            "ewallet", frame.event, _canonical(consumption), _canonical(frame.error), frame.success
        )
    return ConsumptionEvent(
        frame.event, data, event_id, provider_time(consumption.get("updated_at"))
    )


def _canonical(value: object) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def provider_time(value: object) -> str:
    """``utc_iso`` of an ISO-8601 timestamp from the provider, or ``""`` (receipt time)."""
    if not isinstance(value, str) or not 10 <= len(value) <= 40:
        return ""
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        return ""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)  # eWallet writes UTC
    if not 1970 <= moment.year <= 9998:  # utc_iso's range, with room for the offset
        return ""
    return utc_iso(moment.timestamp())
