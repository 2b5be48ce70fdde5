"""The BGE source: one WebSocket to BGE's v2 endpoint, public and private channels.

A thin async loop around ``protocol``, one connection at a time:

- connect (no credential travels in the URL or the headers); when a subscription is
  private (``biz = "exchange"``) log in first, then send one ``sub`` per subscription and
  wait for every ack: only then is the source up;
- answer each ``{"ping": ts}`` with ``{"pong": ts}`` at once (BGE closes a session whose
  pong is 30 s late);
- every outgoing message passes a token bucket (at most 40 in any second against BGE's
  50, with a reserve for pongs), so 1000 subscriptions never trip the limit nor delay
  a pong;
- BGE closes a session nothing was pushed on for 30 s, and a quiet channel (orders,
  assets, a thin market) pushes nothing: after ``keepalive`` without data the source
  sends a ``req`` for a ticker snapshot, whose answer is only a sign of life;
- one event per pushed item; a repeated ``seq_id`` is dropped, a skipped one reported as
  ``source.gap`` (``seq_gaps``); a book (orderbook, percent10) or a balance (assets) is
  an event when it changes, and its last content is saved (``~state|<channel>``, with the
  product for a balance), so a restart neither repeats an unchanged one nor misses a
  change made while it was stopped;
- candles resume: the open time of the last candle seen is the cursor
  (``candles:<PRODUCT>:<interval>``); after a reconnect or a restart a ``req`` with
  ``from``/``to`` fetches what was missed (at most ``backfill_limit`` candles). Other
  channels cannot resume: a reconnect emits one ``source.gap`` naming them (orderbook and
  percent10 are full snapshots and need none).

Record and replay: every frame read, compressed ones as the bytes received, goes to
``ctx.received``; ``BGESource.frame_parser`` turns such frames back into events through
the same ``PushIntake`` (``intake.py``): zip frames inflated with the same sniffing and
size cap, repeated ``seq_id`` and recently emitted ids dropped as live, candles ``req``
answers (the backfill) replayed like the live source emits them. Pings, acks, login
replies and the keepalive's ticker answers give no event. Not replayed: ``source.gap``
and the other status events (a skipped ``seq_id`` is only noticed, not reported), and
the ``time`` of items that carry none (orderbook, percent10, and orders or assets
without ``ts``: live, the receipt time; on replay, the replay's). A candles answer that
came after the source had given up on it (10 s) was dropped live but replays.
"""

from __future__ import annotations

import time
from collections import deque
from typing import NamedTuple

import anyio
from anyio.abc import TaskStatus
from websockets.asyncio.client import connect

