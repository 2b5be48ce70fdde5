"""The ``log`` action: one line per alert through the ``tocsin.alerts`` logger.

It is what ``tocsin demo`` prints to the terminal and a sink that cannot fail, for rules
one is still tuning.
"""

from __future__ import annotations

import logging
from typing import ClassVar, Literal

from tocsin import Action, ActionConfig, Alert, to_json

# A fixed name rather than __name__: users route or silence alert lines by this name.
alerts_log = logging.getLogger("tocsin.alerts")

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}

# A title or body is rendered from provider data: escaping line breaks keeps each alert
# on one line, so a crafted value cannot forge further log lines.
_ONE_LINE = str.maketrans({"\r": "\\r", "\n": "\\n", "\x85": "\\x85", "\u2028": "\\u2028"})


class LogConfig(ActionConfig):
    """``[actions.NAME]`` with ``plugin = "log"``."""

    level: Literal["debug", "info", "warning", "error"] = "warning"
    format: Literal["text", "json"] = "text"


def format_alert(alert: Alert, form: Literal["text", "json"]) -> str:
    """The line logged for ``alert``: ``ALERT [status] rule: title — body``, or its JSON."""
    if form == "json":
        # default=str: the event holds provider data; the log line must never fail on it.
        return to_json(alert.payload()).decode("utf-8")
    line = f"ALERT [{alert.status}] {alert.rule}: {alert.title}"
    if alert.body:
        line += f" — {alert.body}"
    return line.translate(_ONE_LINE)


class LogAction(Action):
    """Write each alert as one log line; never fails, so never retried."""

    name = "log"
    Config: ClassVar[type[ActionConfig]] = LogConfig

    def __init__(self, name: str, config: ActionConfig) -> None:
        if not isinstance(config, LogConfig):
            raise TypeError(f"{type(self).__name__} needs a LogConfig")
        super().__init__(name, config)
        self._level = _LEVELS[config.level]
        self._format: Literal["text", "json"] = config.format

    async def deliver(self, alert: Alert, target: str) -> None:
        """Log the alert's line."""
        try:
            line = format_alert(alert, self._format)
        except Exception:  # an event orjson cannot encode even with default=str
            line = format_alert(alert, "text")
        alerts_log.log(
            self._level,
            "%s",
            line,
            extra={"alert_id": alert.id, "alert_status": alert.status, "action": self.instance},
        )
