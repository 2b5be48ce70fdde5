"""Building the plugin manager and the registry of what plugins provide.

There is no global plugin manager: ``make_plugin_manager`` builds one and callers pass it
down (tests build one with exactly the plugins they need).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any, TypeVar

import pluggy

from . import hookspecs
from .action import Action
from .emulator import Emulator
from .errors import PluginError
from .rulekind import RuleKind
from .source import Source

ENTRY_POINT_GROUP = "tocsin"

T = TypeVar("T")


def make_plugin_manager(
    plugins: Iterable[object] = (), *, load_entry_points: bool = True
) -> pluggy.PluginManager:
    """A fresh plugin manager with ``plugins`` and (unless told not to) installed ones.

    ``TOCSIN_LOAD_PLUGINS=a,b`` limits the entry points loaded to those names (empty: none).
    """
    pm = pluggy.PluginManager(ENTRY_POINT_GROUP)
    pm.add_hookspecs(hookspecs)
    if load_entry_points:
        limit = os.environ.get("TOCSIN_LOAD_PLUGINS")
        allowed = None if limit is None else {n.strip() for n in limit.split(",") if n.strip()}
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            if allowed is not None and ep.name not in allowed:
                continue
            if pm.get_plugin(ep.name) is not None:
                continue
            try:
                plugin = ep.load()
            except Exception as err:
                raise PluginError(f"plugin {ep.name!r} ({ep.value}) failed to load: {err}") from err
            pm.register(plugin, name=ep.name)
    for plugin in plugins:
        # Readable names for error messages: a module's name, else the object's class name.
        name = getattr(plugin, "__name__", None) or type(plugin).__name__
        base, n = name, 1
        while pm.has_plugin(name):
            n += 1
            name = f"{base}#{n}"
        pm.register(plugin, name=name)
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as err:
        raise PluginError(str(err)) from err
    return pm


@dataclass
class Registered:
    """Something a plugin registered, and which plugin did."""

    obj: Any
    plugin: str


@dataclass
class Registry:
    """Everything the loaded plugins provide, by name."""

    sources: dict[str, Registered] = field(default_factory=dict)
    actions: dict[str, Registered] = field(default_factory=dict)
    rule_kinds: dict[str, Registered] = field(default_factory=dict)
    filters: dict[str, Registered] = field(default_factory=dict)
    emulators: dict[str, Registered] = field(default_factory=dict)

    def source(self, name: str) -> type[Source]:
        return self.sources[name].obj  # type: ignore[no-any-return]

    def action(self, name: str) -> type[Action]:
        return self.actions[name].obj  # type: ignore[no-any-return]

    def rule_kind(self, name: str) -> type[RuleKind]:
        return self.rule_kinds[name].obj  # type: ignore[no-any-return]

    def emulator(self, name: str) -> type[Emulator]:
        return self.emulators[name].obj  # type: ignore[no-any-return]

    def filter_functions(self) -> dict[str, Callable[..., Any]]:
        return {name: r.obj for name, r in self.filters.items()}


def _collect(
    pm: pluggy.PluginManager,
    hook_name: str,
    what: str,
    into: dict[str, Registered],
    named: Callable[[Any], str],
    arity: int = 1,
) -> None:
    for impl in getattr(pm.hook, hook_name).get_hookimpls():

        def register(*args: Any, _plugin: str = impl.plugin_name) -> None:
            if len(args) != arity:
                raise PluginError(
                    f"plugin {_plugin!r}: {hook_name} register() takes {arity} argument(s)"
                )
            obj = args[-1]
            name = named(args)
            if not isinstance(name, str) or not name:
                raise PluginError(f"plugin {_plugin!r} registered a {what} without a name")
            if name in into:
                raise PluginError(
                    f"{what} {name!r} is registered twice: by plugin {into[name].plugin!r}"
                    f" and by plugin {_plugin!r}"
                )
            into[name] = Registered(obj, _plugin)

        try:
            impl.function(register=register)
        except PluginError:
            raise
        except Exception as err:
            raise PluginError(
                f"plugin {impl.plugin_name!r} failed in {hook_name}: {err!r}"
            ) from err


def build_registry(pm: pluggy.PluginManager) -> Registry:
    """Call every registration hook; a name registered twice is an error naming both plugins."""
    reg = Registry()
    _collect(pm, "register_sources", "source plugin", reg.sources, lambda a: a[0].name)
    _collect(pm, "register_actions", "action plugin", reg.actions, lambda a: a[0].name)
    _collect(pm, "register_rule_kinds", "rule kind", reg.rule_kinds, lambda a: a[0].name)
    _collect(pm, "register_template_filters", "template filter", reg.filters, lambda a: a[0], 2)
    _collect(pm, "register_emulators", "emulator", reg.emulators, lambda a: a[0].name)
    return reg


def plugin_versions(pm: pluggy.PluginManager) -> dict[str, str]:
    """Plugin name -> version of the distribution that installed it (``-`` if unknown)."""
    installed = {
        ep.name: ep.dist.version for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.dist
    }
    return {name: installed.get(name, "-") for name, _ in pm.list_name_plugin()}
