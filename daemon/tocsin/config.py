"""Loading and validating the config file: every problem at once, with file and path.

The file is read with tomli (tomllib's own upstream, compiled: 0.11 against 0.37 s for
10,000 rules); ``[daemon] include`` globs add files holding ``[[rules]]``.
Secret references are resolved first (``fields.resolve_secret_refs``); each source and
action table is then validated by its plugin's ``Config`` model, each rule by its kind's.
Cross-references (sources, actions, event types, kinds) are checked last, with a
did-you-mean for misspelled names. Nothing is half-loaded: ``load_config`` returns a
complete ``Config`` or raises ``ConfigError`` listing every problem.
"""

from __future__ import annotations

import contextlib
import difflib
import gc
import glob
import ipaddress
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import tomli
from pydantic import BaseModel, Field, ValidationError, field_validator

from .action import ActionConfig
from .errors import ConfigError, Problem
from .events import DAEMON_EVENT_TYPES
from .fields import (
    ConfigModel,
    Duration,
    read_regular_file,
    resolve_secret_refs,
    secret_registry,
)
from .plugins import Registry
from .rulekind import RuleConfig
from .source import SourceConfig
from .templates import TemplateProblem, compile_expression, compile_template, make_environment

DEFAULT_CONFIG = "/etc/tocsin/tocsin.toml"
TOP_LEVEL_KEYS = ("daemon", "sources", "actions", "rules")
MAX_CONFIG = 16 * 1024 * 1024
"""The largest config (or included) file read: thousands of rules are far less."""


class DaemonConfig(ConfigModel):
    """The ``[daemon]`` table."""

    state_dir: str | None = None
    http: str | None = None
    http_allow_remote: bool = False
    include: list[str] = []
    dedup_horizon: Duration = Field(default=7 * 86400.0, gt=0)
    fsync: bool = False
    queue_size: int = Field(default=10_000, ge=10, le=1_000_000)
    drain_timeout: Duration = Field(default=20.0, ge=0)
    source_processes: bool = False
    """Each source runs in a process of its own (``sourceproc``): for busy feeds."""

    @field_validator("http")
    @classmethod
    def _http_address(cls, value: str | None) -> str | None:
        if value is not None:
            host, _, port = value.rpartition(":")
            if not host or not (port.isascii() and port.isdigit()) or not 0 <= int(port) < 65536:
                raise ValueError(f'expected "HOST:PORT", e.g. "127.0.0.1:9187", not {value!r}')
        return value

    def http_address(self) -> tuple[str, int] | None:
        """``http`` as (host, port), the brackets of ``[::1]`` taken off; None when unset."""
        if self.http is None:
            return None
        host, _, port = self.http.rpartition(":")
        return host.removeprefix("[").removesuffix("]"), int(port)

    def resolved_state_dir(self, environ: Mapping[str, str] | None = None) -> Path:
        """``state_dir``, else ``$STATE_DIRECTORY`` (systemd), else ``~/.local/state/tocsin``."""
        env = os.environ if environ is None else environ
        if self.state_dir:
            return Path(self.state_dir).expanduser()
        if env.get("STATE_DIRECTORY"):
            return Path(env["STATE_DIRECTORY"].split(":")[0])
        return Path("~/.local/state/tocsin").expanduser()


@dataclass
class RuleEntry:
    """A validated rule, where it was written, and its compiled ``when``/``title``/``body``."""

    config: RuleConfig
    file: str
    index: int
    compiled: dict[str, Callable[..., Any]] = field(default_factory=dict)

    @property
    def where(self) -> str:
        return f'rules[{self.index}] "{self.config.name}"'


@dataclass
class Config:
    """A complete, valid config."""

    path: Path
    daemon: DaemonConfig
    sources: dict[str, SourceConfig] = field(default_factory=dict)
    actions: dict[str, ActionConfig] = field(default_factory=dict)
    rules: list[RuleEntry] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)
    # Secrets left unchecked (``load_config(unchecked=...)``): the tables holding them are
    # left out of ``sources`` and ``actions``.
    notes: list[Problem] = field(default_factory=list)


