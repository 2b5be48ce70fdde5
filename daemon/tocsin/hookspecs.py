"""The markers and every hook a tocsin plugin can implement.

Hooks are synchronous and called once when the daemon (or a command) builds its
registry; the async work lives in the classes they register (``Source.run``,
``Action.deliver``). Each registration hook receives a ``register`` callback.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pluggy

from .action import Action
from .emulator import Emulator
from .rulekind import RuleKind
from .source import Source

hookspec = pluggy.HookspecMarker("tocsin")
hookimpl = pluggy.HookimplMarker("tocsin")


@hookspec
def register_sources(register: Callable[[type[Source]], None]) -> None:
    """Register source classes: call ``register(SourceClass)`` for each.

    ``SourceClass.name`` is the value users write as ``plugin = "..."`` in a
    ``[sources.NAME]`` table. Called once per registry build.
    """


@hookspec
def register_actions(register: Callable[[type[Action]], None]) -> None:
    """Register action classes: call ``register(ActionClass)`` for each.

    ``ActionClass.name`` is the ``plugin = "..."`` value of an ``[actions.NAME]`` table
    (``webhook``, ``apprise`` and ``log`` are built in).
    """


@hookspec
def register_rule_kinds(register: Callable[[type[RuleKind]], None]) -> None:
    """Register rule kinds: call ``register(RuleKindClass)`` for each.

    ``RuleKindClass.name`` is the ``kind = "..."`` value of a rule (``match`` is built in).
    """


@hookspec
def register_template_filters(register: Callable[[str, Callable[..., Any]], None]) -> None:
    """Register Jinja filters for ``when``, ``title`` and ``body``: ``register(name, func)``.

    Filters run inside the sandbox on event data; they must be pure and must not raise
    on unexpected input (return None instead).
    """


@hookspec
def register_emulators(register: Callable[[type[Emulator]], None]) -> None:
    """Register provider emulators: call ``register(EmulatorClass)`` for each.

    ``EmulatorClass.name`` is the provider's plugin name, as in ``tocsin emulate NAME``;
    ``tocsin demo -c FILE`` starts the emulator of each source in ``FILE``.
    """
