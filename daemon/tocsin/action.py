"""The base class of every action, its config, the retry policy, and the alert it delivers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from pydantic import Field

from .fields import ConfigModel, Duration


class RetryPolicy(ConfigModel):
    """``retry = { attempts, backoff, max_backoff, max_age }`` on every action."""

    attempts: int = Field(default=10, ge=1, le=1000)
    backoff: Duration = Field(default=1.0, gt=0)
    max_backoff: Duration = Field(default=300.0, gt=0)
    max_age: Duration = Field(default=86400.0, gt=0)


class ActionConfig(ConfigModel):
    """Keys every action takes; plugins subclass it with their own."""

    plugin: str
    retry: RetryPolicy = RetryPolicy()
    concurrency: int = Field(default=4, ge=1, le=256)


@dataclass(frozen=True, slots=True)
class Alert:
    """A committed alert: what every action receives.

    ``id`` is the idempotency key: the same alert id is never delivered twice to an action
    that acknowledged it.
    """

    id: str
    status: str  # "firing", "resolved" or "retracted"
    rule: str
    title: str
    body: str
    fired_at: str
    event: dict[str, Any]

    def payload(self) -> dict[str, Any]:
        """The JSON body of the webhook action (SPEC section 5)."""
        return {
            "id": self.id,
            "status": self.status,
            "rule": self.rule,
            "title": self.title,
            "body": self.body,
            "fired_at": self.fired_at,
            "event": self.event,
        }


@dataclass(frozen=True, slots=True)
class Target:
    """One delivery destination of an action: each target is its own outbox entry.

    ``key`` is stored in the state database (never a secret); ``label`` is shown to people
    (for Apprise, the URL in its privacy form).
    """

    key: str
    label: str


class Action:
    """Where alerts go. Subclasses set ``name`` and ``Config`` and implement ``deliver``.

    ``deliver`` raises ``RetryableDelivery`` (optionally with ``retry_after``) when a later
    try may succeed and ``PermanentDelivery`` when it cannot; any other exception counts as
    retryable. Retries, backoff and dead letters are the outbox's job, not the action's.
    """

    name: ClassVar[str]
    Config: ClassVar[type[ActionConfig]] = ActionConfig

    def __init__(self, name: str, config: ActionConfig) -> None:
        self.instance = name
        self.config = config

    def targets(self) -> list[Target]:
        """The destinations an alert fans out to; one by default."""
        return [Target("", self.instance)]

    async def start(self) -> None:
        """Open pools and clients; called once before the first delivery."""

    async def aclose(self) -> None:
        """Release what ``start`` opened."""

    async def deliver(self, alert: Alert, target: str) -> None:
        """Deliver ``alert`` to the target whose key is ``target``; return on success."""
        raise NotImplementedError
