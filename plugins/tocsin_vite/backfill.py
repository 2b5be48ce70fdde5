"""What the source watches, and how it reads what it missed from the ledger.

A **channel** is one server-side subscription (or polling filter): a topic and its
arguments. A **watch** is one resumable stream inside a channel, with its own cursor in
the state database: the snapshot chain, one account's chain, or one contract's logs.
A vmlog subscription naming three addresses is one channel with three watches; an
``account_block`` subscription with two addresses is two channels of one watch each.

Cursor keys (values are heights, except where noted):

- ``snapshot_block``: the last snapshot height processed;
- ``account_block:<address>``: the last height of that account's chain processed;
- ``vmlog:<address>`` (``vmlog:<address>:<topics digest>`` with ``topics``): the last
  height of the contract's account chain whose logs were processed;
- ``account_block`` (all accounts) and ``unreceived_block:<address>``: these topics carry
  no height, so the value is the UTC time the source last processed them (to name the
  time range of a gap after a restart).

Beside a height watch's cursor ``KEY``: ``KEY#block``, ``height:hash`` of the block at the
cursor, and ``KEY#recent``, the facts emitted at the last ``REREAD`` heights (JSON
``[[height, block hash, fact id, type], ...]``): a resume that finds the chain rolled back
while away retracts those no longer in it.

The ledger reads below fetch one page of at most ``MAX_PAGE`` heights each (the logs of
those heights ``MAX_PAGE`` to a call) and return facts in ascending height order; a failed
call raises ``CallFailed`` (the server said no) or ``ValueError`` (the answer made no
sense), which the source turns into a gap.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from tocsin import stable_id

from .protocol import (
    ACCOUNT,
    ACCOUNT_BLOCKS_BY_RANGE,
    ACCOUNT_BY_ADDRESS,
    LATEST_ACCOUNT_BLOCK,
    LATEST_SNAPSHOT,
    MAX_PAGE,
    SNAPSHOT,
    SNAPSHOT_BLOCKS,
    UNRECEIVED,
    UNRECEIVED_BLOCKS,
    VMLOG,
    VMLOGS_BY_FILTER,
    Fact,
    Topic,
    as_list,
    filter_param,
    latest_height,
    normalize_items,
)
from .rpc import RpcConnection

REREAD = 16
"""Heights read again below the cursor when the chain was rolled back there while away;
the facts emitted at as many heights are kept to retract what the rollback removed."""
RECENT_FACTS = 512
"""At most this many of them (a block may hold many logs)."""
MAX_VMLOG_PAGES = 100
"""Pages of logs read for one range of heights at most (100,000 logs); beyond, a gap."""

Recent = tuple[int, str, str, str]
"""A fact emitted at a height: (height, block hash, fact id, event type)."""


@dataclass(eq=False)
class Watch:
    """One resumable stream and its cursor (see the module docstring for the keys)."""

    topic: Topic
    address: str | None
    topics: tuple[tuple[str, ...], ...]
    key: str
    cursor: int | None = None  # height watches
    # The hash of the block at the cursor (height, hash), when known: a resume checks it is
    # still the chain's, else the chain was rolled back below the cursor while away.
    block: tuple[int, str] | None = None
    start: int | None = None  # the head at this run's first start (nothing below is new)
    seen_at: str | None = None  # heightless watches: when last processed
    loaded: bool = False  # the cursor was read from the state database
    recent: list[Recent] = field(default_factory=list)  # facts of the last REREAD heights

    def remember(self, fact: Recent) -> None:
        """Keep a fact just emitted; forget those ``REREAD`` heights below the newest."""
        if any(r[2] == fact[2] for r in self.recent):
            return
        self.recent.append(fact)
        top = max(r[0] for r in self.recent)
        self.recent = [r for r in self.recent if r[0] > top - REREAD][-RECENT_FACTS:]

    def forget(self, fact_id: str) -> None:
        """A fact retracted: no longer one to retract."""
        self.recent = [r for r in self.recent if r[2] != fact_id]

    @property
    def label(self) -> dict[str, str | int]:
        """What names this watch in a ``source.gap``'s detail."""
        detail: dict[str, str | int] = {"topic": self.topic.event_type}
        if self.address is not None:
            detail["address"] = self.address
        return detail


@dataclass(eq=False)
class Channel:
    """One subscription or filter on the server, feeding one or more watches."""

    topic: Topic
    args: list[Any]  # the subscription's arguments after its name
    watches: list[Watch]
    address: str | None = None  # by-address topics: the address items belong to
    sub_id: str | None = None  # push: this connection's id for it
    filter_id: str | None = None  # poll: the filter's id (filters outlive connections)
    polled_at: float = 0.0  # poll: when the filter last answered (unix seconds)
    by_address: dict[str, Watch] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.by_address = {w.address: w for w in self.watches if w.address is not None}

    def watch_for(self, fact: Fact) -> Watch | None:
        """The watch a fact belongs to (vmlogs: by the log's address)."""
        if self.topic is VMLOG:
            return self.by_address.get(fact.address or "")
        return self.watches[0]

    def facts(self, items: list[Any]) -> tuple[list[tuple[Watch, list[Fact]]], list[str]]:
        """A pushed or polled result list as facts grouped by watch (in the order each
        watch first appears), and the reject reasons of the items that were not facts."""
        facts, rejects = normalize_items(self.topic, items, self.address)
        by_watch: dict[int, tuple[Watch, list[Fact]]] = {}
        for fact in facts:
            watch = self.watch_for(fact)
            if watch is None:
                rejects.append("vmlog of an address not subscribed")
                continue
            by_watch.setdefault(id(watch), (watch, []))[1].append(fact)
        return list(by_watch.values()), rejects


