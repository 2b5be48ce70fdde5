"""Building the plugin manager and the registry of what plugins provide.

There is no global plugin manager: ``make_plugin_manager`` builds one and callers pass it
down (tests build one with exactly the plugins they need).
"""

from __future__ import annotations

import difflib
import inspect
import logging
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from importlib.metadata import EntryPoint, entry_points
from typing import Any, TypeVar

import pluggy

from . import hookspecs
from .action import Action, ActionConfig
from .emulator import Emulator
from .errors import PluginError
from .rulekind import RuleConfig, RuleKind
from .source import Source, SourceConfig

ENTRY_POINT_GROUP = "tocsin"

log = logging.getLogger(__name__)

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
            except (Exception, SystemExit) as err:  # sys.exit() at import too
                raise PluginError(
                    f"plugin {ep.name!r} ({ep.value}) failed to load: {_one_line(err)}"
                ) from err
            _register(pm, plugin, ep.name)
        unknown = sorted(
            (allowed or set()) - {ep.name for ep in entry_points(group=ENTRY_POINT_GROUP)}
        )
        if unknown:  # a typo would otherwise leave a plugin out with no word
            log.warning(
                "TOCSIN_LOAD_PLUGINS names %s, which no installed plugin is",
                ", ".join(repr(n) for n in unknown),
            )
    for plugin in plugins:
        # Readable names for error messages: a module's name, else the object's class name.
        name = getattr(plugin, "__name__", None) or type(plugin).__name__
        base, n = name, 1
        while pm.has_plugin(name):
            n += 1
            name = f"{base}#{n}"
        _register(pm, plugin, name)
    _check_pending(pm)
    return pm


def _check_pending(pm: pluggy.PluginManager) -> None:
    """pluggy's ``check_pending``, saying which plugin and which hook it may have meant."""
    for name in pm.hook.__dict__:
        if name.startswith("_"):
            continue
        hook = getattr(pm.hook, name)
        if hook.has_spec():
            continue
        for impl in hook.get_hookimpls():
            if not impl.optionalhook:
                hooks = [h for h in dir(hookspecs) if h.startswith("register_")]
                close = difflib.get_close_matches(name, hooks, n=1, cutoff=0.6)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise PluginError(f"plugin {impl.plugin_name!r}: unknown hook {name!r}{hint}")


def _one_line(err: BaseException) -> str:
    """``TypeName: message`` on one line (a message may span several), at most 300 chars."""
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text[:300]}" if text else type(err).__name__


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
    config: type | None = None,
) -> None:
    article = "an" if what[0] in "aeiou" else "a"
    for impl in getattr(pm.hook, hook_name).get_hookimpls():
        if inspect.iscoroutinefunction(impl.function):
            raise PluginError(
                f"plugin {impl.plugin_name!r}: {hook_name} must be a plain function, not async"
            )

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
            if config is not None and not (
                isinstance(obj.Config, type) and issubclass(obj.Config, config)
            ):
                raise PluginError(
                    f"plugin {_plugin!r}: {hook_name} registered {obj.__name__}, whose Config"
                    f" is not a subclass of tocsin.{config.__name__}"
                )
            if base is None and not callable(obj):
                raise PluginError(
                    f"plugin {_plugin!r}: {hook_name} registered {obj!r}, not a function"
                )
            try:
                name = named(args)
            except AttributeError:
                raise PluginError(
                    f"plugin {_plugin!r} registered {article} {what} without a name"
                ) from None
            if not isinstance(name, str) or not name:
                raise PluginError(f"plugin {_plugin!r} registered {article} {what} without a name")
            if name in into:
                raise PluginError(
                    f"{what} {name!r} is registered twice: by plugin {into[name].plugin!r}"
                    f" and by plugin {_plugin!r}"
                )
            into[name] = Registered(obj, _plugin)

        try:
            result = impl.function(register=register)
        except PluginError:
            raise
        except (Exception, SystemExit) as err:  # sys.exit() in a hook too
            raise PluginError(
                f"plugin {impl.plugin_name!r} failed in {hook_name}: {_one_line(err)}"
            ) from err
        if inspect.isawaitable(result):  # a plain function returning a coroutine
            if inspect.iscoroutine(result):
                result.close()
            raise PluginError(
                f"plugin {impl.plugin_name!r}: {hook_name} must register, not return an awaitable"
            )


def build_registry(pm: pluggy.PluginManager) -> Registry:
    """Call every registration hook; a name registered twice is an error naming both plugins."""
    reg = Registry()
    name = lambda a: a[0].name  # noqa: E731
    _collect(
        pm, "register_sources", "source plugin", reg.sources, name, base=Source, config=SourceConfig
    )
    _collect(
        pm, "register_actions", "action plugin", reg.actions, name, base=Action, config=ActionConfig
    )
    _collect(
        pm,
        "register_rule_kinds",
        "rule kind",
        reg.rule_kinds,
        name,
        base=RuleKind,
        config=RuleConfig,
    )
    _collect(pm, "register_template_filters", "template filter", reg.filters, lambda a: a[0], 2)
    _collect(pm, "register_emulators", "emulator", reg.emulators, name, base=Emulator)
    return reg


def plugin_versions(pm: pluggy.PluginManager) -> dict[str, str]:
    """Plugin name -> version of the distribution that installed it (``-`` if unknown)."""
    installed = {
        ep.name: ep.dist.version for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.dist
    }
    return {name: installed.get(name, "-") for name, _ in pm.list_name_plugin()}
