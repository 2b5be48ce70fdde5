"""Value types for config tables: durations, secrets, and the base of every config model.

Plugins declare their config as a ``ConfigModel`` subclass (pydantic, unknown keys
forbidden) using ``Duration`` and ``Secret`` where they fit. Secret references
(``{ env = "NAME" }``, ``{ file = "PATH" }``, ``{ credential = "NAME" }``) are resolved
before validation, anywhere in the file, by ``resolve_secret_refs``; a field typed
``Secret`` keeps the value masked (``str()`` and ``repr()`` are ``***``).
"""

from __future__ import annotations

import json
import math
import os
import re
import stat
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import unquote, unquote_plus, urlsplit

from pydantic import BaseModel, BeforeValidator, ConfigDict, PlainSerializer

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(value: object) -> float:
    """Seconds from ``"500ms"``, ``"30s"``, ``"5m"``, ``"1h30m"``, ``"7d"`` or a number."""
    if isinstance(value, bool):
        raise ValueError('a duration is a number of seconds or a string like "30s"')
    if isinstance(value, int | float):
        if not math.isfinite(value):
            raise ValueError("a duration must be a finite number of seconds")
        if value < 0:
            raise ValueError("a duration cannot be negative")
        return float(value)
    if isinstance(value, str):
        text = value.strip().replace(" ", "")
        pos, total = 0, 0.0
        for part in _DURATION_PART.finditer(text):
            if part.start() != pos:
                break
            total += float(part.group(1)) * _UNITS[part.group(2)]
            pos = part.end()
        if text and pos == len(text):
            return total
    raise ValueError(
        f"{value!r} is not a duration: use a number of seconds (unquoted) or units ms, s,"
        " m, h, d"
        ' (e.g. "500ms", "30s", "5m", "1h30m")'
    )


