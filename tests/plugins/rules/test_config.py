"""Config of the stateful kinds: every mistake is one sentence with the rule's path."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import pytest
import tocsin_rules

from support import make_registry, write_config
from tocsin.config import load_config
from tocsin.errors import ConfigError


def problems(tmp_path: Path, keys: str) -> list[str]:
    path = write_config(tmp_path / "t.toml", f'[[rules]]\nname = "r"\n{keys}\n')
    try:
        load_config(path, make_registry(tocsin_rules))
    except ConfigError as err:
        return [f"{p.path}: {p.message}" for p in err.problems]
    return []


@pytest.mark.parametrize(
    "keys, message",
    [
        ('kind = "threshold"\nwindow = "1m"', 'needs count = N (events), or field = "PATH"'),
        ('kind = "threshold"\nwindow = "1m"\ncount = 5\nfield = "a"', "count, or field with sum, not both"),
        ('kind = "threshold"\nwindow = "1m"\nfield = "amount"', "field needs sum"),
        ('kind = "threshold"\nwindow = "1m"\nsum = 10', "sum needs field"),
        ('kind = "threshold"\ncount = 5', 'required key "window" is missing'),
        ('kind = "threshold"\nwindow = "500ms"\ncount = 5', "window: must be at least 1s"),
        ('kind = "threshold"\nwindow = "1m"\ncount = 0', "count: must be at least 1"),
        ('kind = "threshold"\nwindow = "1m"\ncount = 2.5', "count: must be a whole number"),
        ('kind = "threshold"\nwindow = "1m"\ncount = true', "count: must be a whole number"),
        ('kind = "threshold"\nwindow = "1m"\nfield = "args..q"\nsum = 1', 'field: "args..q" is not a dotted path'),
        ('kind = "threshold"\nwindow = "1m"\nfield = "q"\nsum = 0', "sum: must be more than 0"),
        ('kind = "threshold"\nwindow = "1m"\nfield = "q"\nsum = "-1"', "sum: must be more than 0"),
        ('kind = "threshold"\nwindow = "1m"\nfield = "q"\nsum = "lots"', 'sum: must be a number (e.g. 10000), or one written as a string'),
        ('kind = "threshold"\nwindow = "1m"\nfield = "q"\nsum = "10000 EOS"', "sum: must be a number"),
        ('kind = "threshold"\nwindow = "1m"\nfield = "q"\nsum = true', "sum: must be a number"),
        ('kind = "absence"\nwindow = "1m"\nrealert_backoff = true', "realert_backoff = true needs realert"),
        ('kind = "absence"\nwindow = "1m"\nrealert = "0s"', "realert: must be at least 1s"),
        ('kind = "absence"\nwindow = "1m"\ntime_field = "evnt"', "time_field: Input should be 'receipt' or 'event'"),
        ('kind = "absence"\nwindow = "1m"\nmax_groups = 0', "max_groups: must be at least 1"),
        ('kind = "absence"\nwindow = "1m"\nsend_resolved = "no"', "send_resolved: Input should be a valid boolean"),
        ('kind = "absence"\nwindow = "1m"\nwindo = "2m"', 'unknown key "windo" (did you mean "window"?)'),
        ('kind = "change"\nwindow = "1m"\nfield = "price"\nby = "3"', 'by: expected a positive number (e.g. 0.5) or a percentage (e.g. "3%"), not "3"'),
        ('kind = "change"\nwindow = "1m"\nfield = "price"\nby = "-3%"', "by: expected a positive number"),
        ('kind = "change"\nwindow = "1m"\nfield = "price"\nby = 0', "by: expected a positive number"),
        ('kind = "change"\nwindow = "1m"\nby = "3%"', 'required key "field" is missing'),
        ('kind = "change"\nwindow = "1m"\nfield = "p"\nby = 1\nrealert = "1m"', "realert: a change rule sends one alert per move"),
    ],
)  # fmt: skip
def test_each_mistake_is_one_sentence_with_its_path(
    tmp_path: Path, keys: str, message: str
) -> None:
    found = problems(tmp_path, keys)
    assert len(found) == 1, found
    assert found[0].startswith('rules[0] "r"'), found
    assert message in found[0], found


def test_valid_rules_pass_and_by_keeps_its_form(tmp_path: Path) -> None:
    assert problems(tmp_path, 'kind = "change"\nwindow = "5m"\nfield = "a.b"\nby = "2.5%"') == []
    path = write_config(
        tmp_path / "ok.toml",
        '[[rules]]\nname = "r"\nkind = "change"\nwindow = "5m"\nfield = "p"\nby = "3%"\n',
    )
    (rule,) = load_config(path, make_registry(tocsin_rules)).rules
    assert '"by":"3%"' in rule.config.model_dump_json()  # in the rule's fingerprint


def test_a_sum_bound_may_be_a_string_for_more_digits_than_toml_holds(tmp_path: Path) -> None:
    # A TOML integer stops at 2**63 - 1 and a float keeps about 16 digits; a bound in a
    # token's smallest unit needs more (the rules audit).
    def bound(value: str) -> object:
        path = write_config(
            tmp_path / "sum.toml",
            f'[[rules]]\nname = "r"\nkind = "threshold"\nwindow = "1m"\nfield = "q"\nsum = {value}\n',
        )
        (rule,) = load_config(path, make_registry(tocsin_rules)).rules
        return rule.config.sum  # type: ignore[attr-defined]

    assert bound(f'"{2**64 + 1}"') == Decimal(2**64 + 1)
    assert bound('"1234567890123456789.25"') == Decimal("1234567890123456789.25")
    assert bound('" 1e30 "') == Decimal(10**30)
    assert bound("10000") == Decimal(10000) and bound("2.5") == Decimal("2.5")
    with pytest.raises(ConfigError) as err:
        bound('"1e30 wei"')
    (problem,) = err.value.problems
    assert (problem.file, problem.path) == (str(tmp_path / "sum.toml"), 'rules[0] "r": sum')
