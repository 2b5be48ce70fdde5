"""The plugins tocsin ships with: the ``match`` rule kind, the ``webhook``, ``apprise``
and ``log`` actions, and the template filters. Registered through the ``tocsin``
entry-point group exactly as a third-party plugin would be."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tocsin import Action, RuleKind, hookimpl

from .match import MatchKind


@hookimpl
def register_rule_kinds(register: Callable[[type[RuleKind]], None]) -> None:
    register(MatchKind)


@hookimpl
def register_actions(register: Callable[[type[Action]], None]) -> None:
    from .apprise_action import AppriseAction
    from .log_action import LogAction
    from .webhook import WebhookAction

    register(WebhookAction)
    register(AppriseAction)
    register(LogAction)


@hookimpl
def register_template_filters(register: Callable[[str, Callable[..., Any]], None]) -> None:
    from .filters import FILTERS

    for name, func in FILTERS.items():
        register(name, func)
