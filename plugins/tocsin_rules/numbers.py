"""Numbers in events: what counts as one, exact decimal arithmetic, and ``by`` amounts.

Sums and moves are computed in ``Decimal``, so ``2000.0000 EOS`` five times reaches a bound
of ``10000`` exactly and a move from ``2.10`` to ``2.163`` is exactly 3%, with no float
rounding deciding whether a rule fires at its bound.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from decimal import MAX_EMAX, MIN_EMIN, Context, Decimal, InvalidOperation

# A number followed by a symbol, as EOS writes amounts ("12.5000 EOS"): the amount counts.
_AMOUNT_WITH_SYMBOL = re.compile(r"([+-]?[0-9]{1,30}(?:\.[0-9]{1,30})?) [A-Z]{1,7}")
_MAX_LEN = 100  # longer strings are no number a provider sends
_MAX_EXPONENT = 300  # about the range of a float: beyond it a value is garbage, not data


def to_decimal(value: object) -> Decimal | None:
    """A finite ``Decimal`` from a number, a numeric string (``"2.10"``, ``" 1e3 "``) or an
    amount with a symbol (``"12.5000 EOS"``), else None.

    Booleans are not numbers, nor are NaN, infinities and magnitudes beyond 1e300 (the
    same values the built-in ``to_number`` filter accepts, plus amounts with a symbol).
    """
    if isinstance(value, bool):
        return None
    number: Decimal
    if isinstance(value, int):
        if abs(value) >= 10**_MAX_EXPONENT:
            return None
        number = Decimal(value)
    elif isinstance(value, float):
        if not math.isfinite(value):
            return None
        number = Decimal(repr(value))  # 0.1 is 0.1, not its binary expansion
    elif isinstance(value, Decimal):
        number = value
    elif isinstance(value, str) and len(value) <= _MAX_LEN:
        text = value.strip()
        amount = _AMOUNT_WITH_SYMBOL.fullmatch(text)
        try:
            number = Decimal(amount.group(1) if amount else text)
        except (InvalidOperation, ValueError):
            return None
    else:
        return None
    if not number.is_finite() or (number and abs(number.adjusted()) > _MAX_EXPONENT):
        return None
    return number


EXACT = Context(prec=1000, Emax=MAX_EMAX, Emin=MIN_EMIN)
"""The context of sums and moves. ``to_decimal`` bounds a value to 100 characters and
1e300 either way, so sums and differences of them (and products with ``by``) need at most
a few hundred digits: with 1,000 they are exact. The default context (of ``+``, ``-``,
``abs``...) keeps 28 and rounds the rest, so 10**28 + 1 was 10**28."""


def add(a: Decimal, b: Decimal) -> Decimal:
    return EXACT.add(a, b)


def subtract(a: Decimal, b: Decimal) -> Decimal:
    return EXACT.subtract(a, b)


def total(values: Iterable[Decimal]) -> Decimal:
    out = Decimal(0)
    for value in values:
        out = EXACT.add(out, value)
    return out


def show(number: Decimal) -> str:
    """A decimal as people write it: ``7200.0000`` -> ``7200``, ``2.50`` -> ``2.5``."""
    text = f"{number:f}"
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return text


def show_percent(ratio: Decimal) -> str:
    """``0.01190`` -> ``"1.19%"`` (two decimals at most)."""
    return show((ratio * 100).quantize(Decimal("0.01"))) + "%"


@dataclass(frozen=True, slots=True)
class Move:
    """How far a value must move to fire a ``change`` rule: an amount, or a percentage of
    the reference value (``by = 0.5`` or ``by = "3%"``)."""

    amount: Decimal
    percent: bool

    def __str__(self) -> str:
        return f"{show(self.amount)}%" if self.percent else show(self.amount)

    def size(self, reference: Decimal, value: Decimal) -> Decimal | None:
        """How far ``value`` is from ``reference`` in the unit of ``by`` (a ratio for a
        percentage); None when a percentage of a zero reference is asked for."""
        distance = EXACT.abs(subtract(value, reference))
        if not self.percent:
            return distance
        if not reference:
            return None
        return distance / EXACT.abs(reference)

    def reached(self, reference: Decimal, value: Decimal) -> bool:
        """``value`` is ``by`` or more away from ``reference`` (never, from 0 in percent)."""
        distance = EXACT.abs(subtract(value, reference))
        if not self.percent:
            return distance >= self.amount
        # Compared without dividing, so the bound is exact: 2.10 -> 2.163 is 3%.
        return bool(reference) and EXACT.multiply(distance, 100) >= EXACT.multiply(
            self.amount, EXACT.abs(reference)
        )


def parse_move(value: object) -> Move:
    """``by`` from the config: a positive number, or a string ``"N%"``."""
    problem = 'expected a positive number (e.g. 0.5) or a percentage (e.g. "3%")'
    percent = isinstance(value, str) and value.strip().endswith("%")
    raw: object = value.strip().removesuffix("%").strip() if isinstance(value, str) else value
    if isinstance(value, str) and not percent:
        raise ValueError(problem + f', not "{value}"; add % for a percentage')
    amount = None if isinstance(raw, bool) else to_decimal(raw)
    if amount is None or amount <= 0 or (isinstance(raw, str) and " " in raw):
        raise ValueError(problem)
    return Move(amount, percent)
