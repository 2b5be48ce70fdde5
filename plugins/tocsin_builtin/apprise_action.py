"""The ``apprise`` action: notifications on any channel Apprise knows (SPEC section 5).

Each Apprise URL is its own target, so a failing channel is retried alone. Apprise is
blocking and some services sleep between sends, so every send runs in a thread of its own,
at most ``workers`` at a time, and is abandoned after ``deadline``; the retry is then the
outbox's. An abandoned send gives its slot back but keeps its channel busy until it ends:
a stuck channel holds one thread and no worker, and the other channels go on. So the
threads number at most ``workers`` plus one per channel. They are daemon threads: a send
stuck in Apprise never keeps the daemon from exiting once the drain is over. Apprise's own
deadline (which would hand the send to Apprise's process-wide pool) and its own retries
are switched off, so the threads here are the only ones.

URLs carry tokens. They are shown only in Apprise's privacy form, a target's key is a
hash, and a filter on the ``apprise`` logger masks every secret part of a configured URL
in what Apprise logs (on failure it logs hosts, on a parse error the URL as written).
"""

from __future__ import annotations

import asyncio
import contextvars
import hashlib
import logging
import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, ClassVar
from urllib.parse import unquote

import anyio
import apprise
from pydantic import AfterValidator, ConfigDict, Field, field_validator, model_validator

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
)

log = logging.getLogger(__name__)

# Firing alerts show as warnings, resolutions as successes (Apprise colours and icons).
NOTIFY_TYPES = {"firing": "warning", "resolved": "success", "retracted": "info"}
LATE_KEPT = 1024
"""Abandoned sends whose outcome is kept for the next try of their delivery (oldest go)."""


# --- keeping URLs out of Apprise's log output -----------------------------------------


class _Masks:
    """Secret parts of every configured Apprise URL, to mask in Apprise's log records."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values: tuple[str, ...] = ()

    def add(self, values: set[str]) -> None:
        with self._lock:
            # Longest first, so a whole URL is masked before one of its parts is.
            merged = set(self._values) | {v for v in values if len(v) >= 4}
            self._values = tuple(sorted(merged, key=len, reverse=True))

    def scrub(self, text: str) -> str:
        for value in self._values:
            if value in text:
                text = text.replace(value, "***")
        return text


_masks = _Masks()

# While set (in one thread or task), Apprise's records are counted by level and dropped:
# our validation error replaces them, and they may quote a URL we cannot mask yet.
_quiet: contextvars.ContextVar[list[int] | None] = contextvars.ContextVar(
    "tocsin_apprise_quiet", default=None
)
# While set, the text of Apprise's warnings and errors is kept, to explain a failure.
_heard: contextvars.ContextVar[list[str] | None] = contextvars.ContextVar(
    "tocsin_apprise_heard", default=None
)


class _AppriseLogGuard(logging.Filter):
    """On the ``apprise`` logger: mask URL secrets in every record, or drop it when quiet."""

    def filter(self, record: logging.LogRecord) -> bool:
        quiet = _quiet.get()
        if quiet is not None:
            quiet.append(record.levelno)
            return False
        try:
            text = record.getMessage()
        except Exception:  # a malformed record: let logging report it as usual
            return True
        clean = _masks.scrub(text)
        if clean != text:
            record.msg, record.args = clean, None
        heard = _heard.get()
        if heard is not None and record.levelno >= logging.WARNING:
            heard.append(clean)
        return True


_guard = _AppriseLogGuard()


def _guard_apprise_logger() -> None:
    apprise_logger = logging.getLogger("apprise")
    if _guard not in apprise_logger.filters:
        apprise_logger.addFilter(_guard)


@contextmanager
def _apprise_quiet() -> Iterator[list[int]]:
    """Drop Apprise's log records inside the block; yields the levels it tried to log."""
    _guard_apprise_logger()
    levels: list[int] = []
    token = _quiet.set(levels)
    try:
        yield levels
    finally:
        _quiet.reset(token)


