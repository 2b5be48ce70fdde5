"""Log setup: one line per record on stderr, each with its level, secrets scrubbed.

Every formatted line (message, arguments and traceback alike) passes through the secret
registry, so a library's debug log (websockets prints the request line with its query
string) cannot leak a key either.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import orjson

from .fields import secret_registry

LEVELS = ("debug", "info", "warning", "error")


class ScrubbingFormatter(logging.Formatter):
    """Text lines: ``time LEVEL logger: message``, secrets replaced by ``***``."""

    def format(self, record: logging.LogRecord) -> str:
        return secret_registry.scrub(super().format(record)).replace("\n", "\n  ")


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
    # Quiet chatty libraries unless the user asked for debug.
    for name in ("websockets", "aiohttp", "apprise", "asyncio"):
        logging.getLogger(name).setLevel(logging.DEBUG if level == "debug" else logging.WARNING)
