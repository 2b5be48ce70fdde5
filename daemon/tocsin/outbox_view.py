"""``tocsin outbox list``: the outbox as a table for people, or as JSON for scripts.

Returns lines and documents; printing stays in ``cli``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import orjson

from .events import utc_iso
from .store import PENDING, Delivery

HEADER = ["#", "state", "tries", "queued", "next try", "action", "rule", "target", "last error"]


def relative(ts: float, now: float) -> str:
    """``"in 12s"``, ``"3m20s ago"``, ``"now"``: a time near ``now``, to a human (two units)."""
    delta = ts - now
    rest = int(abs(delta))
    if rest < 1:
        return "now"
    parts: list[tuple[int, str]] = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if rest >= size or parts:
            parts.append((rest // size, unit))
            rest %= size
        if len(parts) == 2:
            break
    amount = "".join(f"{n}{unit}" for n, unit in parts if n or (n, unit) == parts[0])
    return f"in {amount}" if delta > 0 else f"{amount} ago"


def cut(text: str, width: int) -> str:
    """``text`` on one line, at most ``width`` characters, ``…`` marking a cut."""
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def table(header: Sequence[str], rows: Sequence[Sequence[str]], right: set[int]) -> list[str]:
    """Columns as wide as their widest cell (header included); the last one unpadded."""
    widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header))]
    out = []
    for row in (header, *rows):
        cells = [
            cell.rjust(widths[i]) if i in right else cell.ljust(widths[i])
            for i, cell in enumerate(row)
        ]
        cells[-1] = row[-1]
        out.append("  ".join(cells).rstrip())
    return out


def _rule(d: Delivery) -> str:
    return str(orjson.loads(d.payload).get("rule", ""))


def _row(d: Delivery, now: float) -> list[str]:
    pending = d.state == PENDING
    return [
        str(d.seq),
        d.state_name,
        str(d.attempts),
        relative(d.created_at, now),
        relative(d.due_at, now) if pending else "-",
        cut(d.action, 16),
        cut(_rule(d), 28),
        cut(d.label, 48),
        cut(d.last_error, 60),
    ]


def outbox_lines(
    rows: Sequence[Delivery], counts: dict[str, int], *, dead_only: bool, now: float
) -> list[str]:
    """A summary line, then (when there is anything listed) the table of ``rows``."""
    listed = counts["dead"] if dead_only else counts["pending"] + counts["dead"]
    shown = f"; the first {len(rows)} listed" if len(rows) < listed else ""
    summary = (
        f"{counts['pending']} pending, {counts['dead']} dead-lettered, {counts['done']} delivered"
        + (f", {counts['dropped']} dropped" if counts.get("dropped") else "")
        + shown
    )
    if not rows:
        return [summary]
    return [summary, *table(HEADER, [_row(d, now) for d in rows], right={0, 2})]


def outbox_json(rows: Sequence[Delivery], counts: dict[str, int]) -> dict[str, Any]:
    """``tocsin outbox list --json``: the counts and every listed delivery."""
    return {
        "counts": counts,
        "deliveries": [
            {
                "seq": d.seq,
                "state": d.state_name,
                "attempts": d.attempts,
                "alert_id": d.alert_id,
                "rule": _rule(d),
                "action": d.action,
                "target": d.label,
                "created_at": utc_iso(d.created_at),
                "due_at": utc_iso(d.due_at) if d.state == PENDING else None,
                "last_error": d.last_error,
            }
            for d in rows
        ],
    }
