"""The eWallet source: joins Phoenix channels and emits consumption events.

A thin async loop around ``protocol``: connect with the credentials in the upgrade
headers, join every channel, heartbeat, and reconnect with ``Backoff`` when the socket
dies, goes silent, or stops answering heartbeats.

Record and replay: every frame read (join replies, heartbeat replies, broadcasts) goes
to ``ctx.received``; ``EWalletSource.frame_parser`` turns such frames back into the
events the source emitted, through the same ``consumption`` function: one event per
``transaction_consumption_request``/``_finalized`` broadcast, a repeat of one seen lately
(the same broadcast on another joined topic) dropped as live. Replies, heartbeat replies,
``phx_close``/``phx_error`` give no event. Not replayed: ``source.up``/``down``/``gap``
(they come from the connection, not from a frame), and the ``time`` of an event whose
consumption has no ``updated_at`` (live, the receipt time; on replay, the replay's).
Phoenix V2 array frames are not eWallet's format (its serializer writes objects): they
are malformed here as they are live.
"""

from __future__ import annotations

import logging
import time

import anyio
from anyio.abc import TaskStatus
from pydantic import Field, field_validator, model_validator
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from tocsin import (
    Backoff,
    BatchedConnection,
    Duration,
    Event,
    EventFactory,
    FrameParser,
    RecentIds,
    ScrubbingLogger,
    Secret,
    SecretValue,
    Source,
    SourceAuthError,
    SourceConfig,
    SourceContext,
    SourceError,
    closed_for_size,
    failure_reason,
    format_duration,
    register_secret,
    utc_iso,
)

from .protocol import (
    CLIENT_SCHEME,
    CONSUMPTION_EVENTS,
    PHOENIX_TOPIC,
    PROVIDER_SCHEME,
    ReplyError,
    ServerFrame,
    authorization,
    check_topic,
    consumption_event,
    heartbeat_message,
    join_message,
    parse_frame,
    ref_key,
    reply_error,
    socket_kind,
    upgrade_headers,
)

MAX_FRAME = 1 << 20  # a consumption is a few KiB; a bigger frame is a broken server
OPEN_TIMEOUT = 10.0
JOIN_TIMEOUT = 10.0  # Phoenix's push timeout
SERVER_IDLE_TIMEOUT = 60.0  # the server closes a socket that sent nothing for 60 s
GAP_REASON = "reconnected; events while disconnected may be missed"
WS_MESSAGE_TOO_BIG = 1009


# A child of websockets' own logger, so the user's logging config for it still applies.
# The Authorization header is base64 of the credentials: masked by name, whatever it holds.
WS_LOGGER = ScrubbingLogger("websockets.client.ewallet", headers=["authorization"])


class EWalletConfig(SourceConfig):
    """``[sources.NAME]`` with ``plugin = "ewallet"``; unknown keys are errors."""

    url: str
    api_key: Secret | None = None
    auth_token: Secret | None = None
    access_key: Secret | None = None
    secret_key: Secret | None = None
    channels: list[str] = Field(min_length=1)
    heartbeat: Duration = Field(default=30.0, ge=0.1)

    @field_validator("url")
    @classmethod
    def _socket_url(cls, value: str) -> str:
        socket_kind(value)
        return value

    @field_validator("channels")
    @classmethod
    def _channels(cls, value: list[str]) -> list[str]:
        for topic in value:
            check_topic(topic)
        twice = sorted({t for t in value if value.count(t) > 1})
        if twice:
            raise ValueError(f"listed more than once: {', '.join(twice)}")
        return value

    @field_validator("heartbeat")
    @classmethod
    def _heartbeat(cls, value: float) -> float:
        if value >= SERVER_IDLE_TIMEOUT:
            raise ValueError("must be under 60s: the server closes a socket idle for 60 s")
        return value

    @model_validator(mode="after")
    def _credentials(self) -> EWalletConfig:
        client = _pair(self.api_key, self.auth_token, "api_key", "auth_token")
        provider = _pair(self.access_key, self.secret_key, "access_key", "secret_key")
        if client and provider:
            raise ValueError(
                "give either api_key + auth_token (client API) or access_key + secret_key"
                " (admin API), not both"
            )
        if not client and not provider:
            raise ValueError(
                "credentials missing: api_key + auth_token (client API) or"
                " access_key + secret_key (admin API)"
            )
        kind = socket_kind(self.url)
        if provider and kind == "client":
            raise ValueError(
                "access_key + secret_key work only on the admin socket (.../api/admin/socket);"
                " the client socket takes api_key + auth_token"
            )
        if client and kind == "admin":
            raise ValueError(
                "api_key + auth_token work only on the client socket (.../api/client/socket);"
                " the admin socket takes access_key + secret_key"
            )
        return self

    def authorization(self) -> str:
        """The ``Authorization`` header value; reads the secrets, so call it only to send."""
        if self.api_key is not None and self.auth_token is not None:
            value = authorization(CLIENT_SCHEME, self.api_key.get(), self.auth_token.get())
        else:
            assert self.access_key is not None and self.secret_key is not None
            value = authorization(PROVIDER_SCHEME, self.access_key.get(), self.secret_key.get())
        register_secret(value)  # the encoded form, which no scrubber of the plain secrets sees
        return value


