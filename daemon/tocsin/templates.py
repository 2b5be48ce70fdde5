"""Sandboxed Jinja2 for rule ``when`` expressions and ``title``/``body`` templates.

Everything is compiled once when the config loads. Two layers keep a rule from reaching
Python internals: at load time, any attribute or item whose name starts with ``_`` (named
directly, as a filter's attribute argument, or in a ``str.format`` field) and the ``attr``
filter are refused with a config error; at run time, Jinja's
``ImmutableSandboxedEnvironment`` refuses what a computed name could still reach. The
sandbox also bounds what an event's values could blow up: ``**`` on integers and ``*``
repeating a string or a list (Jinja already bounds ``range``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

from jinja2 import ChainableUndefined, TemplateSyntaxError, nodes
from jinja2.exceptions import SecurityError
from jinja2.runtime import Context
from jinja2.sandbox import MAX_RANGE, ImmutableSandboxedEnvironment

_FORBIDDEN_FILTERS = frozenset({"attr"})
_FORBIDDEN_NAMES = frozenset({"format_map", "mro", "func_globals", "gi_frame", "cr_frame"})
# Filters (and tests) that read an attribute named by a string: which positional argument
# names it (None: only the ``attribute=`` keyword does).
_ATTRIBUTE_ARGS: dict[str, int | None] = {
    "selectattr": 0,
    "rejectattr": 0,
    "groupby": 0,
    "map": None,
    "sort": None,
    "unique": None,
    "min": None,
    "max": None,
    "sum": None,
}
# A format field reaching for an attribute or item that starts with "_": "{0.__class__}".
_FORMAT_ESCAPE = re.compile(r"\{[^{}]*[.\[]\s*_")
MAX_POWER_BITS = 4096
"""The largest integer ``**`` may make, in bits (a 1,234-digit number)."""
MAX_REPEAT = MAX_RANGE
"""The longest string or list ``*`` may make by repeating one."""

Expression = Callable[..., Any]


class TemplateProblem(ValueError):
    """A ``when``, ``title`` or ``body`` that cannot be compiled or is refused."""


class Sandbox(ImmutableSandboxedEnvironment):
    """Jinja's immutable sandbox, with ``**`` and ``*`` bounded (a ``SecurityError`` beyond)."""

    intercepted_binops = frozenset({"**", "*"})

    def call_binop(self, context: Context, operator: str, left: Any, right: Any) -> Any:
        if operator == "**":
            if (
                isinstance(left, int)
                and isinstance(right, int)
                and right > 0
                and abs(left) > 1
                and (abs(left).bit_length() - 1) * right > MAX_POWER_BITS
            ):
                raise SecurityError(f"** would make an integer beyond {MAX_POWER_BITS} bits")
            return left**right
        for seq, times in ((left, right), (right, left)):
            if (
                isinstance(seq, str | bytes | list | tuple)
                and isinstance(times, int)
                and len(seq) * times > MAX_REPEAT
            ):
                raise SecurityError(f"* would make a sequence longer than {MAX_REPEAT}")
        return left * right


def make_environment(
    filters: Mapping[str, Callable[..., Any]] | None = None,
) -> ImmutableSandboxedEnvironment:
    """A sandbox with the plugins' filters; undefined names are empty, never errors."""
    env = Sandbox(undefined=ChainableUndefined, autoescape=False)
    env.filters.update(dict(filters or {}))
    return env


def _refuse_escapes(tree: nodes.Node) -> None:
    kinds = (nodes.Getattr, nodes.Getitem, nodes.Filter, nodes.Test, nodes.Name, nodes.Call)
    for node in tree.find_all(kinds):
        names: list[object]
        if isinstance(node, nodes.Getattr):
            names = [node.attr]
        elif isinstance(node, nodes.Getitem):
            names = [node.arg.value if isinstance(node.arg, nodes.Const) else None]
        elif isinstance(node, nodes.Filter | nodes.Test):
            if isinstance(node, nodes.Filter) and node.name in _FORBIDDEN_FILTERS:
                raise TemplateProblem(f"the {node.name!r} filter is not allowed")
            names = _attribute_arguments(node)
        elif isinstance(node, nodes.Call):
            target = node.node
            if (
                isinstance(target, nodes.Getattr)
                and target.attr == "format"
                and isinstance(target.node, nodes.Const)
                and isinstance(target.node.value, str)
                and _FORMAT_ESCAPE.search(target.node.value)
            ):
                raise TemplateProblem(
                    f"{target.node.value!r} is not allowed: a format field may not reach"
                    " for a name that starts with '_'"
                )
            continue
        else:
            names = [getattr(node, "name", None)]
        for name in names:
            if isinstance(name, str) and (name.startswith("_") or name in _FORBIDDEN_NAMES):
                raise TemplateProblem(f"{name!r} is not allowed: rules see event data only")


def _attribute_arguments(node: nodes.Filter | nodes.Test) -> list[object]:
    """The dotted parts of the attribute a filter such as ``map(attribute=...)`` reads."""
    if node.name not in _ATTRIBUTE_ARGS:
        return []
    position = _ATTRIBUTE_ARGS[node.name]
    given = [kw.value for kw in node.kwargs if kw.key == "attribute"]
    if position is not None and len(node.args) > position:
        given.append(node.args[position])
    parts: list[object] = []
    for value in given:
        if isinstance(value, nodes.Const) and isinstance(value.value, str):
            parts.extend(value.value.split("."))
    return parts


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
