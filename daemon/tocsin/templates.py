"""Sandboxed Jinja2 for rule ``when`` expressions and ``title``/``body`` templates.

Everything is compiled once when the config loads. Two layers keep a rule from reaching
Python internals: at load time, any attribute or item whose name starts with ``_`` and
the ``attr`` filter are refused with a config error; at run time, Jinja's
``ImmutableSandboxedEnvironment`` refuses what a computed name could still reach.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from jinja2 import ChainableUndefined, TemplateSyntaxError, nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

_FORBIDDEN_FILTERS = frozenset({"attr"})
_FORBIDDEN_NAMES = frozenset({"format_map", "mro", "func_globals", "gi_frame", "cr_frame"})

Expression = Callable[..., Any]


class TemplateProblem(ValueError):
    """A ``when``, ``title`` or ``body`` that cannot be compiled or is refused."""


def make_environment(
    filters: Mapping[str, Callable[..., Any]] | None = None,
) -> ImmutableSandboxedEnvironment:
    """A sandbox with the plugins' filters; undefined names are empty, never errors."""
    env = ImmutableSandboxedEnvironment(undefined=ChainableUndefined, autoescape=False)
    env.filters.update(dict(filters or {}))
    return env


def _refuse_escapes(tree: nodes.Node) -> None:
    for node in tree.find_all((nodes.Getattr, nodes.Getitem, nodes.Filter, nodes.Name)):
        if isinstance(node, nodes.Getattr):
            name: object = node.attr
        elif isinstance(node, nodes.Getitem):
            name = node.arg.value if isinstance(node.arg, nodes.Const) else None
        elif isinstance(node, nodes.Filter):
            if node.name in _FORBIDDEN_FILTERS:
                raise TemplateProblem(f"the {node.name!r} filter is not allowed")
            continue
        else:
            name = getattr(node, "name", None)
        if isinstance(name, str) and (name.startswith("_") or name in _FORBIDDEN_NAMES):
            raise TemplateProblem(f"{name!r} is not allowed: rules see event data only")


def compile_expression(env: ImmutableSandboxedEnvironment, source: str) -> Expression:
    """Compile a ``when`` expression; raises ``TemplateProblem`` with a clear reason."""
    try:
        _refuse_escapes(env.parse("{{ (" + source + ") }}"))
        return env.compile_expression(source, undefined_to_none=False)
    except TemplateSyntaxError as err:
        raise TemplateProblem(f"invalid expression: {err.message}") from None


def compile_template(
    env: ImmutableSandboxedEnvironment, source: str
) -> Callable[[Mapping[str, Any]], str]:
    """Compile a ``title`` or ``body`` template; raises ``TemplateProblem``."""
    try:
        _refuse_escapes(env.parse(source))
        template = env.from_string(source)
    except TemplateSyntaxError as err:
        raise TemplateProblem(f"invalid template: {err.message} (line {err.lineno})") from None
    return template.render
