"""The EOSPark source: one WebSocket per API key, subscribed to EOS actions.

A thin async loop around ``protocol``: connect with the key in the ``apikey`` upgrade
header, send one ``subscribe`` per configured subscription, wait for every ack, then emit
one ``action`` event per action of each pushed transaction. The server sends a heartbeat
every 10 s; ``stale_after`` (default 30 s) of silence means the connection is dead.
EOSPark cannot replay, so every reconnect emits ``source.gap``.

``frame_parser`` turns frames saved by ``tocsin record`` into the same events, through
``transaction_events``, the function the live loop uses.
"""

from __future__ import annotations

import re
import time
from typing import Annotated, Any

import anyio
from anyio.abc import TaskStatus
from pydantic import BeforeValidator, Field, field_validator, model_validator
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from tocsin import (
    Backoff,
    BatchedConnection,
    ConfigModel,
    Duration,
    Event,
    EventFactory,
    FrameParser,
    RecentIds,
    ScrubbingLogger,
    Secret,
    Source,
    SourceAuthError,
    SourceConfig,
    SourceContext,
    SourceError,
    closed_for_size,
    failure_reason,
    format_duration,
    utc_iso,
)

from .protocol import (
    EVENT_TYPE,
    MAX_ACCOUNTS,
    MAX_CONTRACTS,
    MAX_FRAME,
    Ack,
    Message,
    PushData,
    Refusal,
    Transaction,
    action_id,
    action_parts,
    is_eos_name,
    parse_frame,
    read_frame,
    split_names,
    subscribe_message,
)

DEFAULT_URL = "wss://ws.eospark.com/v1/ws"
OPEN_TIMEOUT = 10.0
CLOSE_TIMEOUT = 2.0  # a dead peer never answers the close handshake: do not wait long
SUBSCRIBE_TIMEOUT = 10.0
GAP_REASON = "reconnected; events while disconnected may be missed"


def unanswered() -> SourceError:
    """No ack of the subscription within ``SUBSCRIBE_TIMEOUT``."""
    return SourceError(f"no answer to the subscription within {format_duration(SUBSCRIBE_TIMEOUT)}")


_APIKEY_IN_QUERY = re.compile(r"(apikey=)[^&\s#]*", re.IGNORECASE)


# -- config ----------------------------------------------------------------------------


def _names(value: object) -> list[str]:
    names = split_names(value)
    if not names:
        raise ValueError("must name at least one")
    for name in names:
        if not is_eos_name(name):
            raise ValueError(
                f"{name[:40]!r} is not an EOS name (up to 13 characters: a-z, 1-5 and '.')"
            )
    return names


EOSNames = Annotated[list[str], BeforeValidator(_names)]


class EOSParkSubscription(ConfigModel):
    """One ``subscriptions`` entry: ``action`` of ``contract`` involving ``account``."""

    account: EOSNames
    contract: EOSNames
    action: str = ""  # "" = every action

    @field_validator("action")
    @classmethod
    def _action(cls, value: str) -> str:
        value = value.strip()
        if value and not is_eos_name(value):
            raise ValueError(f'{value[:40]!r} is not an EOS action name (or "" for all)')
        return value


class EOSParkConfig(SourceConfig):
    """``[sources.NAME]`` with ``plugin = "eospark"``; unknown keys are errors."""

    url: str = DEFAULT_URL
    api_key: Secret
    subscriptions: list[EOSParkSubscription] = Field(min_length=1)
    # The server's heartbeat comes every 10 s: three missed ones mean a dead connection.
    stale_after: Duration = Field(default=30.0, ge=1.0)

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        if not value.startswith(("ws://", "wss://")):
            raise ValueError("expected a ws:// or wss:// URL")
        if _APIKEY_IN_QUERY.search(value):
            # URLs end up in logs; the key travels in a header instead.
            raise ValueError("put the key in api_key, not in the URL")
        return value

    @model_validator(mode="after")
    def _limits(self) -> EOSParkConfig:
        accounts = unique(n for s in self.subscriptions for n in s.account)
        contracts = unique(n for s in self.subscriptions for n in s.contract)
        for what, names, limit in (
            ("accounts", accounts, MAX_ACCOUNTS),
            ("contracts", contracts, MAX_CONTRACTS),
        ):
            if len(names) > limit:
                raise ValueError(
                    f"subscriptions: EOSPark allows at most {limit} {what} on a connection"
                    f" (one connection per API key); these name {len(names)}: {', '.join(names)}"
                )
        return self