def consumption(
    frame: ServerFrame, recent: RecentIds, factory: SourceContext | EventFactory
) -> Event | None:
    """The event of a consumption broadcast, or None when it was seen lately (the same
    broadcast on another joined topic, or a repeat); ``ValueError`` when malformed.

    The live source and the replay parser both go through here.
    """
    try:
        found = consumption_event(frame)
    except ValueError as err:
        raise ValueError(f"malformed consumption: {err}") from None
    if recent.seen(found.id):
        return None
    return factory.event(found.type, found.data, id=found.id, time=found.time)


def _pair(first: SecretValue | None, second: SecretValue | None, a: str, b: str) -> bool:
    if (first is None) != (second is None):
        given, missing = (a, b) if second is None else (b, a)
        raise ValueError(f"{given} needs {missing}")
    return first is not None


class EWalletSource(Source):
    """Consumption requests and finalizations pushed on eWallet channels."""

    name = "ewallet"
    Config = EWalletConfig
    event_types = CONSUMPTION_EVENTS

    def __init__(self, config: SourceConfig, ctx: SourceContext) -> None:
        if not isinstance(config, EWalletConfig):
            raise TypeError("EWalletSource needs an EWalletConfig")
        super().__init__(config, ctx)
        self.settings = config
        # Kept across connections: what was emitted lately (one broadcast reaches every
        # joined topic it concerns), and the channels the server refused with the time
        # they may be tried again (only the user can fix those: at most once per max_backoff).
        self.recent = RecentIds()
        self.refused: dict[str, tuple[float, ReplyError]] = {}
        self._warned: set[tuple[str, str]] = set()
        self.heard = 0.0  # when the last frame arrived (unix seconds): a gap starts there

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        config = self.settings
        backoff = Backoff(maximum=config.max_backoff)
        started = False
        lost_at = ""  # when the last good connection ended: the start of a gap
        while True:
            try:
                async with connect(
                    config.url,
                    additional_headers=upgrade_headers(config.authorization()),
                    max_size=MAX_FRAME,
                    open_timeout=OPEN_TIMEOUT,
                    ping_interval=None,  # the Phoenix heartbeat is the keepalive
                    logger=WS_LOGGER,
                    create_connection=BatchedConnection,
                ) as ws:
                    assert isinstance(ws, BatchedConnection)
                    self.heard = time.time()
                    session = _Session(self, ws)
                    await session.join_all()
                    backoff.connected()
                    await self.ctx.up()
                    if not started:
                        task_status.started()  # once: the daemon's start-up waits for it
                        started = True
                    if lost_at:
                        # The server replays nothing: say what may be missing.
                        await self.ctx.gap(GAP_REASON, since=lost_at, until=utc_iso())
                        lost_at = ""
                    await session.receive(backoff)
                wait = backoff.delay()  # silent or unanswered: reopen the connection
            except SourceAuthError as err:
                await self.ctx.down(str(err))
                wait = backoff.give_up_delay()
            except InvalidStatus as err:
                status = err.response.status_code
                if status in (401, 403):
                    await self.ctx.down(
                        f"the server refused the credentials or the Accept header (HTTP {status})"
                    )
                    wait = backoff.give_up_delay()
                else:
                    await self.ctx.down(f"the upgrade was answered with HTTP {status}")
                    wait = backoff.delay()
            except Exception as err:  # never BaseException: cancellation must pass through
                await self.ctx.down(self._describe(err))
                wait = backoff.delay()
            if started and not lost_at:
                # From the last frame: a silent connection loses pushes before it is
                # found stale.
                lost_at = utc_iso(self.heard or None)
            await anyio.sleep(wait)

    @classmethod
    def frame_parser(cls, config: SourceConfig, factory: EventFactory) -> FrameParser:
        """Recorded frames back into events (the module docstring says what replays)."""
        if not isinstance(config, EWalletConfig):
            raise TypeError("EWalletSource needs an EWalletConfig")
        recent = RecentIds()

        def parse(raw: str | bytes) -> list[Event]:
            try:
                frame = parse_frame(raw)
            except ValueError as err:
                raise ValueError(f"malformed frame: {err}") from None
            if frame.event not in CONSUMPTION_EVENTS:
                return []  # replies, heartbeat replies, phx_close, phx_error
            event = consumption(frame, recent, factory)
            return [] if event is None else [event]

        return parse

    def _describe(self, err: Exception) -> str:
        if closed_for_size(err):
            self.ctx.reject("oversized frame")
        return failure_reason(err, open_timeout=OPEN_TIMEOUT)

    def channel_refused(self, topic: str, error: ReplyError, now: float) -> None:
        """A join was refused: a config problem, warned about once, retried after max_backoff."""
        self.refused[topic] = (now + self.settings.max_backoff, error)
        level = logging.WARNING if (topic, error.code) not in self._warned else logging.DEBUG
        self._warned.add((topic, error.code))
        self.ctx.logger.log(
            level,
            "source %r: channel %s refused: %s%s; other channels keep running,"
            " this one is tried again every %s",
            self.ctx.source,
            topic,
            error.code,
            f" ({error.description})" if error.description else "",
            format_duration(self.settings.max_backoff),
        )


