"""Sandboxed Jinja2 for rule ``when`` expressions and ``title``/``body`` templates.

Everything is compiled once when the config loads. Two layers keep a rule from reaching
Python internals: at load time, any attribute or item whose name starts with ``_`` (named
directly, as a filter's attribute argument, or in a ``str.format`` field) and the ``attr``
filter are refused with a config error; at run time, Jinja's
``ImmutableSandboxedEnvironment`` refuses what a computed name could still reach.

One evaluation is bounded in time and size, whatever the rule and the event's values:

- time: ``EVAL_SECONDS``, checked by a ``SIGVTALRM`` timer on the main thread, where the
  daemon's event loop runs (a signal no other part uses: ``SIGALRM`` is the usual choice
  of test runners), and ``MAX_ITEMS`` items drawn from ``range`` in all;
- size: ``**`` on integers, ``*`` repeating a string or a list (and the text a repeated
  list holds), a width or precision in ``%`` and ``str.format`` (or a ``format`` filter),
  the width of ``center``, ``ljust``, ``rjust``, ``zfill``, ``indent``, and what ``replace``
  and ``join`` may make, each alone and ``MAX_CHARS`` in all; a template's output is cut
  off at ``MAX_OUTPUT``.

Past a bound the evaluation fails: a ``when`` is false and a template shows its error,
each counted as the rule's error (SPEC section 3), and the engine goes on.
"""

from __future__ import annotations

import atexit
import re
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from string import Formatter
from typing import Any

from jinja2 import ChainableUndefined, TemplateSyntaxError, nodes
from jinja2.exceptions import SecurityError
from jinja2.runtime import Context
from jinja2.sandbox import MAX_RANGE, ImmutableSandboxedEnvironment
from jinja2.sandbox import SandboxedFormatter as _SandboxFormatter

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
MAX_WIDTH = MAX_RANGE
"""The largest width or precision a format, or ``center`` and its kin, may ask for."""
MAX_ITEMS = 1_000_000
"""Items all the ``range`` objects of one evaluation may give, in all."""
MAX_TEXT = 1_000_000
"""The most characters the strings of a list repeated with ``*`` may add up to, and the
longest string ``join`` may make."""
MAX_CHARS = 4_000_000
"""The characters the bounded operations of one evaluation may make, in all: many
operations each within their bound must not add up to gigabytes."""
MAX_OUTPUT = 64 * 1024
"""The most characters a ``title`` or ``body`` may render to."""
EVAL_SECONDS = 0.25
"""The longest one ``when`` or template may run."""

_WIDTH_METHODS = frozenset({"center", "ljust", "rjust", "zfill", "expandtabs"})
# A printf conversion after its "%" and its "(key)": the width and precision may be "*"
# (taken from the arguments).
_PRINTF = re.compile(r"[-#0 +]*(?P<width>\*|\d+)?(?:\.(?P<prec>\*|\d+))?[hlL]?(?P<conv>.?)")
_SPEC = re.compile(r"^(?:.?[<>=^])?[-+ ]?z?#?0?(?P<width>\d*)[_,]?(?:\.(?P<prec>\d+))?")

Expression = Callable[..., Any]


class Overrun(Exception):
    """An evaluation went past one of the bounds above."""


# -- time ------------------------------------------------------------------------------


class _Budget(threading.local):
    """What the evaluation under way on this thread may still draw from ``range``, and
    the characters its bounded operations may still make."""

    items = MAX_ITEMS
    chars = MAX_CHARS


def _charge(chars: int, what: str) -> None:
    """Count ``chars`` made by one operation against the evaluation's budget."""
    _budget.chars -= chars
    if _budget.chars < 0:
        raise Overrun(f"{what}: more than {MAX_CHARS} characters made in one evaluation")


class _Clock:
    """The main thread's evaluation timer. A periodic ``SIGVTALRM`` (every ``TICK`` of
    CPU) is armed by the first evaluation and left running while evaluations follow each
    other; the first tick that finds none under way stops it. So an evaluation costs no
    system call, only when a burst of them starts does one."""

    armed = False
    running = False  # an evaluation is under way
    started = 0.0  # when it started (monotonic)


TICK = 0.05
_budget = _Budget()
_clock = _Clock()  # the main thread's alone: only it gets signals
_MAIN_THREAD = threading.main_thread().ident


def _tick(signum: int, frame: object) -> None:
    if not _clock.running:
        _stop()
    elif time.monotonic() - _clock.started >= EVAL_SECONDS:
        raise Overrun(f"took more than {EVAL_SECONDS * 1000:g} ms")


def _timer_ready() -> bool:
    """Whether the main thread can time an evaluation: another owner of ``SIGVTALRM``
    keeps it (the evaluation then goes untimed)."""
    handler = signal.getsignal(signal.SIGVTALRM)
    if handler is _tick:
        return True
    if handler in (signal.SIG_DFL, None):
        signal.signal(signal.SIGVTALRM, _tick)
        atexit.register(_stop)  # before Python puts back the default action (exit)
        return True
    return False