def unique(names: Any) -> list[str]:
    """``names`` in order, without repeats."""
    return list(dict.fromkeys(names))


# -- logging and failures --------------------------------------------------------------

# websockets logs every handshake header (the key is one) and the path at debug level.
WS_LOGGER = ScrubbingLogger(headers=["apikey"], query=["apikey"])


def failure(err: Exception) -> tuple[str, bool]:
    """Why a connection failed, and whether only the user can fix it (a refused key)."""
    if isinstance(err, SourceAuthError):
        return str(err), True
    if isinstance(err, InvalidStatus):
        status = err.response.status_code
        if status == 403:
            return "EOSPark refused the API key (HTTP 403)", True
        if status == 406:
            return "EOSPark refused a second connection with this API key (HTTP 406)", False
    return failure_reason(err, open_timeout=OPEN_TIMEOUT), False


def refusal_error(msg: Refusal) -> SourceError:
    """The exception for a frame with a non-zero ``errno``."""
    if msg.bad_key:
        return SourceAuthError(f"EOSPark refused the API key ({msg.errno} {msg.errmsg})")
    if msg.repeat_connection:
        # Not the key's fault: the server may not have reaped our last connection yet.
        return SourceError(
            f"EOSPark refused a second connection with this API key ({msg.errno} {msg.errmsg})"
        )
    return SourceError(f"EOSPark error {msg.errno} on {msg.msg_type}: {msg.errmsg}")


def transaction_events(
    trx: Transaction | Any, recent: RecentIds, factory: SourceContext | EventFactory
) -> list[Event]:
    """The events of a pushed transaction, less those no rule can fire on (``sift``: their
    id and duplicate check are the costly part, on the path of every action) and the
    actions already seen (a re-push)."""
    trx_id = trx.trx_id
    return [
        factory.event(EVENT_TYPE, data, id=event_id, time=time)
        for index, time, data in action_parts(trx, factory.sift)
        if not recent.seen(event_id := action_id(trx_id, index))
    ]