def format_duration(seconds: float) -> str:
    """The shortest exact duration string for ``seconds`` (``90`` -> ``"1m30s"``)."""
    if seconds < 1:
        return f"{round(seconds * 1000)}ms"
    out, rest = [], round(seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if rest >= size:
            out.append(f"{rest // size}{unit}")
            rest %= size
    return "".join(out) or "0s"


Duration = Annotated[float, BeforeValidator(parse_duration)]
"""A duration in seconds (float) that accepts ``"30s"``-style strings in config files."""


class _SecretRegistry:
    """Every secret value seen by this process, so log output can be scrubbed of them."""

    TRANSIENT = 64  # short-lived values kept: a login signature per reconnect

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values: tuple[str, ...] = ()  # longest first: a URL before its parts
        self._transient: tuple[str, ...] = ()

    def add(self, value: str, *, transient: bool = False) -> None:
        parts = [p for p in _secret_parts(value) if len(p) >= 4]  # shorter: ordinary words
        if not parts:
            return
        # As messages quote them too: repr() ('a\\b' in an error) and JSON (a JSON log line).
        escaped = [repr(p)[1:-1] for p in parts] + [json.dumps(p)[1:-1] for p in parts]
        escaped += [json.dumps(p, ensure_ascii=False)[1:-1] for p in parts]
        parts = list(dict.fromkeys(parts + escaped))
        with self._lock:
            if transient:
                fresh = [p for p in parts if p not in self._transient]
                self._transient = (*self._transient, *fresh)[-self.TRANSIENT :]
            else:
                known = set(self._values).union(parts)
                self._values = tuple(sorted(known, key=lambda v: (-len(v), v)))

    def scrub(self, text: str) -> str:
        # Longest first, so a secret containing another is masked whole, the same way
        # every time.
        for value in (*self._values, *self._transient):
            if value in text:
                text = text.replace(value, "***")
        return text


secret_registry = _SecretRegistry()


def _secret_parts(value: str) -> list[str]:
    """``value``, and for a URL the parts that carry its credentials on their own: a log
    line quotes a request line (``GET /path?apikey=...``), not the whole URL."""
    parts = [value]
    if "://" not in value:
        return parts
    try:
        url = urlsplit(value)
        password = url.password
    except ValueError:
        return parts
    if password:
        parts += [password, unquote(password)]
    if url.query:
        parts.append(url.query)
        for piece in url.query.split("&"):
            _, _, raw = piece.partition("=")
            parts += [raw, unquote_plus(raw)]
    # A token in the path (https://hooks.example.com/in/<token>): long segments only.
    parts += [s for s in url.path.split("/") if len(s) >= 16]
    return parts


def register_secret(value: str, *, transient: bool = False) -> None:
    """Scrub ``value`` from every log line too: for a derived form of a secret that goes on
    the wire (a base64 ``Authorization`` header, a URL-quoted token).

    ``transient`` is for a value made anew on each connection (a login signature over a
    timestamp): only the latest 64 of those are kept, so reconnecting for months does
    not make every log line slower.
    """
    secret_registry.add(value, transient=transient)


class SecretValue:
    """A secret string: ``str()``, ``repr()`` and formatting show ``***``; ``get()`` reveals."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value
        secret_registry.add(value)

    def get(self) -> str:
        """The real value, for the one place that sends it to the provider."""
        return self._value

    def __str__(self) -> str:
        return "***"

    __repr__ = __str__

    def __format__(self, spec: str) -> str:
        return "***"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SecretValue) and other._value == self._value

    def __hash__(self) -> int:
        return hash(("secret", self._value))


def _to_secret(value: object) -> SecretValue:
    if isinstance(value, SecretValue):
        return value
    if isinstance(value, str):
        return SecretValue(value)
    raise ValueError(
        'expected a string or { env = "NAME" }, { file = "PATH" }, { credential = "NAME" }'
    )


Secret = Annotated[
    SecretValue,
    BeforeValidator(_to_secret),
    PlainSerializer(lambda s: "***", return_type=str),
]
"""A config string that never prints; read it with ``.get()``."""


class ConfigModel(BaseModel):
    """Base of every config table: unknown keys are errors, values are immutable."""

    model_config = ConfigDict(
        extra="forbid", frozen=True, arbitrary_types_allowed=True, hide_input_in_errors=True
    )


SECRET_KINDS = ("env", "file", "credential")


MAX_SECRET = 64 * 1024
"""The largest secret file read (a key, a token or a URL: far less)."""


def read_regular_file(path: Path, limit: int) -> bytes:
    """The bytes of ``path``, a regular file of at most ``limit`` bytes, else ``OSError``
    with a reason: a FIFO would block, ``/dev/zero`` never end."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as handle:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(0, "not a regular file")
        data = handle.read(limit + 1)
    if len(data) > limit:
        raise OSError(0, f"larger than {limit // 1024} KiB")
    return data


class SecretUnavailable(ValueError):
    """A secret this process cannot read, where the service may: a variable not set, a
    file it may not open, a credential outside the service. ``kind`` is the reference's."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def _read_secret(kind: str, name: object, environ: dict[str, str], base: Path | None) -> str:
    if not isinstance(name, str) or not name:
        raise ValueError(f"{kind}: expected a non-empty string")
    if kind == "env":
        if name not in environ:
            raise SecretUnavailable(kind, f"environment variable {name} is not set")
        if not environ[name]:
            raise ValueError(f"environment variable {name} is empty")
        return environ[name]
    if kind == "credential":
        directory = environ.get("CREDENTIALS_DIRECTORY")
        if not directory:
            raise SecretUnavailable(
                kind,
                f"credential {name}: $CREDENTIALS_DIRECTORY is not set (use LoadCredential= in"
                " the unit)",
            )
        if "/" in name or name in (".", ".."):
            raise ValueError(f"credential {name!r}: a credential's name has no '/'")
        path = Path(directory) / name
    else:
        path = Path(name).expanduser()
        if not path.is_absolute() and base is not None:
            path = base / path  # relative to the config file, as include and state_dir
    try:
        text = read_regular_file(path, MAX_SECRET).decode("utf-8").rstrip("\r\n")
    except (FileNotFoundError, PermissionError) as err:
        raise SecretUnavailable(
            kind, f"cannot read secret file {str(path)!r}: {err.strerror}"
        ) from None
    except OSError as err:
        raise ValueError(f"cannot read secret file {str(path)!r}: {err.strerror}") from None
    except UnicodeDecodeError:
        raise ValueError(f"secret file {str(path)!r} is not UTF-8 text") from None
    if not text:
        raise ValueError(f"secret file {str(path)!r} is empty")
    return text


# Tables whose keys are the user's data, so never a secret reference themselves (a rule's
# match may test a field named env, file or credential); their values may be.
_DATA_TABLES = re.compile(r"rules\[\d+\]\.match")


def resolve_secret_refs(
    value: Any,
    on_error: Callable[[str, ValueError], None],
    path: str = "",
    environ: dict[str, str] | None = None,
    base: Path | None = None,
) -> Any:
    """Replace every secret reference table in ``value`` by the secret's text (a rule's
    ``match`` is not one: its keys are data). A relative ``file`` is read from ``base``.

    ``on_error(path, error)`` is called for each reference that cannot be resolved (a
    ``SecretUnavailable`` when it may be readable elsewhere); its value becomes ``""``, so
    validation goes on and reports the rest.
    """
    env = dict(os.environ) if environ is None else environ
    if isinstance(value, dict):
        if len(value) == 1 and not _DATA_TABLES.fullmatch(path):
            ((kind, name),) = value.items()
            if kind in SECRET_KINDS:
                try:
                    text = _read_secret(kind, name, env, base)
                except ValueError as err:
                    on_error(path, err)
                    return ""
                secret_registry.add(text)
                return text
        return {
            k: resolve_secret_refs(v, on_error, f"{path}.{k}" if path else str(k), env, base)
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [
            resolve_secret_refs(v, on_error, f"{path}[{i}]", env, base) for i, v in enumerate(value)
        ]
    return value
