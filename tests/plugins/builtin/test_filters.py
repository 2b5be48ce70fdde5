"""Template filters: total functions, checked with examples and with hypothesis."""

from __future__ import annotations

import math
from decimal import Decimal
from typing import Any

import jinja2
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tocsin_builtin.filters import FILTERS, asset, asset_amount, asset_symbol, to_number


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("12.5000 EOS", {"amount": 12.5, "symbol": "EOS", "precision": 4}),
        ("0.0001 EOS", {"amount": 0.0001, "symbol": "EOS", "precision": 4}),
        ("100 SYS", {"amount": 100.0, "symbol": "SYS", "precision": 0}),
        ("-1.50 USDT", {"amount": -1.5, "symbol": "USDT", "precision": 2}),
        ("  7.0 A  ", {"amount": 7.0, "symbol": "A", "precision": 1}),
    ],
)
def test_asset(text: str, expected: dict[str, Any]) -> None:
    assert asset_amount(text) == expected["amount"]
    assert asset_symbol(text) == expected["symbol"]
    assert asset(text) == expected


@pytest.mark.parametrize(
    "junk",
    [
        None,
        "",
        "EOS",
        "12.5",
        "12.5000 eos",
        "12.5000  EOS",
        "1.0 TOOLONGS",
        "1. EOS",
        ".5 EOS",
        "1.0 EOS@eosio.token",
        "1e3 EOS",
        12.5,
        b"12.5000 EOS",
        ["12.5000 EOS"],
        jinja2.Undefined(name="quantity"),
        jinja2.StrictUndefined(name="quantity"),
    ],
)
def test_asset_refuses_what_is_not_an_asset(junk: object) -> None:
    assert asset(junk) is None
    assert asset_amount(junk) is None
    assert asset_symbol(junk) is None


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (3, 3.0),
        (2.5, 2.5),
        ("42", 42.0),
        (" -1e3 ", -1000.0),
        (Decimal("0.1"), 0.1),
        (True, None),
        ("nan", None),
        (math.inf, None),
        ("1e999", None),
        (10**400, None),
        ("12.5 EOS", None),
        (None, None),
        ([], None),
        (jinja2.Undefined(), None),
    ],
)
def test_to_number(value: object, expected: float | None) -> None:
    assert to_number(value) == expected


def test_registered_names() -> None:
    assert set(FILTERS) == {"asset", "asset_amount", "asset_symbol", "to_number"}


def test_filters_in_templates_with_strict_undefined() -> None:
    env = jinja2.Environment(undefined=jinja2.StrictUndefined, autoescape=False)
    env.filters.update(FILTERS)
    template = env.from_string(
        "{{ q | asset_amount }} {{ q | asset_symbol }} {{ missing | asset_amount }}"
        " {{ (q | asset).precision }} {{ '7' | to_number + 1 }}"
    )
    assert template.render(q="12.5000 EOS") == "12.5 EOS None 4 8.0"


# st.builds, not st.just: hypothesis would probe a StrictUndefined for attributes to
# describe it, and any attribute access on one raises.
undefined = st.builds(jinja2.Undefined, name=st.text()) | st.builds(
    jinja2.StrictUndefined, name=st.text()
)
anything = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.decimals()
    | st.text()
    | st.binary()
    | undefined,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
    max_leaves=5,
)


@given(anything)
def test_filters_never_raise(value: object) -> None:
    for function in FILTERS.values():
        function(value)


@given(st.from_regex(r"[+-]?[0-9]{0,22}(\.[0-9]{0,20})? ?[A-Za-z@.]{0,9}", fullmatch=True))
def test_asset_like_strings_never_raise(text: str) -> None:
    parsed = asset(text)
    if parsed is not None:
        assert math.isfinite(parsed["amount"])
        assert parsed["symbol"].isupper()


@given(
    st.integers(min_value=-(2**62), max_value=2**62),
    st.integers(min_value=0, max_value=18),
    st.from_regex(r"[A-Z]{1,7}", fullmatch=True),
)
def test_asset_round_trip(units: int, precision: int, symbol: str) -> None:
    digits = f"{abs(units):0{precision + 1}d}"
    whole, frac = digits[: len(digits) - precision], digits[len(digits) - precision :]
    text = ("-" if units < 0 else "") + whole + (f".{frac}" if precision else "") + f" {symbol}"
    assert asset(text) == {
        "amount": float(Decimal(units).scaleb(-precision)),
        "symbol": symbol,
        "precision": precision,
    }
