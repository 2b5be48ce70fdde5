"""The ``webhook`` action: a signed JSON ``POST`` of each alert (SPEC section 5).

The body is ``orjson.dumps(alert.payload())``; with a ``secret`` the request carries
``X-Tocsin-Timestamp`` and ``X-Tocsin-Signature: sha256=<hex HMAC-SHA256(secret,
"<timestamp>.<raw body>")>``. ``sign`` and ``verify`` are pure so receivers and tests
can check a signature without this action.

The URL may carry a token, so it is a ``Secret``: messages name only its origin
(``scheme://host:port/``). Requests go through ``http1.Pool``: keep-alive connections, at
most ``concurrency`` of them, redirects answered and never followed.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import time
from email.utils import parsedate_to_datetime
from typing import ClassVar
from urllib.parse import urlsplit

from pydantic import ConfigDict, Field, field_validator, model_validator

from tocsin import (
    Action,
    ActionConfig,
    Alert,
    Duration,
    PermanentDelivery,
    RetryableDelivery,
    Secret,
    SecretValue,
    Target,
    __version__,
    to_json,
)

from .http1 import InvalidURL, Pool

log = logging.getLogger(__name__)

RETRYABLE_STATUSES = frozenset({408, 425, 429})
"""Client-error statuses that mean "later" rather than "never" (plus every 5xx)."""

# Headers tocsin sets itself: letting the user's headers replace them would break the
# signature, the idempotency promise or the framing of the request.
RESERVED_HEADERS = frozenset(
    {
        "content-type",
        "content-length",
        "transfer-encoding",
        "host",
        "idempotency-key",
        "x-tocsin-timestamp",
        "x-tocsin-signature",
    }
)

_ERROR_BODY_CHARS = 200


def sign(secret: bytes, timestamp: int, body: bytes) -> str:
    """The ``X-Tocsin-Signature`` value: ``sha256=<hex HMAC-SHA256(secret, "<ts>.<body>")>``."""
    mac = hmac.new(secret, f"{timestamp}.".encode("ascii") + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


def verify(
    secret: bytes,
    timestamp: int | str,
    body: bytes,
    signature: str,
    *,
    tolerance: float | None = 300.0,
    now: float | None = None,
) -> bool:
    """Whether ``signature`` is ours for ``timestamp`` and ``body``, for webhook receivers.

    ``timestamp`` and ``signature`` may be the raw header values. With a ``tolerance``
    (seconds), a timestamp further than that from ``now`` is refused, which stops replays
    of an old request; ``None`` checks only the signature.
    """
    try:
        ts = int(timestamp)
    except (TypeError, ValueError):
        return False
    if tolerance is not None:
        current = time.time() if now is None else now
        if abs(current - ts) > tolerance:
            return False
    return hmac.compare_digest(sign(secret, ts, body), signature)


def origin(url: str) -> str:
    """``scheme://host:port/`` of ``url``: the only part of a webhook URL we ever show."""
    try:
        parts = urlsplit(url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
        host = parts.hostname or "?"
    except ValueError:
        return "<invalid url>"
    if ":" in host:  # an IPv6 literal
        host = f"[{host}]"
    return f"{parts.scheme}://{host}:{port}/"


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delay-seconds or HTTP-date), or None."""
    if value is None:
        return None
    text = value.strip()
    if not text:
        return None
    if text.isascii() and text.replace(".", "", 1).isdigit():
        return float(text)
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # RFC 9110 dates are GMT; a naive result means "-0000"
        return None
    current = time.time() if now is None else now
    return max(0.0, when.timestamp() - current)


class WebhookConfig(ActionConfig):
    """``[actions.NAME]`` with ``plugin = "webhook"``."""

    # A validation error would otherwise quote the raw input: the URL with its token.
    model_config = ConfigDict(hide_input_in_errors=True)

    url: Secret
    secret: Secret | None = None
    headers: dict[str, Secret] = {}
    timeout: Duration = Field(default=10.0, gt=0)

    @field_validator("url")
    @classmethod
    def _check_url(cls, value: SecretValue) -> SecretValue:
        # The messages below never quote the URL: it may hold a token.
        try:
            parts = urlsplit(value.get())
            parts.port  # noqa: B018 - raises ValueError on a bad port
        except ValueError:
            raise ValueError("url is not a valid URL") from None
        if parts.scheme not in ("http", "https"):
            raise ValueError("url must start with http:// or https://")
        if not parts.hostname:
            raise ValueError("url must name a host (http://HOST/...)")
        if any(c.isspace() for c in value.get()):
            raise ValueError("url cannot contain spaces or line breaks")
        return value

    @field_validator("headers")
    @classmethod
    def _check_headers(cls, value: dict[str, SecretValue]) -> dict[str, SecretValue]:
        for name, header in value.items():
            if (
                not name
                or not all(c.isascii() and c.isprintable() for c in name)
                or (any(c in name for c in ' :()<>@,;\\"/[]?={}'))
            ):
                raise ValueError(f"{name!r} is not a valid HTTP header name")
            if name.lower() in RESERVED_HEADERS:
                raise ValueError(f"header {name} is set by tocsin and cannot be overridden")
            if any(c in header.get() for c in "\r\n\0"):
                raise ValueError(f"the value of header {name} cannot contain a line break")
        return value

    @model_validator(mode="after")
    def _one_authorization(self) -> WebhookConfig:
        parts = urlsplit(self.url.get())
        given = any(name.lower() == "authorization" for name in self.headers)
        if given and (parts.username is not None or parts.password is not None):
            # Both would be sent, and a server reads one of the two: say which is meant.
            raise ValueError(
                "give the credentials either in the url (user:password@) or as an"
                " Authorization header, not both"
            )
        return self


class WebhookAction(Action):
    """POST each alert as JSON to ``url``, signed when a ``secret`` is set."""

    name = "webhook"
    Config: ClassVar[type[ActionConfig]] = WebhookConfig

    def __init__(self, name: str, config: ActionConfig) -> None:
        if not isinstance(config, WebhookConfig):
            raise TypeError(f"{type(self).__name__} needs a WebhookConfig")
        super().__init__(name, config)
        self.settings = config
        self._origin = origin(config.url.get())
        self._pool: Pool | None = None

    def targets(self) -> list[Target]:
        """One target whose label shows the origin only (the URL may hold a token)."""
        return [Target("", f"{self.instance} ({self._origin})")]

    async def start(self) -> None:
        """Make the connection pool: at most ``concurrency`` connections, kept alive."""
        if self._pool is None:
            self._pool = Pool(
                self.settings.url.get(),
                limit=self.settings.concurrency,
                timeout=self.settings.timeout,
                # The user's own User-Agent replaces it (sent with the other headers).
                headers=(
                    {}
                    if any(name.lower() == "user-agent" for name in self.settings.headers)
                    else {"User-Agent": f"tocsin/{__version__}"}
                ),
            )

    async def aclose(self) -> None:
        """Close the pool's connections."""
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.aclose()

    def _headers(self, alert_id: str, body: bytes, now: float | None = None) -> dict[str, str]:
        """The headers of the POST carrying ``body``: the user's, then the protocol's."""
        headers = {name: value.get() for name, value in self.settings.headers.items()}
        headers["Content-Type"] = "application/json"
        headers["Idempotency-Key"] = alert_id
        if self.settings.secret is not None:
            timestamp = int(time.time() if now is None else now)
            headers["X-Tocsin-Timestamp"] = str(timestamp)
            headers["X-Tocsin-Signature"] = sign(
                self.settings.secret.get().encode("utf-8"), timestamp, body
            )
        return headers

    async def deliver(self, alert: Alert, target: str) -> None:
        """POST the alert; raise ``RetryableDelivery`` or ``PermanentDelivery`` on failure."""
        pool = self._pool
        if pool is None:
            raise RuntimeError(f"webhook action {self.instance!r}: start() was not awaited")
        body = to_json(alert.payload())
        headers = self._headers(alert.id, body)
        try:
            answer = await pool.post(body, headers)  # redirects are answers, not followed
        except InvalidURL:
            raise PermanentDelivery(
                f"the url of webhook action {self.instance!r} is invalid"
            ) from None
        except TimeoutError as err:
            raise RetryableDelivery(
                f"the webhook at {self._origin} did not answer within {self.settings.timeout:g}s"
            ) from err
        except OSError as err:
            raise RetryableDelivery(
                f"cannot reach the webhook at {self._origin}: {self._describe(err)}"
            ) from err
        self._judge(answer.status, parse_retry_after(answer.retry_after), answer.body)

    def _judge(self, status: int, retry_after: float | None, body: bytes) -> None:
        """Return on 2xx, else raise the delivery error ``status`` calls for."""
        if 200 <= status < 300:
            log.debug("webhook %s: HTTP %d from %s", self.instance, status, self._origin)
            return
        text = " ".join(body.decode("utf-8", "replace").split())[:_ERROR_BODY_CHARS]
        message = f"HTTP {status} from the webhook" + (f": {text}" if text else "")
        if status >= 500 or status in RETRYABLE_STATUSES:
            raise RetryableDelivery(message, retry_after=retry_after)
        if 300 <= status < 400:
            message += " (redirects are not followed: set url to the final address)"
        raise PermanentDelivery(message)

    def _describe(self, err: BaseException) -> str:
        """``err`` as one phrase with every part of the URL but its origin masked."""
        text = str(err) or type(err).__name__
        url = self.settings.url.get()
        parts = urlsplit(url)
        rest = url.split(parts.netloc, 1)[-1] if parts.netloc else url
        for fragment in (url, rest, parts.username, parts.password, parts.path, parts.query):
            if fragment and len(fragment) > 1:
                text = text.replace(fragment, "***")
        return text