def is_loopback(host: str) -> bool:
    """Whether ``host`` is ``localhost`` or an address in 127.0.0.0/8 or ``::1``."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # another host name: it may resolve to anything


def did_you_mean(name: str, candidates: Iterable[str]) -> str:
    """`` (did you mean "x"?)`` when a candidate is close to ``name``, else ``""``."""
    close = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.6)
    return f' (did you mean "{close[0]}"?)' if close else ""


def _loc(parts: Iterable[int | str]) -> str:
    out = ""
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _model_at(model: type[BaseModel], loc: tuple[int | str, ...]) -> type[BaseModel] | None:
    """The nested model class that a validation error's location points into."""
    current: type[BaseModel] | None = model
    for part in loc:
        if current is None:
            return None
        if isinstance(part, int):
            continue
        info = current.model_fields.get(part)
        if info is None:
            return None
        annotation = info.annotation
        candidates = [annotation, *getattr(annotation, "__args__", ())]
        current = next(
            (c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None
        )
    return current


def problems_from(
    err: ValidationError, model: type[BaseModel], file: str, prefix: str, sep: str = "."
) -> list[Problem]:
    """Turn a pydantic error into problems with paths; never includes the input value."""
    out = []
    for item in err.errors(include_url=False, include_input=False, include_context=False):
        loc = tuple(item["loc"])
        kind = item["type"]
        if kind == "extra_forbidden":
            owner = _model_at(model, loc[:-1])
            known = owner.model_fields if owner else {}
            key = str(loc[-1])
            message = f'unknown key "{key}"' + did_you_mean(key, known)
            loc = loc[:-1]
        elif kind == "missing":
            message = f'required key "{loc[-1]}" is missing'
            loc = loc[:-1]
        else:
            message = (
                str(item["msg"]).removeprefix("Value error, ").removeprefix("Assertion failed, ")
            )
        path = _loc(loc)
        if prefix and path and not path.startswith("["):
            full = f"{prefix}{sep}{path}"
        else:
            full = prefix + path
        out.append(Problem(file, full, message))
    return out


class _Loader:
    def __init__(
        self,
        registry: Registry,
        environ: Mapping[str, str] | None,
        unchecked: Callable[[str, ValueError], bool] | None = None,
    ) -> None:
        self.registry = registry
        self.unchecked = unchecked
        self.notes: list[Problem] = []
        self.environ = dict(os.environ if environ is None else environ)
        self.problems: list[Problem] = []
        # (file, path) of each secret reference that could not be read: its value is "",
        # and what validation then says of that path would only repeat the problem.
        self.unresolved: set[tuple[str, str]] = set()
        self.source_plugins: dict[str, str | None] = {}  # every [sources.X], valid or not
        self.action_names: set[str] = set()
        self.env = make_environment(registry.filter_functions())
        self._compiled: dict[tuple[str, str], Callable[..., Any]] = {}

    def compile(self, key: str, source: str) -> Callable[..., Any]:
        """Compile a ``when``/``title``/``body`` once per distinct text (rules share them)."""
        kind = "when" if key == "when" else "template"
        found = self._compiled.get((kind, source))
        if found is None:
            compiler = compile_expression if kind == "when" else compile_template
            found = self._compiled[(kind, source)] = compiler(self.env, source)
        return found

    def problem(self, file: str, path: str, message: str) -> None:
        self.problems.append(Problem(file, path, message))

    def read(self, path: Path, *, resolve: bool = True) -> dict[str, Any] | None:
        """A TOML file, its secret references resolved (unless ``resolve`` is false)."""
        name = str(path)
        try:
            raw = tomli.loads(read_regular_file(path, MAX_CONFIG).decode("utf-8"))
        except FileNotFoundError:
            self.problem(name, "", "no such file")
            return None
        except OSError as err:
            self.problem(name, "", f"cannot read: {err.strerror}")
            return None
        except tomli.TOMLDecodeError as err:
            self.problem(name, "", f"invalid TOML: {err}")
            return None
        except UnicodeDecodeError as err:
            self.problem(name, "", f"not UTF-8 text (byte {err.start}); TOML files are UTF-8")
            return None
        return self.resolve(raw, name) if resolve else raw

    def resolve(self, raw: dict[str, Any], file: str, path: str = "") -> dict[str, Any]:
        def unresolved(at: str, error: ValueError) -> None:
            self.unresolved.add((file, at))
            if self.unchecked is not None and self.unchecked(at, error):
                self.notes.append(Problem(file, at, f"not checked here: {error}"))
            else:
                self.problem(file, at, str(error))

        return resolve_secret_refs(  # type: ignore[no-any-return]
            raw, unresolved, path, environ=self.environ, base=Path(file).parent
        )

    def validate(
        self, model: type[BaseModel], raw: object, file: str, prefix: str, sep: str = "."
    ) -> BaseModel | None:
        try:
            return model.model_validate(raw)
        except ValidationError as err:
            found = problems_from(err, model, file, prefix, sep)
            self.problems.extend(p for p in found if (p.file, p.path) not in self.unresolved)
            return None
        except Exception as err:  # a plugin's validator raised what pydantic does not catch
            # Masked before it is cut or its spaces collapsed: a secret with a newline (a
            # PEM key) or cut in two would no longer be found whole.
            reason = " ".join(secret_registry.scrub(str(err)).split())[:300] or "no reason given"
            self.problem(file, prefix, f"{model.__name__} failed: {type(err).__name__}: {reason}")
            return None

    def plugin_table(
        self, what: str, raw: object, file: str, path: str, known: Mapping[str, Any]
    ) -> BaseModel | None:
        if not isinstance(raw, dict):
            self.problem(file, path, f"expected a table ([{path}])")
            return None
        plugin = raw.get("plugin")
        if not isinstance(plugin, str):
            self.problem(file, path, 'required key "plugin" is missing')
            return None
        if plugin not in known:
            hint = did_you_mean(plugin, known) or (
                f" (installed: {', '.join(sorted(known))})" if known else " (none installed)"
            )
            self.problem(file, f"{path}.plugin", f'unknown {what} plugin "{plugin}"{hint}')
            return None
        return self.validate(known[plugin].obj.Config, raw, file, path)


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector while a config is read and its rules compiled.

    Loading builds many long-lived objects at once, and every full pass the collector
    makes meanwhile walks all of them again: paused, ``tocsin check`` on 10,000 rules
    took a third less time.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def load_config(
    path: str | os.PathLike[str],
    registry: Registry,
    environ: Mapping[str, str] | None = None,
    *,
    unchecked: Callable[[str, ValueError], bool] | None = None,
) -> Config:
    """Read, resolve and validate the config at ``path`` and its includes.

    Raises ``ConfigError`` with every problem found. Templates are compiled by the rule
    engine (``rules.compile_rules``), which adds its problems the same way. A secret that
    cannot be read for which ``unchecked(path, error)`` is true is a note (``Config.notes``),
    not a problem, and the source or action holding it is left out: for commands that
    do not need it (``tocsin test``) or cannot read it (a credential outside systemd).
    """
    with collector_paused():
        return _load_config(path, registry, environ, unchecked)


def _load_config(
    path: str | os.PathLike[str],
    registry: Registry,
    environ: Mapping[str, str] | None = None,
    unchecked: Callable[[str, ValueError], bool] | None = None,
) -> Config:
    loader = _Loader(registry, environ, unchecked)
    main = Path(path)
    name = str(main)
    raw = loader.read(main)
    if raw is None:
        raise ConfigError(loader.problems)
    for key in raw:
        if key not in TOP_LEVEL_KEYS:
            loader.problem(
                name, "", f'unknown table or key "{key}"' + did_you_mean(key, TOP_LEVEL_KEYS)
            )

    daemon = loader.validate(DaemonConfig, raw.get("daemon", {}), name, "daemon")
    if not isinstance(daemon, DaemonConfig):
        # Go on with the includes anyway, so their problems are reported in the same run.
        include = (
            raw.get("daemon", {}).get("include") if isinstance(raw.get("daemon"), dict) else None
        )
        ok = isinstance(include, list) and all(isinstance(i, str) for i in include)
        daemon = DaemonConfig.model_construct(include=include if ok else [])
    config = Config(path=main, daemon=_anchored(daemon, main))
    daemon = config.daemon
    config.files.append(main)
    address = daemon.http_address()
    if address is not None and not daemon.http_allow_remote and not is_loopback(address[0]):
        loader.problem(
            name,
            "daemon.http",
            f'"{address[0]}" is not a loopback address (127.0.0.0/8, ::1, localhost): the'
            " status page and metrics would be open to the network; set"
            " http_allow_remote = true to serve them there anyway",
        )

    for kind, known, into in (
        ("source", registry.sources, config.sources),
        ("action", registry.actions, config.actions),
    ):
        table = raw.get(kind + "s", {})
        if not isinstance(table, dict):
            loader.problem(name, kind + "s", f"expected a table of {kind}s")
            continue
        for item_name, item in table.items():
            if kind == "source":
                plugin = item.get("plugin") if isinstance(item, dict) else None
                known_plugin = isinstance(plugin, str) and plugin in known
                loader.source_plugins[item_name] = plugin if known_plugin else None
            else:
                loader.action_names.add(item_name)
            model = loader.plugin_table(kind, item, name, f"{kind}s.{item_name}", known)
            if model is not None:
                into[item_name] = model  # type: ignore[assignment]

    rule_tables: list[tuple[str, int, Any]] = []
    _collect_rules(loader, raw, name, rule_tables)
    for pattern in config.daemon.include:
        full = pattern if os.path.isabs(pattern) else str(main.parent / pattern)
        matches = sorted(glob.glob(os.path.expanduser(full)))
        if not matches and not glob.has_magic(pattern):
            loader.problem(name, "daemon.include", f"no such file: {pattern}")
        for match in matches:
            if Path(match).resolve() == main.resolve():  # "*.toml" beside it: not itself
                continue
            included = loader.read(Path(match))
            if included is None:
                continue
            config.files.append(Path(match))
            for key in included:
                if key != "rules":
                    loader.problem(
                        match, "", f'only [[rules]] may appear in an included file, not "{key}"'
                    )
            _collect_rules(loader, included, match, rule_tables)

    _validate_rules(loader, config, rule_tables)
    if loader.problems:
        raise ConfigError(loader.problems, loader.notes)
    config.notes = loader.notes
    return config


def _anchored(daemon: DaemonConfig, main: Path) -> DaemonConfig:
    """``daemon`` with a relative ``state_dir`` taken from the config file's folder."""
    if daemon.state_dir and not os.path.isabs(os.path.expanduser(daemon.state_dir)):
        return daemon.model_copy(update={"state_dir": str(main.parent / daemon.state_dir)})
    return daemon


def load_daemon_config(
    path: str | os.PathLike[str], registry: Registry, environ: Mapping[str, str] | None = None
) -> DaemonConfig:
    """The ``[daemon]`` table of the config at ``path`` alone: what ``tocsin outbox`` needs.

    The secrets of sources and actions are not read: a config using ``{ credential = ...
    }`` has them only inside its unit (``LoadCredential=``), and the outbox is looked at
    from a shell. Problems elsewhere in the file are ``tocsin check``'s to report.
    """
    loader = _Loader(registry, environ)
    main = Path(path)
    name = str(main)
    raw = loader.read(main, resolve=False)
    table = raw.get("daemon", {}) if raw is not None else None
    daemon: BaseModel | None = None
    if isinstance(table, dict):
        daemon = loader.validate(
            DaemonConfig, loader.resolve(table, name, "daemon"), name, "daemon"
        )
    elif table is not None:
        loader.problem(name, "daemon", "expected a table ([daemon])")
    if loader.problems or not isinstance(daemon, DaemonConfig):
        raise ConfigError(loader.problems)
    return _anchored(daemon, main)


def _collect_rules(
    loader: _Loader, raw: dict[str, Any], file: str, into: list[tuple[str, int, Any]]
) -> None:
    rules = raw.get("rules", [])
    if not isinstance(rules, list):
        loader.problem(file, "rules", "expected an array of tables ([[rules]])")
        return
    into.extend((file, i, rule) for i, rule in enumerate(rules))


def _names(value: list[str] | None) -> list[str]:
    return list(value or [])


def _validate_rules(loader: _Loader, config: Config, tables: list[tuple[str, int, Any]]) -> None:
    kinds = loader.registry.rule_kinds
    seen: dict[str, tuple[str, str]] = {}
    for file, index, raw in tables:
        if not isinstance(raw, dict):
            loader.problem(file, f"rules[{index}]", "expected a table")
            continue
        label = raw.get("name") if isinstance(raw.get("name"), str) else None
        where = f'rules[{index}] "{label}"' if label else f"rules[{index}]"
        kind = raw.get("kind", "match")
        if not isinstance(kind, str):
            loader.problem(file, f"{where}: kind", "expected the name of a rule kind")
        elif kind not in kinds:
            loader.problem(
                file,
                f"{where}: kind",
                f'unknown rule kind "{kind}"' + did_you_mean(kind, kinds),
            )
        if label in seen:
            first_file, first_where = seen[label]
            loader.problem(
                file, where, f"duplicate rule name (first in {first_file}: {first_where})"
            )
        elif label:
            seen[label] = (file, where)
        # A rule of an unknown kind is not validated (its keys are the kind's), but it is
        # still cross-checked below, so one run lists every problem.
        known_kind = isinstance(kind, str) and kind in kinds
        model = (
            loader.validate(kinds[kind].obj.Config, raw, file, where, ": ") if known_kind else None
        )
        # An invalid rule is still cross-checked, so one run lists every problem.
        rule = model if isinstance(model, RuleConfig) else _lenient(raw)
        _check_references(loader, config, rule, file, where)
        compiled = {}
        for key in ("when", "title", "body"):
            text = getattr(rule, key)
            if isinstance(text, str):
                try:
                    compiled[key] = loader.compile(key, text)
                except TemplateProblem as err:
                    loader.problem(file, f"{where}: {key}", str(err))
        if isinstance(model, RuleConfig):
            config.rules.append(RuleEntry(model, file, index, compiled))


def _lenient(raw: dict[str, Any]) -> SimpleNamespace:
    """The parts of an invalid rule that are well-formed enough to cross-check."""

    def names(key: str) -> list[str] | None:
        value = raw.get(key)
        if isinstance(value, str):
            return [value]
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return value
        return None

    match = raw.get("match")
    return SimpleNamespace(
        when=raw.get("when"),
        title=raw.get("title"),
        body=raw.get("body"),
        source=names("source"),
        type=names("type"),
        actions=names("actions"),
        match=match if isinstance(match, dict) else {},
        group_by=names("group_by") or [],
    )


def _check_references(loader: _Loader, config: Config, rule: Any, file: str, where: str) -> None:
    registry = loader.registry
    all_sources = loader.source_plugins
    sources = _names(rule.source)
    for name in sources:
        if name not in all_sources:
            loader.problem(
                file,
                f"{where}: source",
                f'unknown source "{name}"' + did_you_mean(name, all_sources),
            )
    known_types: set[str] = set(DAEMON_EVENT_TYPES)
    selected = [all_sources[n] for n in (sources or list(all_sources)) if n in all_sources]
    checkable = bool(selected) and None not in selected
    for plugin in selected:
        if plugin is not None:
            types = registry.source(plugin).event_types
            checkable = checkable and bool(types)
            known_types.update(types)
    if checkable:
        for name in _names(rule.type):
            if name not in known_types:
                loader.problem(
                    file,
                    f"{where}: type",
                    f'unknown event type "{name}"' + did_you_mean(name, known_types),
                )
    for name in rule.actions or []:
        if name not in loader.action_names:
            loader.problem(
                file,
                f"{where}: actions",
                f'unknown action "{name}"' + did_you_mean(name, loader.action_names),
            )
    for key, value in rule.match.items():
        if not key or any(not part for part in key.split(".")):
            loader.problem(file, f"{where}: match", f'"{key}" is not a dotted path like "args.to"')
        if isinstance(value, list) and not value:
            loader.problem(file, f"{where}: match.{key}", "an empty list can never match")
    for key in rule.group_by:
        if not key or any(not part for part in key.split(".")):
            loader.problem(
                file, f"{where}: group_by", f'"{key}" is not a dotted path like "args.from"'
            )
