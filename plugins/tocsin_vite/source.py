"""The Vite source: go-vite JSON-RPC subscriptions (push) or filters (poll), with backfill.

One connection. On every connect, in this order:

1. **subscribe** every channel (push: ``subscribe_subscribe``, mapping each new id to its
   channel, since the ids of the last connection are dead; poll: create the filters
   that do not exist yet, since filters outlive connections until they expire);
2. ``source.up``;
3. **resume** every watch (in poll mode, those of new filters, and of a filter whose last
   poll got no answer: the poll emptied it, and what it carried was lost): read the head
   (``ledger_getLatestSnapshotBlock`` / ``ledger_getLatestAccountBlock``), fetch the
   heights after the saved cursor in pages of at most 1000, emit them in ascending order;
4. handle the pushes that arrived meanwhile, then the ones that follow (or poll every
   ``poll_interval``).

A fact emitted once is not emitted again (an id is remembered with its ``removed``
flag, so a rollback pair re-add passes); the daemon's alert ids do the rest across
restarts. Gaps (``source.gap``, the range in ``detail``):

- first start (no cursor): no history: the cursor is set to the head;
- more than ``backfill_limit`` heights missing: the newest ``backfill_limit`` are
  fetched; the gap names the older ones (``from_height``..``to_height``);
- ``backfill = false``: nothing is fetched; the gap names the missed heights;
- a ledger call answered with an error: the gap names what was not fetched (or, for the
  check for a rollback while away, the heights not checked);
- topics without heights (``account_block`` of all accounts, ``unreceived_block``):
  after a reconnect or restart, a gap with the time range (``unreceived_block`` first
  re-lists what is still unreceived; what was received meanwhile may be missed).

After a restart ``since`` of a height gap is the source's start time (the heights in
``detail`` are what counts). Liveness: go-vite has no heartbeat. websockets pings the
socket; after ``stale_after`` without a frame the source asks for the snapshot height,
and a snapshot subscription silent for ``stale_after`` is stale (blocks come every
second).

Record and replay: every frame read (answers and pushes alike) goes to ``ctx.received``
(in ``RpcConnection``); ``ViteSource.frame_parser`` is ``pushes.ViteFrameParser``, which
replays pushes (rollbacks as ``removed`` events) and poll answers through the same
``Channel.facts``/``new_events`` as this loop, learning the subscription ids from the
recorded answers. Backfilled facts do not replay: ``pushes`` says why, and what else.
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Sequence
from typing import Any, Literal

import anyio
from anyio.abc import TaskStatus
from pydantic import Field, field_validator, model_validator
from websockets.asyncio.client import connect

from tocsin import (
    Backoff,
    ConfigModel,
    Duration,
    EventFactory,
    FrameParser,
    ResumableSourceConfig,
    ScrubbingLogger,
    Source,
    SourceConfig,
    SourceContext,
    SourceError,
    closed_for_size,
    failure_reason,
    format_duration,
    utc_iso,
)

from . import backfill
from .backfill import RECENT_FACTS, REREAD, Channel, Recent, Watch
from .protocol import (
    EVENT_TYPES,
    GET_CHANGES,
    MAX_FRAME,
    MAX_PAGE,
    MAX_REQUEST,
    SNAPSHOT,
    SNAPSHOT_HEIGHT,
    SUBSCRIBE,
    UNRECEIVED,
    Fact,
    created_id,
    poll_changes,
    topic_hash,
    vite_address,
    vmlog_request_size,
)
from .pushes import FactMemory, ViteFrameParser, new_events
from .rpc import CallFailed, RpcConnection

DEFAULT_URL = "wss://node.vite.net/gvite/ws"
OPEN_TIMEOUT = 10.0
CLOSE_TIMEOUT = 2.0
CALL_TIMEOUT = 10.0
PING_INTERVAL = 20.0  # websockets' keepalive ping: go-vite has no heartbeat of its own

GAP_LIMIT = "more heights were missed than backfill_limit; the oldest were not fetched"
GAP_OFF = "backfill is off; heights missed while away were not fetched"
GAP_LEDGER = "the ledger query failed; missed heights were not fetched"
GAP_ROLLED_BACK = (
    f"the chain was rolled back at or below the last height seen while away; the last"
    f" {REREAD} heights were read again and the facts they no longer hold retracted, but"
    " a deeper rollback's could not be"
)
GAP_UNCHECKED = (
    "the ledger query failed; whether the chain was rolled back at the last heights seen"
    " while away could not be checked"
)
GAP_NO_START = (
    "reconnected before a first position was known (the head could not be read);"
    " events while away may be missed"
)
GAP_NO_HEIGHT = "reconnected; this topic carries no height, events while away may be missed"
GAP_UNRECEIVED = (
    "reconnected; blocks that became unreceived and were received while away may be missed"
)
GAP_UNRECEIVED_LIMIT = "more blocks are unreceived than backfill_limit; not all were listed"

_ws_logger = ScrubbingLogger()


# -- config ----------------------------------------------------------------------------


class ViteSubscription(ConfigModel):
    """One ``subscriptions`` entry: a topic, and for some the addresses it concerns."""

    topic: Literal["snapshot_block", "account_block", "unreceived_block", "vmlog"]
    address: str | None = None
    addresses: list[str] | None = None
    topics: list[list[str]] | None = None  # vmlog only: topic prefixes, [] = any

    @field_validator("address")
    @classmethod
    def _address(cls, value: str | None) -> str | None:
        return None if value is None else vite_address(value)

    @field_validator("addresses")
    @classmethod
    def _addresses(cls, value: list[str] | None) -> list[str] | None:
        if value is None:
            return None
        if not value:
            raise ValueError("must name at least one address")
        return list(dict.fromkeys(vite_address(a) for a in value))

    @field_validator("topics")
    @classmethod
    def _topics(cls, value: list[list[str]] | None) -> list[list[str]] | None:
        if value is None:
            return None
        return [[topic_hash(t) for t in options] for options in value]

    @model_validator(mode="after")
    def _combination(self) -> ViteSubscription:
        if self.address is not None and self.addresses is not None:
            raise ValueError("give address or addresses, not both")
        watched = self.watched()
        if self.topic == "snapshot_block" and watched:
            raise ValueError("snapshot_block takes no address")
        if self.topic in ("unreceived_block", "vmlog") and not watched:
            raise ValueError(
                f'{self.topic} needs an address: address = "vite_..." or addresses = [...]'
            )
        if self.topics is not None and self.topic != "vmlog":
            raise ValueError("topics is only for vmlog")
        if self.topic == "vmlog":
            topics = self.topics or []
            size = vmlog_request_size(watched, topics)
            if size > MAX_REQUEST:
                base = vmlog_request_size([], topics)
                most = (MAX_REQUEST - base) * len(watched) // (size - base)
                raise ValueError(
                    f"{len(watched)} addresses make a subscribe request of {size:,} bytes, and"
                    f" a node refuses requests over {MAX_REQUEST // 1024} KiB: split them into"
                    f" vmlog subscriptions of at most {most} addresses"
                )
        return self

    def watched(self) -> list[str]:
        """The addresses of this subscription (none for all accounts / snapshots)."""
        if self.addresses is not None:
            return list(self.addresses)
        return [self.address] if self.address is not None else []


class ViteConfig(ResumableSourceConfig):
    """``[sources.NAME]`` with ``plugin = "vite"``; unknown keys are errors."""

    url: str = DEFAULT_URL
    mode: Literal["push", "poll"] = "push"
    poll_interval: Duration = Field(default=2.0, ge=0.2)
    subscriptions: list[ViteSubscription] = Field(min_length=1)

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        if not value.startswith(("ws://", "wss://")):
            raise ValueError("expected a ws:// or wss:// URL (gvite's WSPort, e.g. .../gvite/ws)")
        return value

    @model_validator(mode="after")
    def _distinct(self) -> ViteConfig:
        backfill.plan(self.subscriptions)  # raises ValueError naming a shared cursor key
        return self


# -- the source ------------------------------------------------------------------------


class ViteSource(Source):
    """Vite chain events: ``snapshot_block``, ``account_block``, ``unreceived_block``,
    ``vmlog`` (SPEC section 4), resumed from saved heights after a reconnect or restart."""

    name = "vite"
    Config = ViteConfig
    event_types = EVENT_TYPES

    def __init__(self, config: ViteConfig | SourceConfig, ctx: SourceContext) -> None:
        if not isinstance(config, ViteConfig):
            raise TypeError("ViteSource needs a ViteConfig")
        super().__init__(config, ctx)
        self.vite = config
        self.channels = backfill.plan(config.subscriptions)
        self.by_id: dict[str, Channel] = {}  # this connection's subscription ids
        self.memory = FactMemory()
        self._started = False
        self._up = False
        self._run_start = utc_iso()
        self._last_frame = time.time()
        self._lost_at = ""  # when the last good connection ended
        # Watches whose first position (the head, at a first start) is to be saved once
        # the pushes held meanwhile are handled: saved before them, it would skip them.
        self._unsaved: list[Watch] = []
        self._last_snapshot = time.monotonic()
        self._backoff: Backoff | None = None
        # Poll: channels to resume at the next connection: a new filter holds nothing of
        # the time before it, and a poll whose answer never came has emptied the filter.
        self._due: set[Channel] = set()

    @classmethod
    def frame_parser(cls, config: SourceConfig, factory: EventFactory) -> FrameParser:
        """Recorded frames back into events (``pushes`` says what replays and what not)."""
        if not isinstance(config, ViteConfig):
            raise TypeError("ViteSource needs a ViteConfig")
        channels = backfill.plan(config.subscriptions)
        return ViteFrameParser(channels, push=config.mode == "push", factory=factory)

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        backoff = self._backoff = Backoff(maximum=self.vite.max_backoff)
        while True:
            try:
                await self._connect(backoff, task_status)
                wait = backoff.delay()  # went stale: reopen
            except Exception as err:  # never BaseException: cancellation must pass through
                if closed_for_size(err):
                    self.ctx.reject("oversized frame")
                await self.ctx.down(failure_reason(err, open_timeout=OPEN_TIMEOUT))
                wait = backoff.delay()
            if self._up:
                self._up = False
                self._lost_at = utc_iso(self._last_frame)
            await anyio.sleep(wait)

    async def _connect(self, backoff: Backoff, task_status: TaskStatus[None]) -> None:
        """One connection: subscribe, resume, then handle pushes (or poll) until it fails."""
        async with connect(
            self.vite.url,
            max_size=MAX_FRAME,
            open_timeout=OPEN_TIMEOUT,
            close_timeout=CLOSE_TIMEOUT,
            ping_interval=PING_INTERVAL,
            ping_timeout=PING_INTERVAL,
            logger=_ws_logger,
        ) as ws:
            conn = RpcConnection(
                ws,
                timeout=CALL_TIMEOUT,
                reject=self.ctx.reject,
                on_frame=self._on_frame,
                received=self.ctx.received,
            )
            self._last_frame = time.time()
            if self.vite.mode == "push":
                await self._subscribe(conn)
                fresh = self.channels
            else:
                for channel in self.channels:
                    if channel.filter_id is None:
                        await self._create_filter(conn, channel)
                fresh = [c for c in self.channels if c in self._due]
            backoff.connected()
            self._up = True
            await self.ctx.up()
            if not self._started:
                self._started = True
                task_status.started()  # once: the daemon's start-up waits for it
            lost = self._lost_at or None  # None: a restart (each watch knows its time)
            for channel in fresh:
                await self._resume_channel(conn, channel, lost)
            self._lost_at = ""
            if self.vite.mode == "push":
                await self._consume(conn)
            else:
                await self._poll(conn)

    def _on_frame(self) -> None:
        self._last_frame = time.time()
        if self._backoff is not None:
            self._backoff.healthy()

    # -- subscribing ---------------------------------------------------------------------

    async def _subscribe(self, conn: RpcConnection) -> None:
        self.by_id = {}
        for channel in self.channels:
            # The topic name is the first parameter, so each topic is its own family.
            candidates = [(SUBSCRIBE, [name, *channel.args]) for name in channel.topic.push]
            names = " or ".join(channel.topic.push)
            sub_id = await self._create(conn, f"push:{channel.topic.key}", candidates, names)
            channel.sub_id = sub_id
            self.by_id[sub_id] = channel

    async def _create_filter(self, conn: RpcConnection, channel: Channel) -> None:
        candidates = [(method, list(channel.args)) for method in channel.topic.filters]
        names = " or ".join(channel.topic.filters)
        family = f"filter:{channel.topic.key}"
        channel.filter_id = await self._create(conn, family, candidates, names)
        channel.polled_at = time.time()
        self._due.add(channel)

    async def _create(
        self,
        conn: RpcConnection,
        family: str,
        candidates: Sequence[tuple[str, Sequence[Any]]],
        names: str,
    ) -> str:
        """A subscription or filter id, trying each spelling; refusals are SourceErrors."""
        try:
            result = await conn.call_any(family, candidates)
        except CallFailed as err:
            if err.error.method_missing:
                raise SourceError(
                    f'the node knows none of {names}: is "subscribe" in its PublicModules'
                    " and SubscribeEnabled true?"
                ) from None
            raise SourceError(f"the node refused {names}: {err.error}") from None
        created = created_id(result)
        if created is None:
            raise SourceError(f"the node answered {names} without an id")
        return created

    # -- resuming ------------------------------------------------------------------------

    async def _load(self, watch: Watch) -> None:
        if watch.loaded:
            return
        watch.loaded = True
        value = await self.ctx.load_cursor(watch.key)
        if value is None:
            return
        if watch.topic.heights:
            try:
                watch.cursor = int(value)
            except ValueError:
                self.ctx.logger.warning("ignoring the unreadable cursor of %s", watch.key)
                return
            height, _, block_hash = (await self.ctx.load_cursor(_block_key(watch)) or "").partition(
                ":"
            )
            if block_hash and height == value:
                watch.block = (watch.cursor, block_hash)
            watch.recent = _read_recent(await self.ctx.load_cursor(_recent_key(watch)))
        else:
            watch.seen_at = value

    async def _resume_channel(
        self, conn: RpcConnection, channel: Channel, lost: str | None
    ) -> None:
        """Resume every watch of ``channel``; it is no longer due."""
        for watch in channel.watches:
            await self._resume(conn, watch, lost)
        self._due.discard(channel)

    async def _resume(self, conn: RpcConnection, watch: Watch, lost: str | None) -> None:
        """Fetch what ``watch`` missed since its cursor (or say what cannot be fetched).

        ``lost`` is when the source lost touch (None after a restart)."""
        await self._load(watch)
        if not watch.topic.heights:
            await self._resume_heightless(conn, watch, lost)
            return
        since = lost or self._run_start
        try:
            head = await backfill.latest(conn, watch)
        except (CallFailed, ValueError) as err:
            self.ctx.logger.warning("%s: cannot read the head: %s", watch.key, err)
            if watch.cursor is not None:
                detail = {**watch.label, "from_height": watch.cursor + 1}
                await self._gap(GAP_LEDGER, since, detail=detail)
            return
        cursor = watch.cursor
        if cursor is None:
            # First start: no history, from the head on. Saved once the pushes that came
            # while the head was read are handled (they may be above it, or at it).
            if lost is not None:  # a reconnect, but the first start never read the head
                await self._gap(GAP_NO_START, lost, detail=watch.label)
            watch.cursor = watch.start = head
            self._unsaved.append(watch)
            return
        if self.vite.backfill:
            cursor = await self._check_below(conn, watch, cursor, head, since)
        if head < cursor:
            # The node is behind (nothing seen is gone from its chain): go on from its head.
            await self._save(watch, head)
            return
        lo, hi = cursor + 1, head
        if hi < lo:  # nothing new since the cursor
            await self._save(watch, head)
            return
        if not self.vite.backfill:
            await self._gap(GAP_OFF, since, detail=_range(watch, lo, hi))
            await self._save(watch, hi)
            return
        if hi - lo + 1 > self.vite.backfill_limit:
            skipped = hi - self.vite.backfill_limit
            await self._gap(GAP_LIMIT, since, detail=_range(watch, lo, skipped))
            lo = skipped + 1
        for page_lo in range(lo, hi + 1, MAX_PAGE):
            page_hi = min(page_lo + MAX_PAGE - 1, hi)
            try:
                facts = await backfill.fetch(conn, watch, page_lo, page_hi)
            except (CallFailed, ValueError) as err:
                self.ctx.logger.warning("%s: backfill failed: %s", watch.key, err)
                await self._gap(GAP_LEDGER, since, detail=_range(watch, page_lo, hi))
                await self._save(watch, hi)
                return
            await self._deliver(watch, facts)
            await self._save(watch, page_hi)

    async def _resume_heightless(self, conn: RpcConnection, watch: Watch, lost: str | None) -> None:
        if watch.seen_at is None:  # first start: from now on
            await self._save_time(watch)
            return
        since = lost or watch.seen_at
        reason = GAP_NO_HEIGHT
        if watch.topic is UNRECEIVED and self.vite.backfill:
            reason = GAP_UNRECEIVED
            try:
                facts, more = await backfill.unreceived(conn, watch, self.vite.backfill_limit)
            except (CallFailed, ValueError) as err:
                self.ctx.logger.warning("%s: cannot list unreceived blocks: %s", watch.key, err)
            else:
                await self._deliver(watch, facts)
                if more:
                    await self._gap(GAP_UNRECEIVED_LIMIT, since, detail=watch.label)
        await self._gap(reason, since, detail=watch.label)
        await self._save_time(watch)

    # -- receiving -----------------------------------------------------------------------

    async def _consume(self, conn: RpcConnection) -> None:
        """Handle pushes until the connection fails (raise) or goes stale (return)."""
        stale_after = self.vite.stale_after
        snapshots = any(c.topic is SNAPSHOT for c in self.channels)
        self._last_snapshot = time.monotonic()
        while True:
            if self._unsaved and not conn.pending:
                await self._save_first_positions()
            note = await conn.next_notification(stale_after)
            if note is not None:
                channel = self.by_id.get(note.subscription)
                if channel is None:
                    self.ctx.reject("push for an unknown subscription id")
                    continue
                if channel.topic is SNAPSHOT:
                    self._last_snapshot = time.monotonic()
                await self._handle(channel, note.result)
            now = time.monotonic()
            if snapshots and now - self._last_snapshot >= stale_after:
                await self.ctx.stale(f"no snapshot block for {format_duration(stale_after)}")
                return
            if now - conn.last_frame >= stale_after:
                # No heartbeat in this protocol: ask something cheap.
                try:
                    await conn.call(SNAPSHOT_HEIGHT, within=min(CALL_TIMEOUT, stale_after))
                except CallFailed:
                    pass  # an error answer is an answer
                except SourceError:
                    await self.ctx.stale(f"nothing received for {format_duration(stale_after)}")
                    return

    async def _poll(self, conn: RpcConnection) -> None:
        """Poll every filter every ``poll_interval``; recreate (and resume) expired ones."""
        while True:
            for channel in self.channels:
                if channel.filter_id is None:  # (never: every filter exists by now)
                    await self._create_filter(conn, channel)
                try:
                    # Due from the moment the poll is sent until its answer is read.
                    result = await conn.call(
                        GET_CHANGES,
                        [channel.filter_id],
                        sent=functools.partial(self._due.add, channel),
                    )
                except CallFailed as err:
                    self._due.discard(channel)
                    if not err.error.filter_missing:
                        raise SourceError(
                            f"polling a {channel.topic.key} filter: {err.error}"
                        ) from None
                    # Expired (nobody polled it for 5-10 minutes): a new filter, then backfill.
                    lost = utc_iso(channel.polled_at)
                    await self._create_filter(conn, channel)
                    await self._resume_channel(conn, channel, lost)
                    continue
                self._due.discard(channel)
                since, channel.polled_at = channel.polled_at, time.time()
                try:
                    items = poll_changes(result)
                except ValueError as err:
                    self.ctx.reject(str(err))
                    # What the filter held went with the answer: read it from the ledger.
                    await self._resume_channel(conn, channel, utc_iso(since))
                    continue
                await self._handle(channel, items)
            await self._save_first_positions()  # after the first poll's changes
            conn.clear_pending()  # nothing is pushed to filters; ignore strays
            await anyio.sleep(self.vite.poll_interval)

    async def _handle(self, channel: Channel, items: list[Any]) -> None:
        groups, rejects = channel.facts(items)
        for reason in rejects:
            self.ctx.reject(reason)
        for watch, group in groups:
            await self._deliver(watch, group)
            if watch.topic.heights and watch.cursor is not None:
                await self._save(watch, watch.cursor)
            elif not watch.topic.heights:
                await self._save_time(watch)

    async def _deliver(self, watch: Watch, facts: list[Fact]) -> None:
        """Emit the facts not emitted yet, in order, and move the watch's cursor.

        A block at a height where a block with another hash was seen replaced it (a node
        may send the new block without the removal of the old): what was seen of the old
        one is retracted first."""
        if watch.topic.heights:
            blocks = {(f.height, _block_hash(f)) for f in facts if not f.removed and f.height}
            heights = {h for h, block_hash in blocks if block_hash}
            await self._retract(
                watch,
                [r for r in watch.recent if r[0] in heights and r[1] and r[:2] not in blocks],
            )
        await self.ctx.emit_many(new_events(self.memory, self.ctx, facts))
        for fact in facts:
            if watch.topic.heights and fact.height is not None:
                cursor = watch.cursor
                if fact.removed:  # rolled back: the heights from it on must be read again
                    below = fact.height - 1
                    watch.cursor = below if cursor is None else min(cursor, below)
                    watch.forget(fact.id)
                else:
                    watch.cursor = fact.height if cursor is None else max(cursor, fact.height)
                    block_hash = _block_hash(fact)
                    if watch.cursor == fact.height and block_hash:
                        watch.block = (fact.height, block_hash)
                    watch.remember((fact.height, block_hash, fact.id, fact.type))

    async def _check_below(
        self, conn: RpcConnection, watch: Watch, cursor: int, head: int, since: str
    ) -> int:
        """At a resume: whether the chain still holds the blocks of what was seen at the last
        ``REREAD`` heights up to the cursor (or the head, if lower). A fact whose block is
        gone, or a block at the cursor that is gone, tells a rollback while away: retract
        what it removed (those above the head too) and emit what replaced it. A check that
        cannot be made is a gap. Returns the height to go on from."""
        seen_at = [r[0] for r in watch.recent] + ([watch.block[0]] if watch.block else [])
        if not seen_at:
            return cursor  # nothing seen to check
        # Not below what this run or the last saw: heights never read are history.
        top = min(cursor, head)
        lo = max(1, top - REREAD + 1, (watch.start or 0) + 1, min(seen_at))
        known = [r for r in watch.recent if r[0] >= lo]
        block = watch.block if watch.block is not None and lo <= watch.block[0] <= top else None
        if lo > top or not (block or any(r[0] <= top for r in known)):
            return cursor  # nothing seen there to check
        try:
            chain = await backfill.fetch(conn, watch, lo, top)
        except (CallFailed, ValueError) as err:
            self.ctx.logger.warning("%s: cannot check the heights below: %s", watch.key, err)
            await self._gap(GAP_UNCHECKED, since, detail=_range(watch, lo, top))
            return cursor
        held = {(f.height, _block_hash(f)) for f in chain}
        gone = [r for r in known if r[0] <= top and r[:2] not in held]
        if not gone and (block is None or block in held):
            return cursor
        await self._gap(GAP_ROLLED_BACK, since, detail={**watch.label, "height": cursor})
        await self._retract(watch, gone + [r for r in known if r[0] > top])
        seen = {r[2] for r in watch.recent}
        watch.cursor, watch.block = lo - 1, None
        await self._deliver(watch, [f for f in chain if f.id not in seen])
        await self._save(watch, top)
        return top

    async def _retract(self, watch: Watch, gone: list[Recent]) -> None:
        """Emit the removal of each fact, by id (no data: the daemon gives a retraction the data
        of the fact from the alert that carried it)."""
        for _, _, fact_id, type_ in gone:
            watch.forget(fact_id)
            if self.memory.is_new(fact_id, True):
                await self.ctx.emit(self.ctx.event(type_, {}, id=fact_id, removed=True))

    async def _gap(self, reason: str, since: str, *, detail: dict[str, str | int]) -> None:
        await self.ctx.gap(reason, since, utc_iso(), detail=detail)

    async def _save_first_positions(self) -> None:
        unsaved, self._unsaved = self._unsaved, []
        for watch in unsaved:
            if watch.cursor is not None:
                await self._save(watch, watch.cursor)

    async def _save(self, watch: Watch, height: int) -> None:
        watch.cursor = height
        await self.ctx.save_cursor(watch.key, str(height))
        block = watch.block
        if block is not None and block[0] == height:
            await self.ctx.save_cursor(_block_key(watch), f"{height}:{block[1]}")
        await self.ctx.save_cursor(_recent_key(watch), json.dumps(watch.recent))

    async def _save_time(self, watch: Watch) -> None:
        watch.seen_at = utc_iso()
        await self.ctx.save_cursor(watch.key, watch.seen_at)


def _block_key(watch: Watch) -> str:
    """Where the hash of the block at a watch's cursor is saved."""
    return f"{watch.key}#block"


def _recent_key(watch: Watch) -> str:
    """Where the facts of a watch's last heights are saved."""
    return f"{watch.key}#recent"


def _read_recent(text: str | None) -> list[Recent]:
    """``_recent_key``'s value; anything unreadable is none."""
    try:
        rows = json.loads(text or "[]")
        return [(int(h), str(b), str(i), str(t)) for h, b, i, t in rows][-RECENT_FACTS:]
    except (ValueError, TypeError, ArithmeticError):  # int(1e400): OverflowError
        return []


def _block_hash(fact: Fact) -> str:
    """The hash of the block a fact is of (a vmlog's is its account block's)."""
    value = fact.data.get("account_block_hash") or fact.data.get("hash")
    return value if isinstance(value, str) else ""


def _range(watch: Watch, lo: int, hi: int) -> dict[str, str | int]:
    return {**watch.label, "from_height": lo, "to_height": hi}
