"""The outbox table's human times (``tocsin outbox`` end to end is in test_cli.py)."""

from __future__ import annotations

import pytest

from tocsin.outbox_view import cut, relative


@pytest.mark.parametrize(
    ("offset", "expected"),
    [
        (0.4, "now"),
        (-0.9, "now"),
        (12, "in 12s"),
        (-200, "3m20s ago"),
        (3600, "in 1h"),
        (3 * 86400 + 7200 + 59, "in 3d2h"),
        (-(86400 + 5), "1d ago"),
    ],
)
def test_relative_time_in_at_most_two_units(offset: float, expected: str) -> None:
    assert relative(1_000_000 + offset, 1_000_000) == expected


def test_cut_keeps_one_line_and_marks_the_cut() -> None:
    assert cut("HTTP 503:\n  busy", 40) == "HTTP 503: busy"
    assert cut("x" * 10, 5) == "xxxx…"
