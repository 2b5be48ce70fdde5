"""Event ids: stable across versions, since alert ids and dedup depend on them."""

from __future__ import annotations

from tocsin.events import get_path, stable_id, utc_iso, wire_number


def test_stable_ids_do_not_change_between_versions() -> None:
    # Values computed by the first implementation (one blake2b update per part and per
    # separator): a faster one must give the same ids, or a restart re-alerts everything.
    assert stable_id("eospark", "abc", 0) == "a8b6d16d8a611662c1cbe41009f565ce"
    assert stable_id("x") == "19675772e5038e59df06224c82201ba6"
    assert stable_id() == "cae66941d9efbd404e4d88758ea67670"
    assert stable_id("é", 1.5, None) == "294121d32cd3799ee570c76f40b3d4fc"


def test_parts_are_separated() -> None:
    assert stable_id("ab", "c") != stable_id("a", "bc")


def test_wire_numbers() -> None:
    assert wire_number("30000") == 30000 and isinstance(wire_number("30000"), int)
    assert wire_number("30200.00") == 30200 and isinstance(wire_number("30200.00"), int)
    assert wire_number("3.53340000") == 3.5334
    assert wire_number("-0.5") == -0.5
    assert wire_number("1e-8") == 1e-8
    assert wire_number("12345678901234567890") == 12345678901234567890.0  # too long for an int
    assert wire_number("1e999") == "1e999"  # not finite: kept
    for kept in ("abc", "", "1.2.3", " 1", "NaN", 5, None):
        assert wire_number(kept) == kept


def test_utc_iso_is_milliseconds_truncated_with_a_z() -> None:
    assert utc_iso(0) == "1970-01-01T00:00:00.000Z"
    assert utc_iso(1.9999) == "1970-01-01T00:00:01.999Z"  # truncated, as block times are
    assert utc_iso(1765100000.5) == "2025-12-07T09:33:20.500Z"
    assert utc_iso(-62135596800) == "0001-01-01T00:00:00.000Z"


def test_get_path_indexes_lists_with_ascii_digits_only() -> None:
    data = {"authorization": [{"actor": "ann"}, {"actor": "bob"}]}
    assert get_path(data, ("authorization", "1", "actor")) == "bob"
    assert get_path(data, ("authorization", "2", "actor"), "none") == "none"
    # str.isdigit() says yes to these, int() says no: a rule's path is no index, no error
    for part in ("\u00b2", "\u0661"):
        assert get_path(data, ("authorization", part, "actor"), "none") == "none"