def _secret_parts(url: str, private: str) -> set[str]:
    """The pieces of ``url`` that Apprise's privacy form ``private`` hides."""
    split = re.compile(r"[/:@?&=,#+\s]+")
    shown = set(split.split(private)) | set(split.split(unquote(private)))
    return {url} | {part for part in split.split(url) if part not in shown}


# --- services ---------------------------------------------------------------------------


def _asset() -> apprise.AppriseAsset:
    # service_timeout=0: no Apprise deadline, so Apprise calls the service in our worker
    # thread instead of handing it to its own pool; the deadline is ours. Memory storage:
    # the daemon runs with a read-only file system.
    return apprise.AppriseAsset(service_timeout=0, storage_mode="memory", secure_logging=True)


@dataclass(frozen=True)
class _Channel:
    """One Apprise service: its target key, its privacy label, and the client holding it."""

    key: str
    label: str
    client: apprise.Apprise


def _key(text: str) -> str:
    """A short stable id for a URL, stored in the database instead of the URL."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _url(service: Any, privacy: bool = False) -> str:
    """A service's URL, in full or in Apprise's privacy form (its secrets masked)."""
    return str(service.url(privacy=privacy))


def _channel(
    service: Any, key_source: str, asset: apprise.AppriseAsset, label: str = ""
) -> _Channel:
    # Retries are the outbox's: a "?retry=N" in the URL must not multiply the sends.
    service.retry = 0
    private = _url(service, privacy=True)
    _masks.add(_secret_parts(key_source, private) | _secret_parts(_url(service), private))
    client = apprise.Apprise(asset=asset)
    client.add(service)
    return _Channel(_key(key_source), label or private, client)


def _from_urls(urls: list[SecretValue]) -> list[_Channel]:
    """Channels for the URLs (``_understood`` checked each).

    Each is labelled by its place (``urls[1] (ntfy)``), not by Apprise's privacy form:
    that masks the passwords and tokens Apprise knows of, but shows the rest, such as an
    ntfy topic, which is as secret as a token. The label is what logs, errors and
    ``tocsin outbox`` show."""
    asset = _asset()
    channels = []
    with _apprise_quiet():
        for index, url in enumerate(urls):
            text = url.get().strip()
            service = apprise.Apprise.instantiate(text, asset=asset)
            if service is None:
                continue
            scheme = text.partition("://")[0]
            _masks.add(set(_secret_parts(text, "")) - {scheme})  # Apprise's own log lines
            channels.append(_channel(service, text, asset, f"urls[{index}] ({scheme})"))
    return channels


def _understood(url: SecretValue) -> SecretValue:
    """``url`` if Apprise understands it; the error is reported at its index, without it
    (the URL holds tokens)."""
    with _apprise_quiet():
        if apprise.Apprise.instantiate(url.get().strip(), asset=_asset()) is None:
            raise ValueError("not a URL Apprise understands")
    return url


def _from_config_file(path: str, tag: str | list[str] | None) -> tuple[list[_Channel], int]:
    """Channels for the config file's services matching ``tag``, and how many problems
    Apprise met reading it."""
    asset = _asset()
    with _apprise_quiet() as levels:
        source = apprise.AppriseConfig(asset=asset)
        source.add(path)
        everything = apprise.Apprise(asset=asset)
        everything.add(source)
        # The config's own text is not kept, so its canonical URL names each service.
        channels = [
            _channel(service, _url(service), asset)
            for service in everything.find(tag=tag or apprise.common.MATCH_ALL_TAG)
        ]
    return channels, sum(1 for level in levels if level >= logging.WARNING)


# --- config ----------------------------------------------------------------------------


class AppriseActionConfig(ActionConfig):
    """``[actions.NAME]`` with ``plugin = "apprise"``: ``urls`` or ``config``, not both."""

    # A validation error would otherwise quote the raw input: the URL with its token.
    model_config = ConfigDict(hide_input_in_errors=True)

    urls: list[Annotated[Secret, AfterValidator(_understood)]] = []
    config: str | None = None
    tag: str | list[str] | None = None
    workers: int = Field(default=4, ge=1, le=32)
    deadline: Duration = Field(default=30.0, gt=0)

    @field_validator("config")
    @classmethod
    def _check_config_path(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if re.match(r"[A-Za-z][A-Za-z0-9+.-]*://", value) and not value.startswith("file://"):
            raise ValueError("config must be the path of a local Apprise config file")
        path = Path(value.removeprefix("file://")).expanduser()
        if not path.is_file():
            raise ValueError(f"Apprise config file {str(path)!r} does not exist")
        return value

    @model_validator(mode="after")
    def _check_sources(self) -> AppriseActionConfig:
        if bool(self.urls) == (self.config is not None):
            raise ValueError(
                "give either urls (a list of Apprise URLs) or config (an Apprise config file)"
                + (", not both" if self.urls else "")
            )
        if self.urls and self.tag is not None:
            raise ValueError("tag selects services of an Apprise config file: use it with config")
        if self.config is not None:
            channels, problems = _from_config_file(self.config, self.tag)
            if problems:
                raise ValueError(
                    f"Apprise reported {problems} problem(s) reading {self.config!r}"
                    " (run `apprise --dry-run -vv --config FILE` to see which entries)"
                )
            if not channels:
                wanted = f" tagged {self.tag!r}" if self.tag else ""
                raise ValueError(f"{self.config!r} holds no Apprise URL{wanted}")
        return self


# --- the action ------------------------------------------------------------------------


class AppriseAction(Action):
    """Send each alert's title and body to each Apprise URL, one delivery per URL."""

    name = "apprise"
    Config: ClassVar[type[ActionConfig]] = AppriseActionConfig

    def __init__(self, name: str, config: ActionConfig) -> None:
        if not isinstance(config, AppriseActionConfig):
            raise TypeError(f"{type(self).__name__} needs an AppriseActionConfig")
        super().__init__(name, config)
        self.settings = config
        _guard_apprise_logger()
        if config.config is not None:
            channels, problems = _from_config_file(config.config, config.tag)
            if problems:  # the file changed since it was validated
                log.warning(
                    "apprise action %s: %d problem(s) reading %s; using the %d service(s) read",
                    name,
                    problems,
                    config.config,
                    len(channels),
                )
        else:
            channels = _from_urls(config.urls)
        self._channels: dict[str, _Channel] = {}
        for channel in channels:  # the same URL twice is one target
            self._channels.setdefault(channel.key, channel)
        self._slots: asyncio.Semaphore | None = None
        # The send still running (or stuck) of each channel.
        self._sending: dict[str, Future[str | None]] = {}
        # Sends abandoned at their deadline, by (alert id, target): the next try of the
        # same delivery takes their outcome instead of sending again.
        self._late: OrderedDict[tuple[str, str], Future[str | None]] = OrderedDict()

    def targets(self) -> list[Target]:
        """One target per Apprise service, labelled by its place in ``urls`` (or with
        Apprise's privacy form of it, for a ``config`` file's)."""
        return [Target(c.key, c.label) for c in self._channels.values()]

    async def start(self) -> None:
        """Make the ``workers`` slots."""
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.settings.workers)

    async def aclose(self) -> None:
        """Nothing to wait for: a stuck send ends on its own (Apprise's socket timeouts),
        its thread is a daemon thread, and its outbox entry is still pending."""
        self._slots = None

    async def deliver(self, alert: Alert, target: str) -> None:
        """Notify one URL in a worker thread within ``deadline`` seconds.

        A channel sends one notification at a time: a delivery to a channel still busy
        waits for it (within the deadline). A send past the deadline is abandoned, not
        stopped (Apprise cannot be interrupted); the next try of the same delivery takes
        its outcome when it ends, so a slow channel is never notified twice of one alert.
        """
        channel = self._channels.get(target)
        if channel is None:
            raise PermanentDelivery("target no longer configured")
        slots = self._slots
        if slots is None:
            raise RuntimeError(f"apprise action {self.instance!r}: start() was not awaited")
        deadline = self.settings.deadline
        loop = asyncio.get_running_loop()
        slot = _Slot(slots)
        future: Future[str | None] | None = None
        key = (alert.id, target)
        busy = False

        def ended() -> None:  # the send's thread returned: its channel and slot are free
            if future is not None and self._sending.get(target) is future:
                del self._sending[target]
            slot.give_back()

        # One deadline for the whole call, waiting for the channel and a free worker
        # included, so a delivery never holds the dispatcher longer than ``deadline``.
        claim: Future[str | None] = Future()  # the channel, held while a worker is awaited
        with anyio.move_on_after(deadline) as scope:
            late = self._late.get(key)
            if late is not None:
                busy = True
                failure = await asyncio.wrap_future(late)
                self._late.pop(key, None)
                if failure is None:
                    return  # the abandoned send got through after all
            # Another delivery may take the channel first each time it frees: look again.
            while (running := self._sending.get(target)) is not None and not running.done():
                busy = True
                await asyncio.wrap_future(running)
            busy = False
            self._sending[target] = claim  # taken with no await since the look: ours
            try:
                await slots.acquire()
                slot.held = True
                future = self._sending[target] = _in_thread(
                    f"apprise-{self.instance}", _send, channel, alert
                )
            finally:
                claim.set_result(None)  # those waiting on the claim look again
                if self._sending.get(target) is claim:
                    del self._sending[target]  # no worker came in time: the channel is free
            future.add_done_callback(lambda _: _call_soon(loop, ended))
            failure = await asyncio.wrap_future(future)
            ended()
        slot.give_back()  # abandoned: the slot serves others; the channel stays busy
        if scope.cancelled_caught:
            if busy:
                raise RetryableDelivery(f"the last send to {channel.label} has not ended yet")
            if future is None:
                raise RetryableDelivery(
                    f"all {self.settings.workers} Apprise worker(s) of action {self.instance!r}"
                    f" were still busy after {deadline:g}s"
                )
            self._late[key] = future
            while len(self._late) > LATE_KEPT:
                self._late.popitem(last=False)
            raise RetryableDelivery(
                f"Apprise did not finish sending to {channel.label} within {deadline:g}s"
            )
        if failure is not None:
            raise RetryableDelivery(f"Apprise could not notify {channel.label}: {failure}")


