"""Log setup: one line per record on stderr, each with its level, secrets scrubbed.

Every formatted line (message, arguments and traceback alike) passes through the secret
registry, so a library's debug log (websockets prints the request line with its query
string) cannot leak a key either.
"""

from __future__ import annotations

import logging
import sys
import threading
from typing import Any

import orjson

from .fields import secret_registry

LEVELS = ("debug", "info", "warning", "error")


class ScrubbingFormatter(logging.Formatter):
    """Text lines: ``time LEVEL logger: message``, secrets replaced by ``***``.

    One line per record, tracebacks included (their lines joined by `` | ``): journald
    stores each line of stderr as an entry of its own, and a continuation line would have
    no level.
    """

    def format(self, record: logging.LogRecord) -> str:
        text = secret_registry.scrub(super().format(record))
        return " | ".join(line for line in text.splitlines() if line.strip())


class JSONFormatter(logging.Formatter):
    """One JSON object per line, secrets scrubbed."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": self.formatTime(record),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:  # a source's process formatted it (sourceproc)
            entry["exception"] = record.exc_text
        return secret_registry.scrub(orjson.dumps(entry).decode())


def setup_logging(level: str = "info", fmt: str = "text", stream: Any = None) -> None:
    """Configure the root logger once for a command."""
    handler = logging.StreamHandler(stream or sys.stderr)
    if fmt == "json":
        handler.setFormatter(JSONFormatter())
    else:
        handler.setFormatter(ScrubbingFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # An uncaught exception's traceback goes through the scrubbing handler too, not
    # Python's default printer, so a secret in a local repr never reaches the journal.
    crash = logging.getLogger("tocsin.crash")
    sys.excepthook = lambda kind, value, tb: crash.critical(
        "uncaught exception", exc_info=(kind, value, tb)
    )
    threading.excepthook = lambda args: crash.critical(
        "uncaught exception in thread %s",
        getattr(args.thread, "name", "?"),
        exc_info=(args.exc_type, args.exc_value, args.exc_traceback),  # type: ignore[arg-type]
    )
    quiet_libraries(level == "debug")


def quiet_libraries(debug: bool) -> None:
    """Quiet chatty libraries unless the user asked for debug."""
    for name in ("websockets", "aiohttp", "apprise", "asyncio"):
        logging.getLogger(name).setLevel(logging.DEBUG if debug else logging.WARNING)