def _stop() -> None:
    signal.setitimer(signal.ITIMER_VIRTUAL, 0)
    _clock.armed = False


def bounded(func: Callable[..., Any]) -> Callable[..., Any]:
    """``func`` run with a fresh ``range`` budget, and within ``EVAL_SECONDS``."""

    def run(*args: Any, **kwargs: Any) -> Any:
        _budget.items = MAX_ITEMS
        _budget.chars = MAX_CHARS
        clock = _clock
        if clock.running or threading.get_ident() != _MAIN_THREAD:
            return func(*args, **kwargs)  # nested (the outer clock holds), or not timed
        if not clock.armed:
            if not _timer_ready():
                return func(*args, **kwargs)
            signal.setitimer(signal.ITIMER_VIRTUAL, TICK, TICK)
            clock.armed = True
        clock.started = time.monotonic()
        clock.running = True
        try:
            return func(*args, **kwargs)
        finally:
            clock.running = False

    return run


class _Range:
    """``range`` for rules: a real range whose items are drawn from the budget."""

    def __init__(self, *args: int) -> None:
        self._range = range(*args)
        if len(self._range) > MAX_RANGE:
            raise SecurityError(f"range too big (more than {MAX_RANGE} items)")

    def __iter__(self) -> Iterator[int]:
        for item in self._range:
            _budget.items -= 1
            if _budget.items < 0:
                raise Overrun(f"more than {MAX_ITEMS} items drawn from range")
            yield item

    def __reversed__(self) -> Iterator[int]:
        return iter(self[::-1])

    def __len__(self) -> int:
        return len(self._range)

    def __contains__(self, item: object) -> bool:
        return item in self._range

    def __getitem__(self, index: Any) -> Any:
        value = self._range[index]
        if not isinstance(value, range):
            return value
        part = _Range.__new__(_Range)  # a slice: no bigger, and drawn from the same budget
        part._range = value
        return part

    def __repr__(self) -> str:
        return repr(self._range)


# -- size ------------------------------------------------------------------------------


def _check_width(value: object, what: str) -> None:
    if isinstance(value, int):
        if value > MAX_WIDTH:
            raise SecurityError(f"{what} of {value} is beyond {MAX_WIDTH}")
        _charge(max(value, 0), what)


def _check_printf(template: str, values: object) -> None:
    """Refuse a ``%`` format whose widths or precisions (written, or taken from
    ``values`` for ``*``) are beyond ``MAX_WIDTH``."""
    args = list(values) if isinstance(values, tuple) else [values]
    position = 0
    for conversion in _conversions(template):
        if conversion["conv"] == "%":
            continue
        for part in ("width", "prec"):
            given = conversion[part]
            if given == "*":
                taken = args[position] if position < len(args) else None
                position += 1
                _check_width(taken, f"a % format's {part}")
            elif given:
                _check_width(int(given), f"a % format's {part}")
        position += 1


def _conversions(template: str) -> Iterator[re.Match[str]]:
    """The conversions of a ``%`` format, each past its ``%`` and its ``(key)``: a key
    may hold balanced parentheses, as CPython reads it."""
    at = template.find("%")
    while at >= 0:
        at += 1
        if template.startswith("(", at):
            depth = 0
            for end in range(at, len(template)):
                depth += {"(": 1, ")": -1}.get(template[end], 0)
                if depth == 0:
                    break
            else:
                return  # an unclosed key: Python refuses the format itself
            at = end + 1
        conversion = _PRINTF.match(template, at)
        assert conversion is not None  # every part of it is optional
        yield conversion
        at = template.find("%", conversion.end())


def _text_size(value: Any) -> int:
    """About how many characters ``str(value)`` makes (at least that many), without
    making it: a list's text holds its items'."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, list | tuple | set | frozenset):
        return sum(_text_size(item) + 2 for item in value)
    if isinstance(value, dict):
        return sum(_text_size(k) + _text_size(v) + 4 for k, v in value.items())
    return 8  # a number, None, a bool, an Undefined...


def _joined(items: list[Any], separator: str = "") -> None:
    """Refuse a join that would make more than ``MAX_TEXT`` characters."""
    size = sum(_text_size(item) for item in items) + len(separator) * max(len(items) - 1, 0)
    if size > MAX_TEXT:
        raise SecurityError(f"join would make a string longer than {MAX_TEXT}")
    _charge(size, "join")


def _replace(text: str, old: str, new: str, count: int = -1) -> str:
    if len(new) > len(old):
        times = text.count(old) if old else len(text) + 1
        if count >= 0:
            times = min(times, count)
        if len(text) + times * (len(new) - len(old)) > MAX_REPEAT:
            raise SecurityError(f"replace would make a string longer than {MAX_REPEAT}")
        _charge(len(text) + times * (len(new) - len(old)), "replace")
    return text.replace(old, new, count)


class _BoundedFormatter(Formatter):
    """The sandbox's ``str.format`` formatter, with widths and precisions bounded."""

    def __init__(self, formatter: Formatter) -> None:
        super().__init__()
        self._inner = formatter

    def get_field(self, field_name: str, args: Any, kwargs: Any) -> Any:
        return self._inner.get_field(field_name, args, kwargs)

    def format_field(self, value: Any, format_spec: str) -> Any:
        spec = _SPEC.match(format_spec)
        if spec is not None:
            for part in ("width", "prec"):
                if spec[part]:
                    _check_width(int(spec[part]), f"a format's {part}")
        return super().format_field(value, format_spec)


