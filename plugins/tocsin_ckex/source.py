"""The ckex source: a thin async loop around ``protocol``.

Connect with the token in the query, register every market, send ``start``; treat any
frame as liveness and reconnect after ``stale_after`` of silence; re-register every
``resubscribe_every`` (the server stops quoting a market about an hour after it was
registered) and after every reconnect. The server replays nothing, so each reconnect
emits ``source.gap`` for the time the source was away.

``frame_parser`` turns frames saved by ``tocsin record`` into the same events, through
``quote_events`` and a ``QuoteBook`` of its own, as the live loop does.
"""

from __future__ import annotations

import logging
import time
from typing import Literal

import anyio
from anyio.abc import TaskStatus
from pydantic import Field, field_validator, model_validator
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus, InvalidURI

from tocsin import (
    Backoff,
    BatchedConnection,
    ConfigModel,
    Duration,
    Event,
    EventFactory,
    FrameParser,
    ScrubbingLogger,
    Secret,
    SecretValue,
    Source,
    SourceConfig,
    SourceContext,
    closed_for_size,
    failure_reason,
    format_duration,
    printable,
    utc_iso,
)

from .protocol import (
    EVENT_TYPES,
    MAX_FRAME,
    Keepalive,
    Market,
    Quote,
    QuoteBook,
    Quotes,
    ServerError,
    check_id,
    connect_url,
    event_time,
    parse_frame,
    quote_event,
    redact_query,
    register_command,
    safe_url,
    start_command,
    token_expiry,
)

DEFAULT_URL = "wss://webapi.ckex.xyz/dev-f/quote/do-not-look-back"
OPEN_TIMEOUT = 10.0
ERROR_LOG_EVERY = 60.0  # at most one warning a minute for the server's error frames
AUTH_REFUSED = (401, 403)  # 401 is what we expect; a gateway may well answer 403
POLICY_CLOSE = 1008  # a server that refuses the token after the upgrade closes with it


class MarketConfig(ConfigModel):
    """One entry of ``markets``: a sportsbook ("chloe") or fancy market of an event."""

    kind: Literal["sportsbook", "fancy"]
    event_id: str
    market_id: str

    @field_validator("event_id", "market_id")
    @classmethod
    def _id(cls, value: str) -> str:
        return check_id(value)

    def market(self) -> Market:
        return Market(self.kind, self.event_id, self.market_id)


class CkexConfig(SourceConfig):
    """``[sources.NAME]`` with ``plugin = "ckex"``; unknown keys are errors."""

    url: str = DEFAULT_URL
    token: Secret
    markets: list[MarketConfig] = Field(min_length=1)
    resubscribe_every: Duration = Field(default=45 * 60.0, ge=1.0)
    # No heartbeat interval is documented; the server sends "alive" frames: a minute of
    # silence is a dead connection.
    stale_after: Duration = Field(default=60.0, ge=1.0)

    @field_validator("url")
    @classmethod
    def _websocket_url(cls, value: str) -> str:
        if not value.startswith(("ws://", "wss://")):
            raise ValueError("expected a ws:// or wss:// URL")
        if "authorization=" in value.lower():
            raise ValueError(
                "give the URL without the authorization query: the token goes in `token`"
            )
        return value

    @field_validator("token")
    @classmethod
    def _bare_token(cls, value: SecretValue) -> SecretValue:
        text = value.get()
        if text.lower().startswith("bearer "):
            raise ValueError('give the token without "bearer ": it is added on the wire')
        if not text or any(c.isspace() for c in text):
            raise ValueError("the token must be one non-empty word (a JWT)")
        return value

    @field_validator("resubscribe_every")
    @classmethod
    def _within_an_hour(cls, value: float) -> float:
        if value > 3600:
            raise ValueError(
                "must be at most 1h: the server stops quoting a market about an hour after"
                " it was registered"
            )
        return value

    @model_validator(mode="after")
    def _distinct_markets(self) -> CkexConfig:
        seen: set[tuple[str, str]] = set()
        for entry in self.markets:
            key = (entry.event_id, entry.market_id)
            if key in seen:
                raise ValueError(f"markets: {entry.event_id}@{entry.market_id} is listed twice")
            seen.add(key)
        return self


def quote_events(
    frame: Quotes, book: QuoteBook, factory: SourceContext | EventFactory
) -> list[Event]:
    """The events of a pushed batch: one per quote that is news to ``book`` (which it updates)."""
    events = (quote_news(quote, book, factory) for quote in frame.quotes)
    return [event for event in events if event is not None]


