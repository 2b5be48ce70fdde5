"""What ``tocsin test`` reads and compares: event envelopes, recorded frames, golden files.

Both inputs become one stream of ``(where, Event)``, ``where`` being ``"FILE:LINE"``, so
the rules see envelopes and replayed frames through the same loop. A line that cannot be
read is handed to a ``skip(where, reason)`` callback and the stream goes on: a bad line
is reported, never fatal.

A frames file is what ``tocsin record`` writes, one JSON object per received frame:
``{"t": <unix receive time>, "frame": "<text>"}``, or ``"b64"`` in place of ``"frame"``
for a binary frame. A golden file is one alert per line, with its stable fields only
(``GOLDEN_KEYS``).
"""

from __future__ import annotations

import base64
import binascii
import difflib
import math
import os
import stat
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO, Any

import orjson

from .errors import UsageError
from .events import Event, to_json, utc_iso
from .rules import PendingAlert
from .source import EventFactory, FrameParser

Skip = Callable[[str, str], None]
"""``skip(where, reason)``: a line that could not be read (``where`` is ``"FILE:LINE"``)."""

GOLDEN_KEYS = ("rule", "status", "id", "event_id", "title", "body", "actions")
"""The fields of an alert in a golden file, in this order: none depends on the run's clock."""


def numbered_lines(
    path: Path, progress: Callable[[int], None] | None = None, too_long: Skip | None = None
) -> Iterator[tuple[str, bytes]]:
    """The non-blank lines of ``path`` as ``("FILE:LINE", bytes)``; ``progress(bytes read)``.
    A line over ``MAX_LINE`` is passed over and reported to ``too_long`` (without one, it is
    a ``UsageError``).

    Raises ``UsageError`` at once when the file cannot be opened.
    """
    try:
        handle = path.open("rb")
        if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
            handle.close()
            raise UsageError(f"cannot read {path}: not a regular file")
    except OSError as err:
        raise UsageError(f"cannot read {path}: {err.strerror}") from None
    return _lines(handle, str(path), progress, too_long)


MAX_LINE = 16 * 1024 * 1024
"""The longest line read (a recorded frame of 8 MiB, in base64, is 11 MiB)."""


def _lines(
    handle: IO[bytes],
    name: str,
    progress: Callable[[int], None] | None,
    too_long: Skip | None,
) -> Iterator[tuple[str, bytes]]:
    with handle:
        number = 0
        while line := handle.readline(MAX_LINE + 1):
            number += 1
            if progress is not None:
                progress(len(line))
            if len(line) > MAX_LINE:
                while not line.endswith(b"\n") and (line := handle.readline(MAX_LINE)):
                    if progress is not None:
                        progress(len(line))
                reason = f"longer than {MAX_LINE:,} bytes"
                if too_long is None:
                    raise UsageError(f"{name}:{number}: {reason}")
                too_long(f"{name}:{number}", reason)
                continue
            if line.strip():
                yield f"{name}:{number}", line


def envelopes(lines: Iterable[tuple[str, bytes]], skip: Skip) -> Iterator[tuple[str, Event]]:
    """One event per line holding an envelope (SPEC section 4)."""
    for where, line in lines:
        try:
            event = Event.from_envelope(orjson.loads(line))
        except ValueError as err:  # orjson.JSONDecodeError is one
            skip(where, str(err))
            continue
        yield where, event


class ReplayFactory(EventFactory):
    """Builds a replayed source's events, received at the time their frame was recorded."""

    def __init__(self, source: str, provider: str) -> None:
        self.source = source
        self.provider = provider
        self.at = 0.0

    def event(
        self,
        type: str,
        data: dict[str, Any],
        *,
        id: str,
        time: str = "",
        removed: bool = False,
    ) -> Event:
        event = super().event(type, data, id=id, time=time, removed=removed)
        event.received = self.at
        if not time:
            event.time = utc_iso(self.at)  # as live: no provider time, receipt time
        return event


def frame_record(t: float, frame: str | bytes) -> bytes:
    """One line of a frames file (with its newline)."""
    record: dict[str, Any] = {"t": t}
    if isinstance(frame, str):
        record["frame"] = frame
    else:
        record["b64"] = base64.b64encode(frame).decode("ascii")
    return orjson.dumps(record) + b"\n"


def _read_record(line: bytes) -> tuple[float, str | bytes]:
    try:
        record = orjson.loads(line)
    except orjson.JSONDecodeError:
        raise ValueError("not JSON") from None
    if not isinstance(record, dict):
        raise ValueError('not a frame record: expected {"t": ..., "frame": ...}')
    t = record.get("t")
    if isinstance(t, bool) or not isinstance(t, int | float) or not math.isfinite(t):
        raise ValueError('no receive time "t"')
    if isinstance(record.get("frame"), str):
        return float(t), record["frame"]
    if isinstance(record.get("b64"), str):
        try:
            return float(t), base64.b64decode(record["b64"], validate=True)
        except (binascii.Error, ValueError):
            raise ValueError('"b64" is not base64') from None
    raise ValueError('no "frame" (text) or "b64" (binary)')


def frames(
    lines: Iterable[tuple[str, bytes]],
    parse: FrameParser,
    factory: ReplayFactory,
    skip: Skip,
) -> Iterator[tuple[str, Event]]:
    """The events ``parse`` makes of each recorded frame, received at the recorded time."""
    for where, line in lines:
        try:
            factory.at, frame = _read_record(line)
        except ValueError as err:
            skip(where, str(err))
            continue
        try:
            events = parse(frame)
        except ValueError as err:
            skip(where, f"malformed frame: {err}")
            continue
        except Exception as err:  # a plugin's bug costs its frame, not the run
            skip(where, f"the source's frame parser failed: {type(err).__name__}: {err}")
            continue
        for event in events:
            yield where, event


# -- golden files ------------------------------------------------------------------------


def _canonical(alert: dict[str, Any]) -> str:
    ordered = {k: alert[k] for k in GOLDEN_KEYS if k in alert}
    ordered.update(sorted((k, v) for k, v in alert.items() if k not in ordered))
    return to_json(ordered).decode()


def golden_line(pending: PendingAlert) -> str:
    """An alert as a golden file holds it: one JSON object of ``GOLDEN_KEYS``."""
    alert = pending.alert
    return _canonical(
        {
            "rule": alert.rule,
            "status": alert.status,
            "id": alert.id,
            "event_id": pending.event_id,
            "title": alert.title,
            "body": alert.body,
            "actions": list(pending.actions),
        }
    )


def read_golden(path: Path) -> list[str]:
    """The alerts of a golden file, each in canonical form (key order, spacing)."""
    out = []
    for where, line in numbered_lines(path):
        try:
            alert = orjson.loads(line)
        except orjson.JSONDecodeError:
            raise UsageError(f"{where}: not JSON; a golden file holds one alert per line") from None
        if not isinstance(alert, dict):
            raise UsageError(f"{where}: not a JSON object; a golden file holds one alert per line")
        out.append(_canonical(alert))
    return out


def write_golden(path: Path, lines: list[str]) -> None:
    try:
        path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    except OSError as err:
        raise UsageError(f"cannot write {path}: {err.strerror}") from None


def golden_diff(expected: list[str], actual: list[str], golden: Path) -> list[str]:
    """A unified diff from the golden file to this run; empty when they agree."""
    return list(
        difflib.unified_diff(expected, actual, fromfile=str(golden), tofile="this run", lineterm="")
    )
