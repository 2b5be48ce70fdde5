"""The event envelope (SPEC section 4) and helpers to build and read events."""

from __future__ import annotations

import hashlib
import math
import re
import time as _time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson

DAEMON_EVENT_TYPES = ("source.up", "source.down", "source.stale", "source.gap")
"""Event types the daemon itself emits for every source."""

_MISSING = object()


_INT64 = 2**63
_DEPTH = 64  # JSON nesting kept when a value must be made encodable (orjson writes 254)


def to_json(value: Any) -> bytes:
    """``value`` as JSON bytes, whatever a provider put in it.

    orjson writes what it reads, with two exceptions a provider's frame can hold: an
    integer beyond 64 bits (the fallback decoder of a frame with a NaN reads one) and
    nesting deeper than 254 (orjson reads 1,024). Such a value is made encodable first:
    a huge integer becomes its decimal string, a level deeper than 64 the text
    ``"(nested too deep)"``, and anything else ``str()``. The common case costs one
    ``orjson.dumps``.
    """
    try:
        return orjson.dumps(value, default=str, option=orjson.OPT_NON_STR_KEYS)
    except (TypeError, orjson.JSONEncodeError):
        return orjson.dumps(json_safe(value), default=str, option=orjson.OPT_NON_STR_KEYS)


def json_safe(value: Any, depth: int = 0) -> Any:
    """A copy of ``value`` that ``orjson`` can encode (see ``to_json``)."""
    if isinstance(value, bool) or value is None or isinstance(value, str | float):
        return value
    if isinstance(value, int):
        return value if -_INT64 <= value < _INT64 else str(value)
    if depth >= _DEPTH:
        return "(nested too deep)"
    if isinstance(value, Mapping):
        return {str(k): json_safe(v, depth + 1) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v, depth + 1) for v in value]
    return str(value)


_DECIMAL = re.compile(r"-?[0-9]{1,40}(?:\.[0-9]{1,40})?(?:[eE][-+]?[0-9]{1,3})?")


def wire_number(value: Any) -> Any:
    """A provider's decimal string as a number, for rules to compare (``price > 2.0``): an
    int when integral and exact (``"30200.00"`` -> ``30200``), else a finite float
    (``"3.5334"``); anything else (``""``, ``"1e999"``, a non-string) as it is."""
    if not isinstance(value, str) or not _DECIMAL.fullmatch(value):
        return value
    number = float(value)
    if not math.isfinite(number):
        return value
    if number.is_integer() and abs(number) < 2**53:
        return int(number)
    return number


class Numbering:
    """Numbers that only grow, to tell apart facts of the same content (odds back at an
    earlier price, a book back at an earlier state).

    With a ``clock`` (seconds), each number is its milliseconds or one more than the last,
    so it grows across restarts and a later run never reuses one; without (a replay of
    recorded frames), 1, 2, 3..., the same numbers each replay. ``last`` is the latest.
    """

    def __init__(self, clock: Callable[[], float] | None = None) -> None:
        self.last = 0
        self._clock = clock

    def next(self) -> int:
        now = int(self._clock() * 1000) if self._clock is not None else 0
        self.last = max(self.last + 1, now)
        return self.last


def utc_iso(ts: float | None = None) -> str:
    """ISO-8601 UTC with a ``Z``, to the millisecond (``2026-11-22T10:00:00.000Z``)."""
    moment = datetime.fromtimestamp(_time.time() if ts is None else ts, tz=UTC)
    return moment.isoformat(timespec="milliseconds")[:-6] + "Z"  # less its "+00:00"


def stable_id(*parts: object) -> str:
    """A stable hex id from ``parts``: the same parts always give the same id."""
    # Each part followed by \x1f, hashed in one call (an update per part cost twice as much).
    text = "\x1f".join(map(str, parts)) + "\x1f" if parts else ""
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


@dataclass(slots=True)
class Event:
    """One normalized fact from a provider (or from the daemon about a source).

    ``id`` is stable: the same provider fact always gets the same id, after a reconnect,
    a duplicate push or a restart. ``received`` is the local receipt time (unix seconds),
    not part of the envelope that alerts carry.
    """

    id: str
    source: str
    provider: str
    type: str
    data: dict[str, Any]
    time: str = ""
    removed: bool = False
    received: float = field(default_factory=_time.time)

    def __post_init__(self) -> None:
        if not self.time:
            self.time = utc_iso(self.received)

    def envelope(self) -> dict[str, Any]:
        """The envelope as it appears in webhooks and JSONL files."""
        return {
            "id": self.id,
            "source": self.source,
            "provider": self.provider,
            "type": self.type,
            "time": self.time,
            "removed": self.removed,
            "data": self.data,
        }

    @classmethod
    def from_envelope(cls, raw: Mapping[str, Any]) -> Event:
        """An event from an envelope dict; raises ``ValueError`` naming what is wrong."""
        if not isinstance(raw, Mapping):
            raise ValueError("an event is a JSON object")
        missing = [k for k in ("id", "source", "type") if not isinstance(raw.get(k), str)]
        if missing:
            raise ValueError(f"missing or non-string field(s): {', '.join(missing)}")
        data = raw.get("data", {})
        if not isinstance(data, dict):
            raise ValueError("data must be a JSON object")
        return cls(
            id=raw["id"],
            source=raw["source"],
            provider=str(raw.get("provider", "")),
            type=raw["type"],
            data=data,
            time=str(raw.get("time") or ""),
            removed=bool(raw.get("removed", False)),
        )


def split_path(path: str) -> tuple[str, ...]:
    """``"args.to"`` -> ``("args", "to")``."""
    return tuple(path.split("."))


def get_path(data: Any, parts: tuple[str, ...], default: Any = None) -> Any:
    """The value at dotted ``parts`` in nested dicts/lists, or ``default``.

    A digit part indexes a list (``authorization.0.actor``).
    """
    value = data
    for part in parts:
        if isinstance(value, dict):
            value = value.get(part, _MISSING)
        elif (
            isinstance(value, list) and part.isascii() and part.isdigit() and int(part) < len(value)
        ):
            value = value[int(part)]
        else:
            return default
        if value is _MISSING:
            return default
    return value


class RecentIds:
    """A bounded memory of recently seen ids, the least recently seen forgotten first.

    Sources use it to drop a re-pushed fact before emitting it (the daemon never alerts
    twice on one alert id anyway; dropping early also keeps duplicates out of counts).
    """

    def __init__(self, size: int = 10_000) -> None:
        self.size = size
        self._ids: OrderedDict[str, None] = OrderedDict()

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, key: object) -> bool:
        return key in self._ids

    def seen(self, key: str) -> bool:
        """True if ``key`` was seen recently; remembers it either way."""
        if key in self._ids:
            self._ids.move_to_end(key)
            return True
        self._ids[key] = None
        if len(self._ids) > self.size:
            self._ids.popitem(last=False)
        return False
