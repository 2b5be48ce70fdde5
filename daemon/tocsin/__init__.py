"""tocsin: an alerting daemon for WebSocket push APIs.

This module is the public API for plugin authors; everything else is private.
"""

from __future__ import annotations

from .action import Action, ActionConfig, Alert, RetryPolicy, Target
from .emulator import Emulator, WebSocketEmulator
from .errors import (
    ConfigError,
    DeliveryError,
    PermanentDelivery,
    PluginError,
    Problem,
    RetryableDelivery,
    SourceAuthError,
    SourceError,
    TocsinError,
)
from .events import (
    DAEMON_EVENT_TYPES,
    Event,
    Numbering,
    RecentIds,
    get_path,
    split_path,
    stable_id,
    to_json,
    utc_iso,
    wire_number,
)
from .fields import (
    ConfigModel,
    Duration,
    Secret,
    SecretValue,
    format_duration,
    parse_duration,
    register_secret,
)
from .hookspecs import hookimpl, hookspec
from .rulekind import Firing, RuleConfig, RuleKind
from .source import (
    Backoff,
    EventFactory,
    FrameParser,
    ResumableSourceConfig,
    Source,
    SourceConfig,
    SourceContext,
)
from .wsclient import (
    BatchedConnection,
    ScrubbingLogger,
    closed_for_size,
    failure_reason,
    parse_json,
    printable,
)

__all__ = [
    "DAEMON_EVENT_TYPES",
    "Action",
    "ActionConfig",
    "Alert",
    "Backoff",
    "BatchedConnection",
    "ConfigError",
    "ConfigModel",
    "DeliveryError",
    "Duration",
    "Emulator",
    "Event",
    "EventFactory",
    "Firing",
    "FrameParser",
    "Numbering",
    "PermanentDelivery",
    "PluginError",
    "Problem",
    "RecentIds",
    "ResumableSourceConfig",
    "RetryPolicy",
    "RetryableDelivery",
    "RuleConfig",
    "RuleKind",
    "ScrubbingLogger",
    "Secret",
    "SecretValue",
    "Source",
    "SourceAuthError",
    "SourceConfig",
    "SourceContext",
    "SourceError",
    "Target",
    "TocsinError",
    "WebSocketEmulator",
    "__version__",
    "closed_for_size",
    "failure_reason",
    "format_duration",
    "get_path",
    "hookimpl",
    "hookspec",
    "parse_duration",
    "parse_json",
    "printable",
    "register_secret",
    "split_path",
    "stable_id",
    "to_json",
    "utc_iso",
    "wire_number",
]

__version__ = "0.1.0"