from tocsin import (
    Backoff,
    BatchedConnection,
    Event,
    EventFactory,
    FrameParser,
    ScrubbingLogger,
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

from .config import BGEConfig, BGESubscription
from .intake import PushIntake
from .protocol import (
    EVENT_TYPES,
    INTERVAL_SECONDS,
    MAX_FRAME,
    SEQ_GAP_TYPES,
    SNAPSHOT_TYPES,
    ChannelKey,
    Ping,
    Push,
    Reply,
    TokenBucket,
    candle_time,
    canonical_interval,
    login_message,
    parse_frame,
    pong_message,
    refusal,
    req_message,
    sign,
    sub_message,
)

OPEN_TIMEOUT = 10.0
CLOSE_TIMEOUT = 2.0  # a dead peer never answers the close handshake: do not wait long
ANSWER_TIMEOUT = 10.0  # for the login, each sub and each backfill req
CANDLES_PER_REQ = 500
"""Candles asked for in one backfill ``req``: its answer stays far below ``MAX_FRAME``
(about 130 bytes a candle), whatever ``backfill_limit`` is."""
KEEPALIVE_PRODUCT = "BTC_USDT"  # what to ask a ticker of when no subscription names a pair
GAP_REASON = "reconnected; pushes while disconnected may be missed"


def state_cursor(state: str) -> str:
    """Where a book's or a balance's last content id is saved (``PushIntake.recall``): a
    ``~`` key, which the daemon forgets once it is not saved for its dedup horizon."""
    return f"~state|{state}"


def cursor_key(channel: ChannelKey) -> str:
    """Where a candles channel keeps the open time of its last candle: ``candles:BTC_USDT:15min``."""
    return f"{channel.type}:{channel.product}:{channel.interval}"


def backfill_range(
    cursor: int, now: int, interval: str, limit: int
) -> tuple[int, int, tuple[int, int] | None]:
    """``(from, to, skipped)`` for a candles ``req`` resuming at ``cursor``.

    ``from`` is the cursor's own candle (it may have changed since it was last seen).
    When more than ``limit`` newer candles are missing, only the newest ``limit`` are
    fetched, and ``skipped`` is the open times of the first and last candle left out.
    Candles open on multiples of their interval since the epoch [inferred; a month is
    taken as 30 days, which only widens the range].
    """
    step = INTERVAL_SECONDS[canonical_interval(interval)]
    if (now - cursor) // step > limit:  # the candles after the cursor's own
        start = (now // step - (limit - 1)) * step  # on a candle's open time
        return start, now, (cursor + step, start - step)
    return cursor, now, None


# -- logging ---------------------------------------------------------------------------


# websockets logs every frame at debug level; a login frame (key, signature) never shows.
WS_LOGGER = ScrubbingLogger(hide_frames=[b'"access_sign"', b'"access-sign"'])


# -- the source ------------------------------------------------------------------------


class BGESource(Source):
    """Market data and account updates pushed by BGE: one event per pushed item."""

    name = "bge"
    Config = BGEConfig
    event_types = EVENT_TYPES

    def __init__(self, config: BGEConfig | SourceConfig, ctx: SourceContext) -> None:
        if not isinstance(config, BGEConfig):
            raise TypeError("BGESource needs a BGEConfig")
        super().__init__(config, ctx)
        self.bge = config
        self.channels = {s.key: s for s in config.subscriptions}
        # Kept across connections: what was emitted lately and the seq_ids seen (several
        # connections and resubscribes repeat them), and each candles channel's cursor.
        self.intake = PushIntake(self.channels, clock=time.time)
        self.candle_cursors: dict[ChannelKey, int] = {}
        # A candles channel's newest live candle while its backfill is still awaited: the
        # cursor may not pass candles not fetched yet (a crash would skip them for good).
        self.held_cursors: dict[ChannelKey, int] = {}
        self.last_push: dict[ChannelKey, str] = {}  # when each channel last pushed (ISO)
        self.backoff = Backoff(maximum=config.max_backoff)
        self._task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
        self._started = False
        self._up = False
        self._last_frame = 0.0  # when the last frame arrived (unix seconds)
        self._lost_since = ""  # start of the current outage, until the next subscription

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        self._task_status = task_status
        while True:
            try:
                await self._connect()
                wait = self.backoff.delay()  # went stale: reopen
            except SourceAuthError as err:
                await self.ctx.down(str(err))
                wait = self.backoff.give_up_delay()  # only the user can fix it
            except Exception as err:  # never BaseException: cancellation must pass through
                if closed_for_size(err):
                    self.ctx.reject("oversized frame")
                await self.ctx.down(failure_reason(err, open_timeout=OPEN_TIMEOUT))
                wait = self.backoff.delay()
            if self._up:
                self._up = False
                self._lost_since = utc_iso(self._last_frame)
            await anyio.sleep(wait)

    async def _connect(self) -> None:
        async with connect(
            self.bge.url,
            max_size=MAX_FRAME,
            open_timeout=OPEN_TIMEOUT,
            close_timeout=CLOSE_TIMEOUT,
            ping_interval=None,  # BGE pings us; our own pings would count as messages
            logger=WS_LOGGER,
            create_connection=BatchedConnection,
        ) as ws:
            assert isinstance(ws, BatchedConnection)
            self._last_frame = time.time()
            self.intake.seqs.reset()
            session = _Session(self, ws, await self._resume_points())
            await session.run()

    async def _resume_points(self) -> dict[ChannelKey, int]:
        """The open time of the last candle seen on each candles channel, if any."""
        points = {}
        for key in self.channels:
            if key.type != "candles":
                continue
            if key not in self.candle_cursors:
                saved = await self.ctx.load_cursor(cursor_key(key))
                if saved is not None and saved.isascii() and saved.isdigit():
                    self.candle_cursors[key] = int(saved)
            if key in self.candle_cursors:
                points[key] = self.candle_cursors[key]
        return points

    def frame_arrived(self) -> None:
        self._last_frame = time.time()
        self.backoff.healthy()

    async def subscribed(self, session: _Session) -> None:
        """Every subscription is acked: up, then what the outage may have cost."""
        self.backoff.connected()
        self._up = True
        await self.ctx.up()
        if not self._started:
            self._started = True
            self._task_status.started()  # once: the daemon's start-up waits for it
        resumable = set(session.resume_from) if self.bge.backfill else set()
        reconnected, since = bool(self._lost_since), self._lost_since
        self._lost_since = ""
        if reconnected:
            lost = [
                k.label
                for k in self.channels
                if k.type not in SNAPSHOT_TYPES and k not in resumable
            ]
            if lost:
                await self.ctx.gap(
                    GAP_REASON, since=since, until=utc_iso(), detail={"channels": ", ".join(lost)}
                )
        now = int(time.time())
        for key, cursor in session.resume_from.items():
            if not self.bge.backfill:
                if not reconnected:  # a restart: the reconnect gap above covers the rest
                    await self.ctx.gap(
                        "backfill is off: candles since the last one seen were not fetched",
                        since=utc_iso(cursor),
                        detail={"channel": key.label},
                    )
                continue
            start, end, skipped = backfill_range(
                cursor, now, self.channels[key].interval, self.bge.backfill_limit
            )
            if skipped is not None:
                first, last = skipped
                await self.ctx.gap(
                    f"more than backfill_limit ({self.bge.backfill_limit}) candles missed;"
                    " only the newest were fetched",
                    since=utc_iso(cursor),
                    until=utc_iso(start),
                    detail={"channel": key.label, "from_time": first, "to_time": last},
                )
            session.backfill(self.channels[key], start, end)

    async def backfill_lost(self, key: ChannelKey, start: int, end: int, why: str) -> None:
        await self.ctx.gap(
            f"candles could not be fetched: {why}",
            since=utc_iso(start),
            until=utc_iso(end),
            detail={"channel": key.label, "from_time": start, "to_time": end},
        )
        # The range is reported: the cursor may move on to the live candles seen meanwhile.
        await self._advance(key, self.held_cursors.pop(key, None))

    async def _advance(self, key: ChannelKey, newest: int | None) -> None:
        """Save a candles channel's cursor at ``newest`` if it moves it forward."""
        if newest is not None and newest > self.candle_cursors.get(key, -1):
            # Saved as a candle opens (once per interval), after its events.
            self.candle_cursors[key] = newest
            await self.ctx.save_cursor(cursor_key(key), str(newest))

    @classmethod
    def frame_parser(cls, config: SourceConfig, factory: EventFactory) -> FrameParser:
        """Recorded frames back into events (the module docstring says what replays)."""
        if not isinstance(config, BGEConfig):
            raise TypeError("BGESource needs a BGEConfig")
        intake = PushIntake(s.key for s in config.subscriptions)

        def parse(raw: str | bytes) -> list[Event]:
            try:
                msg = parse_frame(raw)
            except ValueError as err:
                raise ValueError(f"malformed frame: {err}") from None
            if not isinstance(msg, Push):
                return []  # pings, acks, login replies
            key = intake.route(msg.channel)
            if key is None or (msg.answer and key.type != "candles"):
                return []  # not subscribed, or the keepalive's ticker answer
            try:
                taken = intake.take(key, msg, factory, backfill=msg.answer, gaps=False)
            except ValueError as err:
                raise ValueError(f"malformed {key.type} push: {err}") from None
            return taken.events

        return parse

    async def on_push(
        self,
        key: ChannelKey,
        push: Push,
        *,
        backfill: bool,
        awaiting: bool = False,
        final: bool = True,
    ) -> bool:
        """Emit the new items of a push (or of a candles backfill answer); False if rejected.

        A skipped ``seq_id`` is a gap. ``awaiting``: the channel's backfill is still to
        come, so a live candle does not move its cursor yet; ``final``: a backfill answer
        is the last of its backfill (the live candles held meanwhile may move the cursor)."""
        since = self.last_push.get(key, "")
        gaps = self.bge.seq_gaps and key.type in SEQ_GAP_TYPES
        for state in self.intake.to_recall(key, push):  # first seen in this run
            self.intake.recall(state, await self.ctx.load_cursor(state_cursor(state)))
        try:
            taken = self.intake.take(key, push, self.ctx, backfill=backfill, gaps=gaps)
        except ValueError as err:
            self.ctx.reject(f"malformed {key.type} push: {err}")
            return False
        for first, last in taken.missing:
            await self.ctx.gap(
                "pushes lost: seq_id skipped",
                since=since or utc_iso(),
                until=utc_iso(),
                detail={"channel": key.label, "from_seq": first, "to_seq": last},
            )
        if not backfill:
            self.last_push[key] = utc_iso()
        await self.ctx.emit_many(taken.events)
        for state, content in taken.states:  # after the events: committed with their alerts
            await self.ctx.save_cursor(state_cursor(state), content)
        if key.type == "candles":
            times = [t for i in taken.items if (t := candle_time(i.data, push)) is not None]
            newest = max(times, default=None)
            if awaiting:
                if newest is not None:
                    self.held_cursors[key] = max(newest, self.held_cursors.get(key, newest))
            else:
                held = self.held_cursors.pop(key, None) if backfill and final else None
                candidates = [t for t in (newest, held) if t is not None]
                await self._advance(key, max(candidates, default=None))
        return True


class Backfill(NamedTuple):
    """A candles backfill under way: the req awaited asks for ``start``..``last``, the
    backfill goes on to ``end``, a candle every ``step`` seconds."""

    start: int
    last: int
    end: int
    step: int
    overdue: float  # when the awaited answer is too late


class _Session:
    """One connection: the outbox behind the token bucket, the answers awaited, timers."""

    def __init__(
        self, source: BGESource, ws: BatchedConnection, resume_from: dict[ChannelKey, int]
    ) -> None:
        self.source = source
        self.ctx = source.ctx
        self.config = source.bge
        self.ws = ws
        self.resume_from = resume_from
        now = anyio.current_time()
        self.bucket = TokenBucket(now)
        self.outbox: deque[tuple[str, ChannelKey | None]] = deque()
        self.unsent_subs = 0
        self.next_send: float | None = None
        self.login_deadline: float | None = None
        self.acks: dict[ChannelKey, float] = {}  # subs sent -> when their ack is overdue
        self.backfills: dict[ChannelKey, Backfill] = {}  # the req of each awaited
        self.live = False
        self.last_frame = now
        self.last_data = now

    async def run(self) -> None:
        """Log in and subscribe, then handle frames until silence (return) or failure (raise)."""
        if any(s.private for s in self.config.subscriptions):
            self.login()
        else:
            self.subscribe_all()
        stale_after, keepalive = self.config.stale_after, self.config.keepalive
        while True:
            await self.flush()
            now = anyio.current_time()
            await self.check_overdue(now)
            if now - self.last_frame >= stale_after:
                await self.ctx.stale(f"nothing received for {format_duration(stale_after)}")
                return
            # Also while a long queue of subs drains (1000 take 33 s): BGE's idle rule
            # counts from the first sub.
            if self.login_deadline is None and now - self.last_data >= keepalive:
                self.keepalive()
                self.last_data = now
                continue
            wake = [self.last_frame + stale_after, *self.acks.values()]
            wake += [job.overdue for job in self.backfills.values()]
            if self.next_send is not None:
                wake.append(self.next_send)
            if self.login_deadline is not None:
                wake.append(self.login_deadline)
            if self.login_deadline is None:
                wake.append(self.last_data + keepalive)
            # Only the wait has a deadline: frames in hand are handled whole.
            batch = await self.ws.recv_batch(within=min(wake) - now)
            if not batch:
                continue
            self.source.frame_arrived()
            for raw in batch:
                await self.handle(raw)
            # Silence counts from when the last frame was handled: handing its events
            # over may have waited for the engine.
            self.last_frame = anyio.current_time()

    # -- outgoing ----------------------------------------------------------------------

    def login(self) -> None:
        access_key, secret_key = self.config.access_key, self.config.secret_key
        assert access_key is not None and secret_key is not None  # the config checked it
        timestamp = int(time.time() * 1000)
        signature = sign(secret_key.get(), timestamp)
        register_secret(signature, transient=True)  # a live credential until it expires
        self.outbox.append((login_message(access_key.get(), signature, timestamp), None))
        self.login_deadline = anyio.current_time() + ANSWER_TIMEOUT

    def subscribe_all(self) -> None:
        for sub in self.config.subscriptions:
            message = sub_message(
                sub.channel_biz, sub.type, sub.product, sub.interval, zip=self.config.zip
            )
            self.outbox.append((message, sub.key))
            self.unsent_subs += 1

    def backfill(self, sub: BGESubscription, start: int, end: int) -> None:
        """Ask for the candles from ``start`` to ``end``, ``CANDLES_PER_REQ`` at a time: a
        req for the first ones now, each answer asks for the next (``handle``)."""
        step = INTERVAL_SECONDS[canonical_interval(sub.interval)]
        last = min(end, start + (CANDLES_PER_REQ - 1) * step)
        message = req_message(
            "market",
            "candles",
            sub.product,
            sub.interval,
            zip=self.config.zip,
            start=start,
            end=last,
        )
        self.outbox.append((message, None))
        overdue = anyio.current_time() + ANSWER_TIMEOUT
        self.backfills[sub.key] = Backfill(start, last, end, step, overdue)

    def keepalive(self) -> None:
        """A ticker snapshot ``req``: its answer is pushed data, which BGE's idle rule wants."""
        first = self.config.subscriptions[0]
        product = first.product if first.product != "all" else KEEPALIVE_PRODUCT
        # First in line: it must not wait behind the queue of subs it keeps alive.
        self.outbox.appendleft(
            (req_message("market", "ticker", product, zip=self.config.zip), None)
        )

    async def flush(self) -> None:
        """Send what the token bucket allows now; ``next_send`` says when to try again."""
        self.next_send = None
        while self.outbox:
            now = anyio.current_time()
            wait = self.bucket.take(now)
            if wait > 0:
                self.next_send = now + wait
                return
            message, key = self.outbox.popleft()
            await self.ws.send(message)
            if key is not None:
                self.unsent_subs -= 1
                self.acks[key] = anyio.current_time() + ANSWER_TIMEOUT

    async def pong(self, value: int | float | str) -> None:
        """At once: pongs may spend the reserve the bucket keeps from everything else."""
        wait = self.bucket.take(anyio.current_time(), priority=True)
        if wait > 0:  # only when pings flood in faster than the rate
            await anyio.sleep(wait)
            self.bucket.spend(anyio.current_time())
        await self.ws.send(pong_message(value))

    async def check_overdue(self, now: float) -> None:
        if self.login_deadline is not None and now >= self.login_deadline:
            raise SourceError(f"no answer to the login within {format_duration(ANSWER_TIMEOUT)}")
        for key, overdue in self.acks.items():
            if now >= overdue:
                raise SourceError(
                    f"no answer to the subscription to {key.label}"
                    f" within {format_duration(ANSWER_TIMEOUT)}"
                )
        for key, job in list(self.backfills.items()):
            if now >= job.overdue:
                del self.backfills[key]
                await self.source.backfill_lost(key, job.start, job.end, "no answer to the req")

    # -- incoming ----------------------------------------------------------------------

    async def handle(self, raw: str | bytes) -> None:
        self.ctx.received(raw)
        try:
            msg = parse_frame(raw)
        except ValueError as err:
            self.ctx.reject(f"malformed frame: {err}")
            return
        if isinstance(msg, Ping):
            await self.pong(msg.value)
        elif isinstance(msg, Reply):
            await self.reply(msg)
        elif isinstance(msg, Push):
            self.last_data = anyio.current_time()
            key = self.source.intake.route(msg.channel)
            if msg.answer:
                if key is not None and key in self.backfills:
                    job = self.backfills.pop(key)
                    more = job.last + job.step <= job.end
                    if more:  # asked for before the events: live candles wait for the rest
                        self.backfill(self.source.channels[key], job.last + job.step, job.end)
                    if not await self.source.on_push(key, msg, backfill=True, final=not more):
                        self.backfills.pop(key, None)  # its answer will be a sign of life
                        await self.source.backfill_lost(
                            key, job.start, job.end, "a malformed answer"
                        )
                # else: the answer to a keepalive req, a sign of life only
            elif key is None:
                self.ctx.logger.debug(
                    "source %r: push on %s, which is not subscribed",
                    self.ctx.source,
                    msg.channel.label,
                )
            else:
                awaiting = key in self.backfills
                await self.source.on_push(key, msg, backfill=False, awaiting=awaiting)

    async def reply(self, msg: Reply) -> None:
        if msg.event == "login":
            if self.login_deadline is None:
                return  # not waiting for one
            if not msg.ok:
                raise refusal("login", msg.code, msg.msg, None)
            self.login_deadline = None
            self.subscribe_all()
        elif msg.event == "sub":
            named = msg.channel
            if named is None and len(self.acks) == 1:
                named = next(iter(self.acks))  # the only one it can be about
            if not msg.ok:
                raise refusal("sub", msg.code, msg.msg, named)
            if named is None and self.acks:
                named = next(iter(self.acks))  # an ack that names nothing: the oldest
            if named not in self.acks:
                return
            del self.acks[named]
            if not self.acks and not self.unsent_subs and not self.live:
                self.live = True
                await self.source.subscribed(self)
        elif msg.event == "req":
            if msg.channel in self.backfills and not msg.ok:
                job = self.backfills.pop(msg.channel)
                await self.source.backfill_lost(
                    msg.channel, job.start, job.end, f"error {msg.code}"
                )
        elif not msg.ok:
            if self.login_deadline is not None:
                raise refusal("login", msg.code, msg.msg, None)
            if not self.live:
                raise refusal(msg.event or "sub", msg.code, msg.msg, msg.channel)
            self.ctx.logger.warning(
                "source %r: BGE answered %s with error %s: %s",
                self.ctx.source,
                msg.event or "a request",
                msg.code,
                msg.msg,
            )