class TemplateProblem(ValueError):
    """A ``when``, ``title`` or ``body`` that cannot be compiled or is refused."""


class Sandbox(ImmutableSandboxedEnvironment):
    """Jinja's immutable sandbox, with what an operation may make bounded (the module
    docstring says what; a ``SecurityError`` beyond). An intercepted operator is never
    folded at compile time either: a constant one is bounded at load, as an event's."""

    intercepted_binops = frozenset({"**", "*", "%"})

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        wrapped = super().wrap_str_format(value)
        if wrapped is None:
            return None
        fmt: str = value.__self__
        formatter = _BoundedFormatter(_SandboxFormatter(self))
        if value.__name__ == "format_map":
            return lambda mapping: formatter.vformat(fmt, (), mapping)
        return lambda *args, **kwargs: formatter.vformat(fmt, args, kwargs)

    def getattr(self, obj: Any, attribute: str) -> Any:
        value = super().getattr(obj, attribute)
        if isinstance(obj, str) and attribute in _WIDTH_METHODS:
            method = value

            def width_bounded(width: Any = 8, *args: Any) -> Any:
                _check_width(width, f"the width of {attribute}")
                return method(width, *args)

            return width_bounded
        if isinstance(obj, str) and attribute == "replace":
            return lambda old, new, count=-1: _replace(obj, old, new, count)
        if isinstance(obj, str) and attribute == "join":

            def join(items: Any) -> str:
                items = list(items)
                _joined(items, obj)
                return obj.join(items)

            return join
        return value

    def call_binop(self, context: Context, operator: str, left: Any, right: Any) -> Any:
        if operator == "%":
            if isinstance(left, str):
                _check_printf(left, right)
            return left % right
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
            if isinstance(seq, str | bytes | list | tuple) and isinstance(times, int):
                if len(seq) * times > MAX_REPEAT:
                    raise SecurityError(f"* would make a sequence longer than {MAX_REPEAT}")
                if isinstance(seq, list | tuple):  # [s] * n, then joined, is n copies of s
                    if _text_size(seq) * times > MAX_TEXT:
                        raise SecurityError(f"* would repeat more than {MAX_TEXT} characters")
                elif isinstance(seq, str):
                    _charge(len(seq) * max(times, 0), "*")
        return left * right


def make_environment(
    filters: Mapping[str, Callable[..., Any]] | None = None,
) -> ImmutableSandboxedEnvironment:
    """A sandbox with the plugins' filters; undefined names are empty, never errors."""
    env = Sandbox(undefined=ChainableUndefined, autoescape=False)
    env.globals["range"] = _Range
    builtin = dict(env.filters)

    def format_filter(value: Any, *args: Any, **kwargs: Any) -> str:
        _check_printf(str(value), kwargs or tuple(args))
        return str(builtin["format"](value, *args, **kwargs))

    def center(value: Any, width: int = 80) -> str:
        _check_width(width, "the width of center")
        return str(builtin["center"](value, width))

    def indent(value: Any, width: Any = 4, *args: Any, **kwargs: Any) -> str:
        _check_width(len(width) if isinstance(width, str) else width, "an indent")
        return str(builtin["indent"](value, width, *args, **kwargs))

    def replace(eval_ctx: Any, value: Any, old: Any, new: Any, count: Any = None) -> str:
        return _replace(str(value), str(old), str(new), -1 if count is None else count)

    replace.jinja_pass_arg = builtin["replace"].jinja_pass_arg  # type: ignore[attr-defined]

    def join(eval_ctx: Any, value: Any, d: str = "", attribute: Any = None) -> str:
        items = list(value)
        if attribute is None:  # (with one, the items' attributes are joined: smaller)
            _joined(items, d)
        return str(builtin["join"](eval_ctx, items, d, attribute))

    join.jinja_pass_arg = builtin["join"].jinja_pass_arg  # type: ignore[attr-defined]
    env.filters.update(
        format=format_filter, center=center, indent=indent, replace=replace, join=join
    )
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
        return bounded(env.compile_expression(source, undefined_to_none=False))
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

    def render(context: Mapping[str, Any]) -> str:
        pieces, size = [], 0
        for piece in template.generate(context):
            size += len(piece)
            if size > MAX_OUTPUT:
                raise Overrun(f"renders to more than {MAX_OUTPUT} characters")
            pieces.append(piece)
        return "".join(pieces)

    return bounded(render)
