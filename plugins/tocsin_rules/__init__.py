"""tocsin-rules: the stateful rule kinds ``threshold``, ``absence`` and ``change``.

Written against the public API only (``from tocsin import ...``), as a third party would:
each kind keeps its state per ``group_by`` key, wakes its groups from a deadline heap on
the engine's ticks, and hands its state to the engine's state database, so an unchanged
rule keeps its windows and firing alerts across a restart or a reload.
"""

from __future__ import annotations

from collections.abc import Callable

from tocsin import RuleKind, hookimpl

from .absence import AbsenceKind
from .change import ChangeKind
from .config import AbsenceConfig, ChangeConfig, ThresholdConfig
from .threshold import ThresholdKind

__all__ = [
    "AbsenceConfig",
    "AbsenceKind",
    "ChangeConfig",
    "ChangeKind",
    "ThresholdConfig",
    "ThresholdKind",
]


@hookimpl
def register_rule_kinds(register: Callable[[type[RuleKind]], None]) -> None:
    """``kind = "threshold"``, ``"absence"`` and ``"change"`` in a ``[[rules]]`` entry."""
    register(ThresholdKind)
    register(AbsenceKind)
    register(ChangeKind)