class _Slot:
    """One of an action's ``workers`` slots, given back once: when the send ends or when
    it is abandoned, whichever comes first."""

    def __init__(self, slots: asyncio.Semaphore) -> None:
        self.slots = slots
        self.held = False

    def give_back(self) -> None:
        if self.held:
            self.held = False
            self.slots.release()


def _call_soon(loop: asyncio.AbstractEventLoop, callback: Callable[[], None]) -> None:
    """Run ``callback`` on the event loop, from whichever thread finished the send."""
    # A closed loop raises RuntimeError: then nobody is waiting any more.
    with suppress(RuntimeError):
        loop.call_soon_threadsafe(callback)


def _in_thread(name: str, func: Callable[..., str | None], *args: Any) -> Future[str | None]:
    """``func(*args)`` in a new daemon thread (a pool's threads are joined at exit)."""
    future: Future[str | None] = Future()

    def run() -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            future.set_result(func(*args))
        except BaseException as err:
            future.set_exception(err)

    threading.Thread(target=run, name=name, daemon=True).start()
    return future


def _send(channel: _Channel, alert: Alert) -> str | None:
    """Blocking: notify ``channel``; None on success, else why it failed (masked)."""
    title, body = alert.title, alert.body
    if not body:  # Apprise refuses an empty body on some services; the title is the message
        title, body = "", title or f"{alert.rule} [{alert.status}]"
    heard: list[str] = []
    token = _heard.set(heard)
    try:
        with channel.client.notify(
            body=body, title=title, notify_type=NOTIFY_TYPES.get(alert.status, "info")
        ) as result:
            if result:
                return None
            status = getattr(result.status, "name", str(result.status)).lower()
    except Exception as err:  # Apprise reports failures; this is a bug of a service plugin
        return _masks.scrub(f"{type(err).__name__}: {err}")
    finally:
        _heard.reset(token)
    return heard[-1] if heard else f"Apprise reported {status}"
