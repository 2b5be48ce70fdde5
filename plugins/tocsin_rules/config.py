"""The keys of ``threshold``, ``absence`` and ``change`` rules, and how they are checked.

Every stateful rule takes ``window``, ``time_field`` and ``max_groups``; rules that end
(``threshold``, ``absence``) also take ``send_resolved``, ``realert`` and
``realert_backoff``. Errors are one sentence each; ``tocsin check`` prefixes them with the
rule's file and path (``rules[2] "big outflow": window must be at least 1s``).
"""

from __future__ import annotations

from decimal import Decimal
from typing import Annotated, Any, Literal

from pydantic import (
    BeforeValidator,
    PlainSerializer,
    StrictBool,
    StrictInt,
    field_validator,
    model_validator,
)

from tocsin import Duration, RuleConfig, format_duration

from .numbers import Move, parse_move, to_decimal

MIN_WINDOW = 1.0  # rules are ticked about once a second: a shorter window cannot be kept
DEFAULT_MAX_GROUPS = 100_000


def check_path(path: str | None) -> str | None:
    """A dotted path into the event's data (``args.quantity``), or an error."""
    if path is None:
        return None
    if not path.strip() or any(not part or part != part.strip() for part in path.split(".")):
        raise ValueError(
            f'"{path}" is not a dotted path into the event data (e.g. "args.quantity")'
        )
    return path


MoveAmount = Annotated[
    Move,
    BeforeValidator(parse_move),
    PlainSerializer(str, return_type=str),
]
"""``by``: a positive number, or ``"3%"`` of the reference value."""


class WindowedConfig(RuleConfig):
    """Keys of every stateful rule: the window and how its time is kept."""

    window: Duration
    time_field: Literal["receipt", "event"] = "receipt"
    max_groups: StrictInt = DEFAULT_MAX_GROUPS

    @field_validator("window")
    @classmethod
    def _window(cls, value: float) -> float:
        if value < MIN_WINDOW:
            raise ValueError(
                f"must be at least 1s (rules are checked once a second), not "
                f"{format_duration(value)}"
            )
        return value

    @field_validator("max_groups")
    @classmethod
    def _max_groups(cls, value: int) -> int:
        if value < 1:
            raise ValueError("must be at least 1")
        return value


class LifecycleConfig(WindowedConfig):
    """Keys of rules whose alerts end: ``firing``, then ``resolved``; repeats while firing."""

    send_resolved: StrictBool = True
    realert: Duration | None = None
    realert_backoff: StrictBool = False

    @field_validator("realert")
    @classmethod
    def _realert(cls, value: float | None) -> float | None:
        if value is not None and value < MIN_WINDOW:
            raise ValueError(
                f"must be at least 1s (rules are checked once a second), not "
                f"{format_duration(value)}"
            )
        return value

    @model_validator(mode="after")
    def _backoff_needs_realert(self) -> LifecycleConfig:
        if self.realert_backoff and self.realert is None:
            raise ValueError("realert_backoff = true needs realert (the first interval)")
        return self


class ThresholdConfig(LifecycleConfig):
    """A rule with ``kind = "threshold"``: ``count`` events, or a ``sum`` of ``field``."""

    count: int | None = None
    field: str | None = None
    sum: Decimal | None = None

    @field_validator("count", mode="before")
    @classmethod
    def _count(cls, value: Any) -> Any:
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise ValueError("must be a whole number of events (e.g. 5)")
        if value is not None and value < 1:
            raise ValueError("must be at least 1")
        return value

    @field_validator("field")
    @classmethod
    def _field(cls, value: str | None) -> str | None:
        return check_path(value)

    @field_validator("sum", mode="before")
    @classmethod
    def _sum(cls, value: Any) -> Any:
        if value is None:
            return None
        # A string too: a TOML integer stops at 2**63 - 1 and a float keeps about 16
        # digits, while a bound in a token's smallest unit may need more. Not "10000 EOS":
        # nothing would check its symbol.
        spaced = isinstance(value, str) and " " in value.strip()
        number = None if spaced else to_decimal(value)
        if number is None:
            raise ValueError(
                "must be a number (e.g. 10000), or one written as a string for more digits"
                ' than a TOML number holds (e.g. "18446744073709551616")'
            )
        if not number > 0:
            raise ValueError("must be more than 0 (only positive values are added up)")
        return number

    @model_validator(mode="after")
    def _count_or_sum(self) -> ThresholdConfig:
        has_count, has_field, has_sum = (
            self.count is not None,
            self.field is not None,
            self.sum is not None,
        )
        if has_count and (has_field or has_sum):
            raise ValueError("a threshold takes count, or field with sum, not both")
        if not has_count and not has_field and not has_sum:
            raise ValueError('a threshold needs count = N (events), or field = "PATH" with sum = N')
        if has_field and not has_sum:
            raise ValueError("field needs sum (the bound the sum of field must reach)")
        if has_sum and not has_field:
            raise ValueError('sum needs field (the path of the number to add up, e.g. "amount")')
        return self


class AbsenceConfig(LifecycleConfig):
    """A rule with ``kind = "absence"``: fires on silence of ``window``."""


_NOT_FOR_CHANGE = ("send_resolved", "realert", "realert_backoff")


class ChangeConfig(WindowedConfig):
    """A rule with ``kind = "change"``: fires when ``field`` moves by ``by`` within ``window``."""

    field: str
    by: MoveAmount

    @model_validator(mode="before")
    @classmethod
    def _no_lifecycle(cls, raw: Any) -> Any:
        if isinstance(raw, dict):
            given = [key for key in _NOT_FOR_CHANGE if key in raw]
            if given:
                raise ValueError(
                    f"{', '.join(given)}: a change rule sends one alert per move; its alerts"
                    " neither resolve nor repeat"
                )
        return raw

    @field_validator("field")
    @classmethod
    def _field(cls, value: str) -> str:
        checked = check_path(value)
        assert checked is not None
        return checked
