"""Template filters for rule titles and bodies, e.g. ``{{ event.data.args.quantity | asset }}``.

Templates render whatever a provider pushed, so every filter is total: unexpected input
(``None``, a Jinja ``Undefined``, a number, garbage) gives ``None``, never an exception
that would lose the alert. All are pure functions.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from decimal import Decimal
from typing import Any, TypedDict

# An EOS asset: an amount whose decimals give the precision, then a symbol of 1 to 7
# capital letters ("12.5000 EOS", "-1 SYS"). Longer strings cannot be a real asset, and
# the cap keeps the float conversion finite.
_ASSET = re.compile(r"([+-]?[0-9]{1,20})(?:\.([0-9]{1,18}))? ([A-Z]{1,7})")
_MAX_ASSET_LEN = 64
_MAX_NUMBER_LEN = 100


class Asset(TypedDict):
    """An EOS asset split into its parts."""

    amount: float
    symbol: str
    precision: int


def asset(value: object) -> Asset | None:
    """``"12.5000 EOS"`` -> ``{"amount": 12.5, "symbol": "EOS", "precision": 4}``, else None."""
    if not isinstance(value, str) or len(value) > _MAX_ASSET_LEN:
        return None
    found = _ASSET.fullmatch(value.strip())
    if found is None:
        return None
    whole, decimals, symbol = found.groups()
    text = f"{whole}.{decimals}" if decimals else whole
    return {"amount": float(text), "symbol": symbol, "precision": len(decimals or "")}


def asset_amount(value: object) -> float | None:
    """The amount of an EOS asset string (``"12.5000 EOS"`` -> ``12.5``), else None."""
    parsed = asset(value)
    return None if parsed is None else parsed["amount"]


def asset_symbol(value: object) -> str | None:
    """The symbol of an EOS asset string (``"12.5000 EOS"`` -> ``"EOS"``), else None."""
    parsed = asset(value)
    return None if parsed is None else parsed["symbol"]


def to_number(value: object) -> float | None:
    """A finite float from a number or a numeric string (``"1e3"``, ``" 42 "``), else None.

    Booleans are not numbers here, and NaN or infinity give None: neither compares
    usefully in a threshold.
    """
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float | Decimal):
        try:
            number = float(value)
        except (OverflowError, ValueError):  # a huge int, a signalling Decimal NaN
            return None
    elif isinstance(value, str) and len(value) <= _MAX_NUMBER_LEN:
        try:
            number = float(value)
        except ValueError:
            return None
    else:
        return None
    return number if math.isfinite(number) else None


FILTERS: dict[str, Callable[..., Any]] = {
    "asset": asset,
    "asset_amount": asset_amount,
    "asset_symbol": asset_symbol,
    "to_number": to_number,
}
"""Filter name -> function, as registered through ``register_template_filters``."""
