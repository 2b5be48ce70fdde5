"""Every exception tocsin raises on purpose.

    TocsinError
    ├── ConfigError            the config (or a rule in it) is invalid; carries every problem
    ├── PluginError            plugins could not be loaded or registered (duplicate names...)
    ├── UsageError             the command line is wrong (exit 2, one sentence)
    ├── StateError             the state database cannot be opened or written
    ├── ServeError             the [daemon] http endpoint cannot listen (address in use...)
    ├── SourceError            a source failed
    │   └── SourceAuthError    the provider refused the credentials (only the user can fix it)
    └── DeliveryError          an action failed to deliver an alert
        ├── RetryableDelivery  try again later (optionally not before ``retry_after`` seconds)
        └── PermanentDelivery  retrying cannot help: dead-letter it at once

Library exceptions are translated at the boundary with ``raise ... from err``, so users
read one sentence and never a traceback for a config or usage error.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from .fields import secret_registry


class TocsinError(Exception):
    """Base of every tocsin error."""


@dataclass(frozen=True, order=True)
class Problem:
    """One problem in a config: the file, the path inside it, and what is wrong."""

    file: str
    path: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}: {self.path}" if self.path else self.file
        # A message may quote a value that came from a secret reference ("not a duration:
        # '...'"): every secret the config resolved is masked, here where all are printed.
        return secret_registry.scrub(f"{where}: {self.message}")


class ConfigError(TocsinError):
    """The config is invalid; ``problems`` lists every problem found, not just the first."""

    def __init__(self, problems: Iterable[Problem], notes: Iterable[Problem] = ()) -> None:
        self.problems = list(problems)
        self.notes = list(notes)  # secrets left unchecked (``load_config(unchecked=...)``)
        super().__init__("\n".join(str(p) for p in self.problems))


class PluginError(TocsinError):
    """Plugins could not be loaded or registered."""


class UsageError(TocsinError):
    """The command line is wrong."""


class StateError(TocsinError):
    """The state database cannot be opened or written."""


class ServeError(TocsinError):
    """The ``[daemon] http`` endpoint cannot listen on its address; start-up stops."""


class SourceError(TocsinError):
    """A source failed; the supervisor reconnects with backoff."""


class SourceAuthError(SourceError):
    """The provider refused the credentials; retried only every ``max_backoff``."""


class DeliveryError(TocsinError):
    """An action failed to deliver an alert."""


class RetryableDelivery(DeliveryError):
    """The delivery may succeed later; ``retry_after`` (seconds) is the provider's wish."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class PermanentDelivery(DeliveryError):
    """Retrying cannot help: the delivery is dead-lettered at once."""