class _Session:
    """One connection: its refs, joins and heartbeat."""

    def __init__(self, source: EWalletSource, ws: BatchedConnection) -> None:
        self.source = source
        self.ctx = source.ctx
        self.config = source.settings
        self.ws = ws
        self._ref = 0
        self.joined: set[str] = set()
        self.joining: dict[str, tuple[str, float]] = {}  # ref -> (topic, reply deadline)
        self.rejoin_at: dict[str, float] = {}  # topic -> when to join it again
        self.rejoin_backoff: dict[str, Backoff] = {}
        self.channel_lost: dict[str, str] = {}  # topic -> when its channel closed
        self.heartbeat_ref: str | None = None

    def next_ref(self) -> str:
        self._ref += 1
        return str(self._ref)

    async def join(self, topic: str) -> None:
        ref = self.next_ref()
        self.joining[ref] = (topic, anyio.current_time() + JOIN_TIMEOUT)
        await self.ws.send(join_message(topic, ref))

    async def join_all(self) -> None:
        """Join every channel not recently refused; raise if none could be joined."""
        now = anyio.current_time()
        for topic in self.config.channels:
            retry_at = self.source.refused.get(topic, (0.0, None))[0]
            if retry_at <= now:
                await self.join(topic)
            else:
                self.rejoin_at[topic] = retry_at
        while self.joining:
            deadline = min(d for _, d in self.joining.values())
            batch = await self.ws.recv_batch(within=deadline - anyio.current_time())
            if not batch:
                raise SourceError(f"no reply to phx_join within {format_duration(JOIN_TIMEOUT)}")
            for raw in batch:
                await self.handle(raw)
        if not self.joined:
            raise SourceAuthError(f"no channel could be joined ({self.refusals()})")

    async def receive(self, backoff: Backoff) -> None:
        """Handle frames until the connection goes silent or a heartbeat goes unanswered.

        The server is silent between heartbeat replies, so a ``stale_after`` shorter than
        ``heartbeat`` makes the beat faster: at least two per ``stale_after``."""
        stale_after = self.config.stale_after
        heartbeat = min(self.config.heartbeat, stale_after / 2)
        last_frame = anyio.current_time()
        next_beat = last_frame + heartbeat
        while True:
            now = anyio.current_time()
            # Silence is judged with nothing left unread, and a missed heartbeat or join
            # reply too, or once one more interval has passed: the reply may be among the
            # frames waiting, but a backlog that lasts must not hide a dead channel.
            unread = self.ws.ready
            if not unread and now - last_frame >= stale_after:
                await self.ctx.stale(f"nothing received for {format_duration(stale_after)}")
                return
            if now >= next_beat:
                if self.heartbeat_ref is None:
                    self.heartbeat_ref = self.next_ref()
                    await self.ws.send(heartbeat_message(self.heartbeat_ref))
                    next_beat = now + heartbeat
                elif not unread or now >= next_beat + heartbeat:
                    # phoenix.js's rule: no reply before the next beat is a dead socket.
                    await self.ctx.stale(f"no heartbeat reply within {format_duration(heartbeat)}")
                    return
            for topic, when in list(self.rejoin_at.items()):
                if when <= now:
                    del self.rejoin_at[topic]
                    await self.join(topic)
            for topic, deadline in self.joining.values():
                if deadline <= now and (not unread or now >= deadline + JOIN_TIMEOUT):
                    raise SourceError(f"no reply to joining {topic} within {JOIN_TIMEOUT:g}s")
            # Only the wait has a deadline: frames in hand are handled whole.
            wake = min(
                [next_beat, last_frame + stale_after, *self.rejoin_at.values()]
                + [d for _, d in self.joining.values()]
            )
            batch = await self.ws.recv_batch(within=wake - now)
            if not batch:
                continue
            self.source.heard = time.time()
            backoff.healthy()
            for topic in self.joined:
                self.rejoin_backoff[topic].healthy()
            for raw in batch:
                await self.handle(raw)
                if self.nothing_joinable():
                    raise SourceAuthError(f"no channel could be joined ({self.refusals()})")
            # Silence counts from when the last frame was handled: handing its event over
            # may have waited for the engine.
            last_frame = anyio.current_time()

    def nothing_joinable(self) -> bool:
        """Nothing joined, nothing on its way, and every channel waits out a refusal."""
        if self.joined or self.joining:
            return False
        return all(topic in self.source.refused for topic in self.rejoin_at)

    def refusals(self) -> str:
        return "; ".join(
            f"{topic}: {error.code}" for topic, (_, error) in sorted(self.source.refused.items())
        )

    async def handle(self, raw: str | bytes) -> None:
        self.ctx.received(raw)
        try:
            frame = parse_frame(raw)
        except ValueError as err:
            self.ctx.reject(f"malformed frame: {err}")
            return
        if frame.event == "phx_reply":
            await self._reply(frame.topic, ref_key(frame.ref), frame.success, reply_error(frame))
        elif frame.event in ("phx_error", "phx_close"):
            self._channel_closed(frame.topic, frame.event)
        elif frame.event in CONSUMPTION_EVENTS:
            try:
                event = consumption(frame, self.source.recent, self.ctx)
            except ValueError as err:
                self.ctx.reject(str(err))
                return
            if event is not None:
                await self.ctx.emit(event)
        else:
            self.ctx.logger.debug(
                "source %r: ignored %s on %s", self.ctx.source, frame.event, frame.topic
            )

    async def _reply(self, topic: str, ref: str | None, success: bool, error: ReplyError) -> None:
        if topic == PHOENIX_TOPIC and ref is not None and ref == self.heartbeat_ref:
            self.heartbeat_ref = None
            return
        if ref is None or self.joining.get(ref, ("",))[0] != topic:
            return  # a late reply to something already given up on
        del self.joining[ref]
        if success:
            self.joined.add(topic)
            self.source.refused.pop(topic, None)
            self.rejoin_backoff.setdefault(
                topic, Backoff(maximum=self.config.max_backoff)
            ).connected()
            lost = self.channel_lost.pop(topic, "")
            if lost:
                await self.ctx.gap(
                    f"channel {topic} rejoined; its events while it was closed may be missed",
                    since=lost,
                    until=utc_iso(),
                )
        else:
            now = anyio.current_time()
            self.source.channel_refused(topic, error, now)
            self.rejoin_at[topic] = now + self.config.max_backoff

    def _channel_closed(self, topic: str, event: str) -> None:
        if topic not in self.joined:
            return
        # The channel crashed (phx_error) or the server closed it (phx_close): rejoin
        # it as phoenix.js does, with a backoff of its own.
        self.joined.discard(topic)
        self.channel_lost.setdefault(topic, utc_iso())
        delay = self.rejoin_backoff.setdefault(
            topic, Backoff(maximum=self.config.max_backoff)
        ).delay()
        self.rejoin_at[topic] = anyio.current_time() + delay
        self.ctx.logger.warning(
            "source %r: channel %s closed by the server (%s); rejoining in %s",
            self.ctx.source,
            topic,
            event,
            format_duration(delay),
        )