def plan(subscriptions: Sequence[Any]) -> list[Channel]:
    """The channels (and their watches) for the configured subscriptions.

    Each item has ``topic``, ``watched()`` (its addresses) and ``topics``; raises
    ``ValueError`` naming a cursor key two subscriptions would share.
    """
    channels: list[Channel] = []
    for sub in subscriptions:
        addresses: list[str] = sub.watched()
        topics = tuple(tuple(t) for t in (sub.topics or ()))
        if sub.topic == "snapshot_block":
            channels.append(Channel(SNAPSHOT, [], [Watch(SNAPSHOT, None, (), "snapshot_block")]))
        elif sub.topic == "account_block" and not addresses:
            channels.append(Channel(ACCOUNT, [], [Watch(ACCOUNT, None, (), "account_block")]))
        elif sub.topic in ("account_block", "unreceived_block"):
            topic = ACCOUNT_BY_ADDRESS if sub.topic == "account_block" else UNRECEIVED
            for addr in addresses:
                watch = Watch(topic, addr, (), f"{sub.topic}:{addr}")
                channels.append(Channel(topic, [addr], [watch], address=addr))
        else:
            suffix = f":{stable_id(*(','.join(t) for t in topics))[:16]}" if topics else ""
            watches = [Watch(VMLOG, a, topics, f"vmlog:{a}{suffix}") for a in addresses]
            param = filter_param({a: (0, 0) for a in addresses}, topics)
            channels.append(Channel(VMLOG, [param], watches))
    keys = [w.key for c in channels for w in c.watches]
    for key in keys:
        if keys.count(key) > 1:
            raise ValueError(f"two subscriptions watch the same thing ({key})")
    return channels


# -- ledger reads ----------------------------------------------------------------------


async def latest(conn: RpcConnection, watch: Watch) -> int:
    """The head a height watch could resume to: the snapshot height, or the account's."""
    if watch.topic is SNAPSHOT:
        return latest_height(await conn.call(LATEST_SNAPSHOT))
    return latest_height(await conn.call(LATEST_ACCOUNT_BLOCK, [watch.address]))


async def fetch(conn: RpcConnection, watch: Watch, lo: int, hi: int) -> list[Fact]:
    """The facts of heights ``lo..hi`` (at most ``MAX_PAGE`` of them), ascending."""
    if not 0 < lo <= hi < lo + MAX_PAGE:
        raise ValueError(f"not a ledger page: {lo}..{hi}")
    if watch.topic is SNAPSHOT:
        # (height, count): from height downwards [go-vite GetSnapshotBlocksByHeight(h, false, n)]
        result = await conn.call(SNAPSHOT_BLOCKS, [hi, hi - lo + 1])
    elif watch.topic is ACCOUNT_BY_ADDRESS:
        result = await conn.call(ACCOUNT_BLOCKS_BY_RANGE, [watch.address, lo, hi])
    else:
        result = await _vmlogs(conn, watch, lo, hi)
    facts, rejects = normalize_items(watch.topic, as_list(result), watch.address)
    if rejects:
        raise ValueError(rejects[0])
    # A tolerant server may hand back more than asked: keep the range, and the address.
    facts = [
        f
        for f in facts
        if f.height is not None
        and lo <= f.height <= hi
        and (watch.topic is not VMLOG or f.address == watch.address)
    ]
    return sorted(facts, key=lambda f: f.height or 0)  # stable: a block's logs keep their order


async def _vmlogs(conn: RpcConnection, watch: Watch, lo: int, hi: int) -> list[Any]:
    """The logs of heights ``lo``..``hi``, ``MAX_PAGE`` to a call: a busy contract's
    logs of 1000 heights can outgrow the frame limit in one answer. A node that does not
    page answers every log at once (more than a page, or the same page again): taken
    whole."""
    if watch.address is None:
        raise ValueError("a vmlog watch without an address")
    out: list[Any] = []
    for index in range(MAX_VMLOG_PAGES):
        param = filter_param({watch.address: (lo, hi)}, watch.topics)
        param |= {"pageIndex": index, "pageSize": MAX_PAGE}
        page = as_list(await conn.call_any("vmlogs", [(m, [param]) for m in VMLOGS_BY_FILTER]))
        if len(page) > MAX_PAGE or (index and page and page[0] == out[0]):
            return page  # not paged: all of them, at once
        out += page
        if len(page) < MAX_PAGE:
            return out
    raise ValueError(f"more than {MAX_VMLOG_PAGES * MAX_PAGE} logs in heights {lo}..{hi}")


async def unreceived(conn: RpcConnection, watch: Watch, limit: int) -> tuple[list[Fact], bool]:
    """The blocks now unreceived by the watch's address (at most ``limit``), and whether
    there were more than that."""
    facts: list[Fact] = []
    page_size = min(MAX_PAGE, limit)
    index = 0
    while len(facts) <= limit:  # one beyond the limit tells that there are more
        result = await conn.call(UNRECEIVED_BLOCKS, [watch.address, index, page_size])
        page, rejects = normalize_items(UNRECEIVED, as_list(result), watch.address)
        if rejects:
            raise ValueError(rejects[0])
        facts += page
        if len(page) < page_size:
            break
        index += 1
    return facts[:limit], len(facts) > limit
