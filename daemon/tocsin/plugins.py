"""Building the plugin manager and the registry of what plugins provide.

There is no global plugin manager: ``make_plugin_manager`` builds one and callers pass it
down (tests build one with exactly the plugins they need).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from importlib.metadata import EntryPoint, entry_points
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
        loaded: dict[str, EntryPoint] = {}
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            if allowed is not None and ep.name not in allowed:
                continue
            first = loaded.get(ep.name)
            if first is not None:
                if first.value == ep.value:
                    continue  # one distribution seen twice on the path
                raise PluginError(
                    f"plugin name {ep.name!r} is installed twice: by {_origin(first)} and by"
                    f" {_origin(ep)}; uninstall one, or rename its entry point"
                )
            loaded[ep.name] = ep
            try:
                plugin = ep.load()
            except Exception as err:
                raise PluginError(f"plugin {ep.name!r} ({ep.value}) failed to load: {err}") from err
            _register(pm, plugin, ep.name)
    for plugin in plugins:
        # Readable names for error messages: a module's name, else the object's class name.
        name = getattr(plugin, "__name__", None) or type(plugin).__name__
        base, n = name, 1
        while pm.has_plugin(name):
            n += 1
            name = f"{base}#{n}"
        _register(pm, plugin, name)
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as err:
        raise PluginError(str(err)) from err
    return pm


def _register(pm: pluggy.PluginManager, plugin: object, name: str) -> None:
    # pluggy checks each hook implementation's arguments here (a misspelt one).
    try:
        pm.register(plugin, name=name)
    except pluggy.PluginValidationError as err:
        # One line: pluggy's message spans three ("... for hook 'x'", the definition, why).
        lines = str(err).splitlines() or [""]
        hook = re.search(r"for hook '(\w+)'", lines[0])
        where = f" in {hook.group(1)}" if hook else ""
        raise PluginError(f"plugin {name!r}{where}: {lines[-1]}") from err


def _origin(ep: EntryPoint) -> str:
    """``tocsin-extras 1.2 (tocsin_extras.plugin)``: who installed an entry point."""
    dist = f"{ep.dist.name} {ep.dist.version} " if ep.dist is not None else ""
    return f"{dist}({ep.value})"


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
    base: type | None = None,
) -> None:
    for impl in getattr(pm.hook, hook_name).get_hookimpls():

        def register(*args: Any, _plugin: str = impl.plugin_name) -> None:
            if len(args) != arity:
                raise PluginError(
                    f"plugin {_plugin!r}: {hook_name} register() takes {arity} argument(s)"
                )
            obj = args[-1]
            if base is not None and not (isinstance(obj, type) and issubclass(obj, base)):
                raise PluginError(
                    f"plugin {_plugin!r}: {hook_name} registered {obj!r}, not a subclass of"
                    f" tocsin.{base.__name__}"
                )
            if base is None and not callable(obj):
                raise PluginError(
                    f"plugin {_plugin!r}: {hook_name} registered {obj!r}, not a function"
                )
            try:
                name = named(args)
            except AttributeError:
                raise PluginError(
                    f"plugin {_plugin!r} registered a {what} without a name"
                ) from None
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
    name = lambda a: a[0].name  # noqa: E731
    _collect(pm, "register_sources", "source plugin", reg.sources, name, base=Source)
    _collect(pm, "register_actions", "action plugin", reg.actions, name, base=Action)
    _collect(pm, "register_rule_kinds", "rule kind", reg.rule_kinds, name, base=RuleKind)
    _collect(pm, "register_template_filters", "template filter", reg.filters, lambda a: a[0], 2)
    _collect(pm, "register_emulators", "emulator", reg.emulators, name, base=Emulator)
    return reg


def plugin_versions(pm: pluggy.PluginManager) -> dict[str, str]:
    """Plugin name -> version of the distribution that installed it (``-`` if unknown)."""
    installed = {
        ep.name: ep.dist.version for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.dist
    }
    return {name: installed.get(name, "-") for name, _ in pm.list_name_plugin()}