class EOSParkSource(Source):
    """EOS actions pushed by EOSPark: one ``action`` event per action of a transaction."""

    name = "eospark"
    Config = EOSParkConfig
    event_types = (EVENT_TYPE,)

    def __init__(self, config: EOSParkConfig | SourceConfig, ctx: SourceContext) -> None:
        if not isinstance(config, EOSParkConfig):
            raise TypeError("EOSParkSource needs an EOSParkConfig")
        super().__init__(config, ctx)
        self.eospark = config
        self.recent = RecentIds()
        self._started = False
        self._up = False  # the current connection is subscribed
        self._last_frame = 0.0  # when the last frame arrived (unix seconds)
        self._lost_since = ""  # start of the current gap, until the next subscription

    @classmethod
    def frame_parser(cls, config: SourceConfig, factory: EventFactory) -> FrameParser:
        """Recorded frames -> events: pushes as in ``run`` (re-pushes dropped), others none."""
        recent = RecentIds()

        def parse(raw: str | bytes) -> list[Event]:
            msg = parse_frame(raw)
            return transaction_events(msg, recent, factory) if isinstance(msg, Transaction) else []

        return parse

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        backoff = Backoff(maximum=self.eospark.max_backoff)
        while True:
            try:
                await self._connect(backoff, task_status)
                wait = backoff.delay()  # went stale: reopen
            except Exception as err:  # never BaseException: cancellation must pass through
                if closed_for_size(err):
                    self.ctx.reject("oversized frame")
                reason, only_user_can_fix = failure(err)
                await self.ctx.down(reason)
                wait = backoff.give_up_delay() if only_user_can_fix else backoff.delay()
            if self._up:
                self._up = False
                self._lost_since = utc_iso(self._last_frame)
            await anyio.sleep(wait)

    async def _connect(self, backoff: Backoff, task_status: TaskStatus[None]) -> None:
        """One connection: subscribe, then receive until it fails or goes stale."""
        async with connect(
            self.eospark.url,
            additional_headers={"apikey": self.eospark.api_key.get()},
            max_size=MAX_FRAME,
            open_timeout=OPEN_TIMEOUT,
            close_timeout=CLOSE_TIMEOUT,
            logger=WS_LOGGER,
            create_connection=BatchedConnection,
        ) as ws:
            assert isinstance(ws, BatchedConnection)
            self._last_frame = time.time()
            messages = [
                subscribe_message(s.account, s.contract, s.action)
                for s in self.eospark.subscriptions
            ]
            try:
                for message in messages:
                    await ws.send(message)
            except ConnectionClosed:
                pass  # refused at once (403/406): the receive loop reads why, then raises
            await self._receive(ws, backoff, task_status, pending=len(messages))

    async def _receive(
        self, ws: BatchedConnection, backoff: Backoff, task_status: TaskStatus[None], pending: int
    ) -> None:
        """Handle frames; return after ``stale_after`` of silence, raise on any failure."""
        stale_after = self.eospark.stale_after
        ack_deadline = time.monotonic() + SUBSCRIBE_TIMEOUT
        heard = time.monotonic()
        while True:
            # Only the wait has a deadline: a frame in hand is handled whole, however long
            # that takes, and silence counts from when the last one was handled.
            deadline = heard + stale_after
            if pending:
                deadline = min(deadline, ack_deadline)
            batch = await ws.recv_batch(within=deadline - time.monotonic())
            if not batch:  # the deadline passed with nothing received
                if pending and time.monotonic() >= ack_deadline:
                    raise unanswered()
                if time.monotonic() - heard >= stale_after:
                    break
                continue
            self._last_frame = time.time()
            backoff.healthy()
            events: list[Event] = []  # the batch's events, handed over together
            for raw in batch:
                self.ctx.received(raw)
                try:
                    msg = read_frame(raw)
                except ValueError as err:
                    self.ctx.reject(f"malformed frame: {err}")
                    continue
                if type(msg) is PushData or isinstance(msg, Transaction):
                    events += transaction_events(msg, self.recent, self.ctx)
                    continue
                if events:  # what came before a control message goes first
                    await self.ctx.emit_many(events)
                    events = []
                pending = await self._control(msg, pending, backoff, task_status)
            if events:
                await self.ctx.emit_many(events)
            heard = time.monotonic()
            if pending and heard >= ack_deadline:  # frames, but no answer among them
                raise unanswered()
        await self.ctx.stale(f"nothing received for {format_duration(stale_after)}")

    async def _control(
        self, msg: Message, pending: int, backoff: Backoff, task_status: TaskStatus[None]
    ) -> int:
        """Act on a message other than a data push; returns how many subscribe acks are
        still awaited."""
        if isinstance(msg, Refusal):
            raise refusal_error(msg)
        elif isinstance(msg, Ack) and msg.msg_type.startswith("subscribe") and pending:
            if not msg.ok:
                raise SourceError(
                    f"EOSPark refused the subscription: {msg.msg or 'no reason given'}"
                )
            pending -= 1
            if not pending:
                await self._subscribed(backoff, task_status)
        return pending

    async def _subscribed(self, backoff: Backoff, task_status: TaskStatus[None]) -> None:
        backoff.connected()
        self._up = True
        await self.ctx.up()
        if not self._started:
            self._started = True
            task_status.started()  # once: the daemon's start-up waits for it
        if self._lost_since:
            # EOSPark does not replay: tell the rules which time range may be missing.
            await self.ctx.gap(GAP_REASON, since=self._lost_since, until=utc_iso())
            self._lost_since = ""