def quote_news(
    quote: Quote, book: QuoteBook, factory: SourceContext | EventFactory
) -> Event | None:
    """The event of ``quote`` if it is news to ``book`` (which it updates), else None: a
    repeated snapshot, or an out-of-order fancy quote."""
    previous = book.news(quote)
    if previous is None:
        return None
    type_, data, id_ = quote_event(quote, previous, book.move)
    ts = event_time(quote)
    return factory.event(type_, data, id=id_, time=utc_iso(ts) if ts is not None else "")


def cursor_key(product: tuple[str, ...]) -> str:
    """Where a product's last values are saved (``QuoteBook.saved``): a ``~`` key, which
    the daemon forgets once the product is not quoted for its dedup horizon (markets
    end; their products must not pile up)."""
    return "~quote|" + "|".join(product)


# websockets logs the request line, query (the token) and all, at debug level.
WEBSOCKETS_LOGGER = ScrubbingLogger(query=["authorization"])


class CkexSource(Source):
    """Sportsbook and fancy quotes pushed by the ckex / uni247 interact ws."""

    name = "ckex"
    Config = CkexConfig
    event_types = EVENT_TYPES

    def __init__(self, config: SourceConfig, ctx: SourceContext) -> None:
        super().__init__(config, ctx)
        # Kept across reconnects, and each product's last values saved as a cursor across
        # restarts: a re-sent snapshot is no news, a change a new fact (SPEC section 4).
        self.book = QuoteBook(clock=time.time)
        self.errors = 0  # error frames received
        self.heard = 0.0  # when the last frame arrived (unix seconds): a gap starts there
        self._error_logged = -ERROR_LOG_EVERY

    @classmethod
    def frame_parser(cls, config: SourceConfig, factory: EventFactory) -> FrameParser:
        """Recorded frames -> events, with a ``QuoteBook`` kept across frames as in ``run``.

        Keepalives and error frames give no event; a batch's malformed items are skipped
        (the live source counts them as rejected) and its good quotes kept.
        """
        book = QuoteBook()

        def parse(raw: str | bytes) -> list[Event]:
            frame = parse_frame(raw)
            return quote_events(frame, book, factory) if isinstance(frame, Quotes) else []

        return parse

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        config = self.config
        assert isinstance(config, CkexConfig)  # the daemon validated it with Config
        backoff = Backoff(maximum=config.max_backoff)
        started = False
        lost_at = ""  # when the last good connection ended: the start of a gap
        while True:
            try:
                url = connect_url(config.url, config.token.get())
                async with connect(
                    url,
                    max_size=MAX_FRAME,
                    open_timeout=OPEN_TIMEOUT,
                    logger=WEBSOCKETS_LOGGER,
                    create_connection=BatchedConnection,
                ) as ws:
                    assert isinstance(ws, BatchedConnection)
                    self.heard = time.time()
                    await self._register(ws, config)
                    await ws.send(start_command())
                    backoff.connected()
                    await self.ctx.up()
                    if not started:
                        task_status.started()  # once: the daemon's start-up waits for it
                        started = True
                    if lost_at:
                        await self.ctx.gap(
                            "reconnected; events while disconnected may be missed",
                            since=lost_at,
                            until=utc_iso(),
                        )
                        lost_at = ""
                    await self._receive(ws, config, backoff)
                wait = backoff.delay()  # silent for stale_after: reopen the connection
            except Exception as err:  # never BaseException: cancellation must pass through
                reason, only_the_user_can_fix = self._describe(err, config)
                await self.ctx.down(reason)
                # A refused token: retrying sooner cannot help; a rotated one (or a
                # reload) is picked up at the next try.
                wait = backoff.give_up_delay() if only_the_user_can_fix else backoff.delay()
            if started and not lost_at:
                # From the last frame: a silent connection loses pushes before it is
                # found stale.
                lost_at = utc_iso(self.heard or None)
            await anyio.sleep(wait)

    async def _register(self, ws: ClientConnection, config: CkexConfig) -> None:
        """Register every market; the server acknowledges nothing, so sending is all."""
        for entry in config.markets:
            await ws.send(register_command(entry.market()))

    async def _receive(self, ws: BatchedConnection, config: CkexConfig, backoff: Backoff) -> None:
        """Handle frames; return after ``stale_after`` of silence, raise when closed."""
        last_frame = anyio.current_time()
        next_register = last_frame + config.resubscribe_every
        while True:
            now = anyio.current_time()
            if now >= next_register:
                # Quotes of a market stop about an hour after it was registered. The start
                # again costs nothing and suits a server that wants it after each.
                await self._register(ws, config)
                await ws.send(start_command())
                next_register = now + config.resubscribe_every
            # Only the wait has a deadline: frames in hand are handled whole.
            wake = min(last_frame + config.stale_after, next_register)
            batch = await ws.recv_batch(within=wake - now)
            if not batch:
                if anyio.current_time() >= last_frame + config.stale_after:
                    silence = format_duration(config.stale_after)
                    await self.ctx.stale(f"nothing received for {silence}")
                    return
                continue
            self.heard = time.time()
            backoff.healthy()
            for raw in batch:
                self.ctx.received(raw)
                await self._handle(raw)
            # Silence counts from when the last frame was handled: handing its events
            # over may have waited for the engine.
            last_frame = anyio.current_time()

    async def _handle(self, raw: str | bytes) -> None:
        try:
            frame = parse_frame(raw)
        except ValueError as err:
            self.ctx.reject(str(err))  # a short fixed label, never frame content
            return
        if isinstance(frame, Keepalive):
            return
        if isinstance(frame, ServerError):
            self._server_error(frame.message)
            return
        assert isinstance(frame, Quotes)
        for _ in range(frame.invalid):
            self.ctx.reject("malformed quote")
        events: list[Event] = []
        cursors: list[tuple[str, str]] = []
        for quote in frame.quotes:
            product = QuoteBook.key(quote)
            if product not in self.book:  # new to this run (or forgotten): as saved before?
                saved = await self.ctx.load_cursor(cursor_key(product))
                if saved is not None:
                    self.book.recall(product, saved)
            event = quote_news(quote, self.book, self.ctx)
            if event is not None:
                events.append(event)
                cursors.append((cursor_key(product), self.book.saved(product)))
        await self.ctx.emit_many(events)
        for key, value in cursors:  # after the events: committed once their alerts are
            await self.ctx.save_cursor(key, value)  # (SPEC section 5)

    def _server_error(self, message: str) -> None:
        """Count an error frame; the connection stays (the server keeps it open too)."""
        self.errors += 1
        now = time.monotonic()
        level = logging.DEBUG
        if now - self._error_logged >= ERROR_LOG_EVERY:
            level, self._error_logged = logging.WARNING, now
        self.ctx.logger.log(
            level,
            "source %r: the server sent an error (%d so far): %s",
            self.ctx.source,
            self.errors,
            self._scrub(message)[:200],
        )

    def _describe(self, err: Exception, config: CkexConfig) -> tuple[str, bool]:
        """A reason for ``source.down`` (never the URL's query), and whether it is the token."""
        if isinstance(err, InvalidStatus) and err.response.status_code in AUTH_REFUSED:
            return self._refusal(f"HTTP {err.response.status_code}", config), True
        if isinstance(err, ConnectionClosed) and err.rcvd and err.rcvd.code == POLICY_CLOSE:
            # The other reading of a refusal [inferred]: the upgrade accepted, then closed.
            said = printable(err.rcvd.reason)
            return self._refusal(" ".join(filter(None, ["close 1008", said])), config), True
        return self._reason(err, config), False

    def _reason(self, err: Exception, config: CkexConfig) -> str:
        where = safe_url(config.url)
        if isinstance(err, InvalidStatus):
            return f"HTTP {err.response.status_code} at the WebSocket upgrade of {where}"
        if isinstance(err, InvalidURI):
            return f"invalid URL {where}"
        if isinstance(err, TimeoutError):
            return f"no answer from {where} within {format_duration(OPEN_TIMEOUT)}"
        if closed_for_size(err):
            self.ctx.reject("oversized frame")
        return self._scrub(failure_reason(err))

    def _refusal(self, how: str, config: CkexConfig) -> str:
        reason = self._scrub(f"the server refused the token ({how})")
        expires = token_expiry(config.token.get())
        if expires is not None and expires <= time.time():
            reason += f"; it expired at {utc_iso(expires)}"
        return reason

    def _scrub(self, text: str) -> str:
        config = self.config
        assert isinstance(config, CkexConfig)
        token = config.token.get()
        return redact_query(text.replace(token, "***") if token else text)
