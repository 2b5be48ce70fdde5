"""The Vite source against the emulator over real sockets, with a RecordingContext."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import anyio
import orjson
import pytest
from pydantic import ValidationError
from tocsin_vite import ViteEmulator
from tocsin_vite.chain import log_of
from tocsin_vite.protocol import make_address, snapshot_id, unreceived_id
from tocsin_vite.source import (
    GAP_LEDGER,
    GAP_LIMIT,
    GAP_NO_HEIGHT,
    GAP_OFF,
    GAP_UNCHECKED,
    GAP_UNRECEIVED,
    GAP_UNRECEIVED_LIMIT,
)
from websockets.asyncio.server import ServerConnection, serve

from support import wait_for
from tocsin.testing import RecordingContext

from .conftest import (
    APPROVAL,
    CONTRACT,
    ME,
    OTHER,
    PAYER,
    TRANSFER,
    make_config,
    source_running,
    wait,
)

VMLOG_KEY = f"vmlog:{CONTRACT}"
MANY_CONTRACTS = [make_address(f"contract {n}", contract=True) for n in range(1500)]
ALL_TOPICS = [
    {"topic": "snapshot_block"},
    {"topic": "account_block"},
    {"topic": "account_block", "address": ME},
    {"topic": "unreceived_block", "address": ME},
    {"topic": "vmlog", "addresses": [CONTRACT, OTHER], "topics": [[TRANSFER, APPROVAL]]},
]


def positions(ctx: RecordingContext) -> dict[str, str]:
    """The saved heights, less what is saved beside them (``KEY#block``, ``KEY#recent``)."""
    return {k: v for k, v in ctx.cursors.items() if "#" not in k}


def heights(ctx: RecordingContext, kind: str, field: str = "height") -> list[int]:
    return [e.data[field] for e in ctx.events if e.type == kind]


def restarted_from(first: RecordingContext) -> RecordingContext:
    """A context holding what ``first`` saved: the state a restart finds."""
    ctx = RecordingContext("chain", "vite")
    ctx.cursors.update(first.cursors)
    return ctx


async def subscribed(emulator: ViteEmulator, ctx: RecordingContext, count: int, *keys: str) -> None:
    """The source holds ``count`` push subscriptions and has set the cursors ``keys``."""
    await wait_for(lambda: emulator.subscriptions == count, what=f"{count} subscriptions")
    # RecordingContext.save_cursor does not wake wait_until: poll for cursors.
    await wait_for(lambda: all(k in ctx.cursors for k in keys), what=f"cursors {keys}")


async def away(emulator: ViteEmulator) -> None:
    """Drop the source's connection and wait until it is gone (it retries within ~1 s)."""
    await emulator.drop_connections()
    await wait_for(lambda: not emulator.clients, what="the connection to close")


# -- config ----------------------------------------------------------------------------


def test_config_defaults_and_forms(registry: Any) -> None:
    from tocsin_vite import ViteSource

    assert registry.source("vite") is ViteSource
    config = make_config(subscriptions=ALL_TOPICS, poll_interval="2s")
    assert config.url == "ws://127.0.0.1:1/gvite/ws"
    assert (config.mode, config.poll_interval, config.backfill, config.backfill_limit) == (
        "push",
        2.0,
        True,
        1000,
    )
    assert config.stale_after == 60.0
    assert config.subscriptions[4].watched() == [CONTRACT, OTHER]
    assert config.subscriptions[1].watched() == []
    default = make_config(url="wss://node.vite.net/gvite/ws")
    assert default.subscriptions[0].address == CONTRACT


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"subscriptions": []}, "at least 1 item"),
        ({"subscriptions": [{"topic": "vmlog"}]}, 'vmlog needs an address: address = "vite_..."'),
        ({"subscriptions": [{"topic": "unreceived_block"}]}, "unreceived_block needs an address"),
        ({"subscriptions": [{"topic": "snapshot_block", "address": ME}]}, "takes no address"),
        (
            {"subscriptions": [{"topic": "vmlog", "address": ME, "addresses": [ME]}]},
            "give address or addresses, not both",
        ),
        ({"subscriptions": [{"topic": "account_block", "topics": [[TRANSFER]]}]}, "only for vmlog"),
        ({"subscriptions": [{"topic": "vmlog", "address": "vite_123"}]}, "not a Vite address"),
        ({"subscriptions": [{"topic": "vmlog", "address": ME[:-1] + "0"}]}, "checksum"),
        ({"subscriptions": [{"topic": "vmlog", "address": ME, "topics": [["0x12"]]}]}, "64 hex"),
        ({"subscriptions": [{"topic": "vmlog", "addresses": []}]}, "at least one address"),
        ({"subscriptions": [{"topic": "blocks"}]}, "Input should be 'snapshot_block'"),
        (
            # One FilterParam names them all: over go-vite's 128 KiB request cap.
            {"subscriptions": [{"topic": "vmlog", "addresses": MANY_CONTRACTS}]},
            "1500 addresses make a subscribe request of 138,126 bytes, and a node refuses"
            " requests over 128 KiB: split them into vmlog subscriptions of at most 1423",
        ),
        (
            {"subscriptions": [{"topic": "snapshot_block"}, {"topic": "snapshot_block"}]},
            "two subscriptions watch the same thing (snapshot_block)",
        ),
        ({"url": "https://node.vite.net/gvite"}, "ws:// or wss://"),
        ({"mode": "pull"}, "Input should be 'push' or 'poll'"),
        ({"poll_interval": "50ms"}, "greater than or equal to 0.2"),
        ({"backfill_limit": 0}, "greater than or equal to 1"),
        ({"topic": "vmlog"}, "Extra inputs are not permitted"),
    ],
)
def test_config_errors(change: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError) as err:
        make_config(**change)
    assert message in str(err.value)


# -- push ------------------------------------------------------------------------------


async def test_push_subscribes_every_topic_and_remaps_ids_after_a_reconnect(
    emulator: ViteEmulator,
) -> None:
    config = make_config(emulator.url, subscriptions=ALL_TOPICS)
    async with source_running(config) as ctx:
        await subscribed(emulator, ctx, 5)
        await wait_for(lambda: len(positions(ctx)) == 6, what="six cursors")
        assert sorted(
            k.rsplit(":", 1)[0] if k.count(":") == 2 else k for k in positions(ctx)
        ) == sorted(
            [
                "snapshot_block",
                "account_block",
                f"account_block:{ME}",
                f"unreceived_block:{ME}",
                VMLOG_KEY,
                f"vmlog:{OTHER}",
            ]
        )
        subs = emulator.requests("subscribe_subscribe")
        assert [r["params"][0] for r in subs] == [
            "newSnapshotBlock",
            "newAccountBlock",
            "newAccountBlockByAddress",
            "newUnreceivedBlockByAddress",
            "newVmLog",
        ]
        assert subs[2]["params"][1] == ME and subs[3]["params"][1] == ME
        assert subs[4]["params"][1] == {
            "addressHeightRange": {
                CONTRACT: {"fromHeight": "0", "toHeight": "0"},
                OTHER: {"fromHeight": "0", "toHeight": "0"},
            },
            "topics": [[TRANSFER, APPROVAL]],
        }
        old_ids = {sid for c in emulator.clients for sid in c.subs}
        await emulator.produce_snapshots()
        send = await emulator.produce_account_block(PAYER, to=ME)
        await emulator.receive(ME, send.hash)
        await emulator.produce_vmlog(CONTRACT, [TRANSFER, "00" * 32], b"\x01")
        await emulator.produce_vmlog(OTHER, [APPROVAL], b"\x02")
        await emulator.produce_vmlog(CONTRACT, [TRANSFER.replace("a", "b")], b"filtered out")
        # snapshot, 2 blocks of all accounts (send, receive) + the receive by address
        # (same id as its all-accounts twin: one event), new + received, 2 logs, 3 blocks
        await wait(ctx, lambda: len(heights(ctx, "vmlog", "account_block_height")) == 2)
        first = [e.type for e in ctx.events]
        assert first.count("snapshot_block") == 1 and first.count("unreceived_block") == 2
        unreceived = [e for e in ctx.events if e.type == "unreceived_block"]
        assert [e.id for e in unreceived] == [
            unreceived_id(send.hash, False),
            unreceived_id(send.hash, True),
        ]
        assert unreceived[0].data == {"hash": send.hash, "received": False, "address": ME}
        mine = [e for e in ctx.events if e.type == "account_block" and e.data.get("address") == ME]
        assert mine == [] or mine[0].data["height"] == 1  # by-address twin of an all-accounts push
        logs = [e for e in ctx.events if e.type == "vmlog"]
        assert [e.data["address"] for e in logs] == [CONTRACT, OTHER]
        assert (
            logs[0].data["topics"] == [TRANSFER, "00" * 32] and logs[0].data["log_data"] == "AQ=="
        )

        await away(emulator)
        await subscribed(emulator, ctx, 5)
        new_ids = {sid for c in emulator.clients for sid in c.subs}
        assert not old_ids & new_ids
        seen = len(ctx.events)
        stale_id = next(iter(old_ids))
        frame = {
            "jsonrpc": "2.0",
            "method": "subscribe_subscription",
            "params": {"subscription": stale_id, "result": [{"hash": "ab", "height": "1"}]},
        }
        await emulator.push_raw(json.dumps(frame))  # a push for a dead id is not ours
        await emulator.produce_snapshots()
        # all-accounts and unreceived blocks carry no height: a gap each after the reconnect
        await wait(ctx, lambda: len(ctx.events) > seen and ctx.states().count("gap") == 2)
        # The pushes are held while the source backfills and handled after it; the
        # backfill can fetch the new snapshot itself, before the stale push is read.
        await wait_for(lambda: ctx.rejects, what="the push for a dead id refused")
    assert ctx.states() == ["up", "down", "up", "gap", "gap"]
    assert ctx.rejects == ["push for an unknown subscription id"]
    assert ctx.events[-1].type == "snapshot_block"


async def test_backfill_after_a_reconnect_in_order_without_duplicates(
    emulator: ViteEmulator,
) -> None:
    config = make_config(
        emulator.url,
        subscriptions=[{"topic": "snapshot_block"}, {"topic": "vmlog", "address": CONTRACT}],
    )
    async with source_running(config) as ctx:
        await subscribed(emulator, ctx, 2, "snapshot_block", VMLOG_KEY)
        head = emulator.chain.snapshot_height
        await emulator.produce_snapshots(2)
        await emulator.produce_vmlog(CONTRACT, [TRANSFER], b"live")
        await wait(ctx, lambda: len(ctx.events) == 3)
        await away(emulator)
        await emulator.produce_snapshots(3)  # nobody is connected: only the ledger has them
        for n in range(3):
            await emulator.produce_vmlog(CONTRACT, [TRANSFER], f"away {n}".encode())
        await wait(ctx, lambda: len(ctx.events) == 9)
        await emulator.produce_snapshots()  # and pushes go on after the backfill
        await wait(ctx, lambda: len(ctx.events) == 10)
    assert heights(ctx, "snapshot_block") == list(range(head + 1, head + 7))
    assert heights(ctx, "vmlog", "account_block_height") == [1, 2, 3, 4]
    assert len({e.id for e in ctx.events}) == 10
    assert positions(ctx) == {"snapshot_block": str(head + 6), VMLOG_KEY: "4"}
    assert ctx.gaps == [] and ctx.states() == ["up", "down", "up"]
    assert emulator.requests("ledger_getSnapshotBlocks")[-1]["params"] == [head + 5, 3]
    vmlog_query = emulator.requests("ledger_getVmLogsByFilter")[-1]["params"][0]
    assert vmlog_query == {
        "addressHeightRange": {CONTRACT: {"fromHeight": "2", "toHeight": "4"}},
        "pageIndex": 0,
        "pageSize": 1000,
    }


async def test_backfill_after_a_restart_and_nothing_before_the_first_start(
    emulator: ViteEmulator,
) -> None:
    for n in range(5):
        await emulator.produce_vmlog(CONTRACT, [TRANSFER], f"old {n}".encode())
    await emulator.produce_snapshots(4)
    head = emulator.chain.snapshot_height
    config = make_config(
        emulator.url,
        subscriptions=[{"topic": "snapshot_block"}, {"topic": "vmlog", "address": CONTRACT}],
    )
    async with source_running(config) as first:  # first start: no history
        await subscribed(emulator, first, 2, "snapshot_block", VMLOG_KEY)
    assert first.events == [] and positions(first) == {"snapshot_block": str(head), VMLOG_KEY: "5"}

    restarted = RecordingContext("chain", "vite")
    restarted.cursors.update({"snapshot_block": str(head - 3), VMLOG_KEY: "2"})
    async with source_running(config, restarted) as ctx:
        await wait(ctx, lambda: len(ctx.events) == 6)
        await emulator.produce_vmlog(CONTRACT, [TRANSFER], b"new")
        await wait(ctx, lambda: len(ctx.events) == 7)
    assert heights(ctx, "snapshot_block") == [head - 2, head - 1, head]
    assert heights(ctx, "vmlog", "account_block_height") == [3, 4, 5, 6]
    assert (
        next(e.data["log_data"] for e in ctx.events if e.type == "vmlog") == "b2xkIDI="
    )  # "old 2"
    assert positions(ctx) == {"snapshot_block": str(head), VMLOG_KEY: "6"}


async def test_more_missed_than_backfill_limit_is_a_gap_for_the_oldest(
    emulator: ViteEmulator,
) -> None:
    await emulator.produce_snapshots(2500)  # spans three ledger pages at the default limit
    head = emulator.chain.snapshot_height
    ctx = RecordingContext("chain", "vite")
    ctx.cursors["snapshot_block"] = str(head - 10)
    config = make_config(
        emulator.url, subscriptions=[{"topic": "snapshot_block"}], backfill_limit=4
    )
    async with source_running(config, ctx):
        await wait(ctx, lambda: len(ctx.events) == 4)
    assert heights(ctx, "snapshot_block") == list(range(head - 3, head + 1))
    (gap,) = ctx.gaps
    assert gap["reason"] == GAP_LIMIT
    assert (gap["topic"], gap["from_height"], gap["to_height"]) == (
        "snapshot_block",
        head - 9,
        head - 4,
    )

    big = RecordingContext("chain", "vite")
    big.cursors["snapshot_block"] = str(head - 2400)
    async with source_running(
        make_config(emulator.url, subscriptions=[{"topic": "snapshot_block"}]), big
    ):
        await wait(big, lambda: len(big.events) == 1000, within=10)
    assert heights(big, "snapshot_block") == list(range(head - 999, head + 1))
    assert big.gaps[0]["from_height"] == head - 2399 and big.gaps[0]["to_height"] == head - 1000
    pages = [r["params"] for r in emulator.requests("ledger_getSnapshotBlocks")][-1:]
    assert pages == [[head, 1000]]  # pages of at most 1000


async def test_backfill_off_and_a_failing_ledger_are_gaps_not_crashes(
    emulator: ViteEmulator,
) -> None:
    await emulator.produce_vmlog(CONTRACT, [TRANSFER], b"1")
    off = RecordingContext("chain", "vite")
    off.cursors.update({VMLOG_KEY: "0"})
    async with source_running(make_config(emulator.url, backfill=False), off):
        await wait(off, lambda: off.gaps)
    assert off.events == []
    assert off.gaps[0]["reason"] == GAP_OFF
    assert (off.gaps[0]["address"], off.gaps[0]["from_height"], off.gaps[0]["to_height"]) == (
        CONTRACT,
        1,
        1,
    )
    assert off.cursors[VMLOG_KEY] == "1"

    await emulator.produce_vmlog(CONTRACT, [TRANSFER], b"2")
    emulator.fail("ledger_getVmLogsByFilter", times=None)
    broken = RecordingContext("chain", "vite")
    broken.cursors.update({VMLOG_KEY: "0"})
    async with source_running(make_config(emulator.url), broken) as ctx:
        await wait(ctx, lambda: ctx.gaps)
        await emulator.produce_vmlog(CONTRACT, [TRANSFER], b"3")  # pushes still flow
        await wait(ctx, lambda: ctx.events)
    assert ctx.gaps[0]["reason"] == GAP_LEDGER and ctx.gaps[0]["to_height"] == 2
    assert heights(ctx, "vmlog", "account_block_height") == [3]
    assert ctx.states() == ["up", "gap"]

    emulator.failing.clear()
    emulator.fail("ledger_getLatestAccountBlock")
    head_unknown = RecordingContext("chain", "vite")
    head_unknown.cursors.update({VMLOG_KEY: "1"})
    async with source_running(make_config(emulator.url), head_unknown) as ctx:
        await wait(ctx, lambda: ctx.gaps)
    assert ctx.gaps[0]["reason"] == GAP_LEDGER and ctx.gaps[0]["from_height"] == 2


async def test_a_rollback_pair_retracts_then_re_adds_with_the_same_id(
    emulator: ViteEmulator,
) -> None:
    async with source_running(make_config(emulator.url)) as ctx:
        await subscribed(emulator, ctx, 1, VMLOG_KEY)
        await emulator.produce_vmlog(CONTRACT, [TRANSFER], b"x")
        await emulator.produce_vmlog(CONTRACT, [TRANSFER], b"y")
        await wait(ctx, lambda: len(ctx.events) == 2)
        await emulator.rollback_account(CONTRACT, readd=True)
        await wait(ctx, lambda: len(ctx.events) == 4)
        await emulator.produce_vmlog(CONTRACT, [TRANSFER], b"x")  # same log, new block: new fact
        await wait(ctx, lambda: len(ctx.events) == 5)
    added, removed, readded = ctx.events[1:4]
    assert [e.removed for e in ctx.events] == [False, False, True, False, False]
    assert removed.id == added.id == readded.id and removed.data == added.data == readded.data
    assert ctx.events[4].id != ctx.events[0].id
    assert ctx.cursors[VMLOG_KEY] == "3"


async def test_a_rollback_lowers_the_cursor_so_the_heights_are_read_again(
    emulator: ViteEmulator,
) -> None:
    config = make_config(emulator.url, subscriptions=[{"topic": "snapshot_block"}])
    async with source_running(config) as ctx:
        await subscribed(emulator, ctx, 1, "snapshot_block")
        await emulator.produce_snapshots(3)
        await wait(ctx, lambda: len(ctx.events) == 3)
        dropped = await emulator.rollback_snapshots(2)
        await wait(ctx, lambda: len(ctx.events) == 5)
        assert ctx.cursors["snapshot_block"] == str(emulator.chain.snapshot_height)
    assert [e.id for e in ctx.events[3:]] == [snapshot_id(h) for h in dropped]
    assert all(e.removed for e in ctx.events[3:])


async def test_notifications_before_the_subscribe_answer_and_odd_shapes() -> None:
    """A server that pushes before answering, answers in a batch, with number heights."""
    note = {
        "jsonrpc": "2.0",
        "method": "subscribe_subscription",
        "params": {"subscription": "0x9", "result": {"hash": "ab" * 32, "height": 77}},
    }

    async def handler(ws: ServerConnection) -> None:
        async for raw in ws:
            req = orjson.loads(raw)
            if req["method"] == "subscribe_subscribe":
                await ws.send(json.dumps(note))  # before the id it belongs to
                await ws.send(json.dumps([{"jsonrpc": "2.0", "id": req["id"], "result": "0x9"}]))
            else:  # ledger_getLatestSnapshotBlock: an old node's plain number
                await ws.send(json.dumps({"jsonrpc": "2.0", "id": req["id"], "result": 76}))

    async with serve(handler, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        config = make_config(f"ws://127.0.0.1:{port}/", subscriptions=[{"topic": "snapshot_block"}])
        async with source_running(config) as ctx:
            await wait(ctx, lambda: ctx.events)
    assert ctx.events[0].data == {"hash": "ab" * 32, "height": 77}
    assert ctx.rejects == [] and ctx.cursors["snapshot_block"] == "77"


# -- spellings, null, poll -------------------------------------------------------------


async def test_a_seed_only_node_gets_the_seed_names_and_they_are_remembered() -> None:
    async with ViteEmulator(names="seed") as emu:
        await emu.produce_vmlog(CONTRACT, [TRANSFER], b"before")
        ctx = RecordingContext("chain", "vite")
        ctx.cursors[VMLOG_KEY] = "0"
        async with source_running(make_config(emu.url, mode="poll"), ctx):
            await wait(ctx, lambda: ctx.events)
            await emu.produce_vmlog(CONTRACT, [TRANSFER], b"polled")
            await wait(ctx, lambda: len(ctx.events) == 2)
            emu.expire_filters()
            await emu.produce_vmlog(CONTRACT, [TRANSFER], b"while expired")
            await wait(ctx, lambda: len(ctx.events) == 3)
    methods = [r["method"] for r in emu.received if r["method"] != "subscribe_getChangesByFilterId"]
    assert methods == [
        "subscribe_newVmLogFilter",  # -32601
        "subscribe_createVmLogFilter",  # -32601: go-vite's spelling, unknown to the seed
        "subscribe_createVmlogFilter",
        "ledger_getLatestAccountBlock",
        "ledger_getVmLogsByFilter",  # -32601
        "ledger_getVmlogsByFilter",
        "subscribe_createVmlogFilter",  # the filter expired: remembered spelling at once
        "ledger_getLatestAccountBlock",
        "ledger_getVmlogsByFilter",  # the block at the cursor: still the chain's?
        "ledger_getVmlogsByFilter",
    ]
    assert [e.data["log_data"] for e in ctx.events] == [
        "YmVmb3Jl",
        "cG9sbGVk",
        "d2hpbGUgZXhwaXJlZA==",
    ]


async def test_push_falls_back_to_the_seed_topic_names() -> None:
    async with ViteEmulator(names="seed") as emu:
        config = make_config(
            emu.url,
            subscriptions=[{"topic": "snapshot_block"}, {"topic": "vmlog", "address": CONTRACT}],
        )
        async with source_running(config) as ctx:
            await subscribed(emu, ctx, 2, "snapshot_block", VMLOG_KEY)
            await emu.produce_snapshots()
            await wait(ctx, lambda: ctx.events)
    topics = [r["params"][0] for r in emu.requests("subscribe_subscribe")]
    assert topics == [
        "newSnapshotBlock",
        "createSnapshotBlockSubscription",
        "newVmLog",
        "createVmlogSubscription",
    ]


async def test_poll_mode_filters_null_answers_and_an_expired_filter(emulator: ViteEmulator) -> None:
    config = make_config(
        emulator.url,
        mode="poll",
        subscriptions=[{"topic": "account_block"}, {"topic": "vmlog", "address": CONTRACT}],
    )
    async with source_running(config) as ctx:
        await wait_for(lambda: VMLOG_KEY in ctx.cursors and "account_block" in ctx.cursors)
        await wait_for(lambda: len(emulator.requests("subscribe_getChangesByFilterId")) >= 4)
        assert [r["method"] for r in emulator.received[:2]] == [
            "subscribe_newAccountBlockFilter",
            "subscribe_newVmLogFilter",
        ]
        block = await emulator.produce_vmlog(CONTRACT, [TRANSFER], b"1")
        await wait(ctx, lambda: len(ctx.events) == 2)  # the block and its log
        emulator.expire_filters()
        await emulator.produce_vmlog(CONTRACT, [TRANSFER], b"2")  # only the ledger sees it
        await wait(ctx, lambda: len(heights(ctx, "vmlog", "account_block_height")) == 2)
        await wait(ctx, lambda: len(ctx.gaps) == 1)
        await emulator.produce_vmlog(CONTRACT, [TRANSFER], b"3")
        await wait(ctx, lambda: len(heights(ctx, "vmlog", "account_block_height")) == 3)
    assert ctx.events[0].type == "account_block" and ctx.events[0].data == {"hash": block.hash}
    assert heights(ctx, "vmlog", "account_block_height") == [1, 2, 3]
    assert ctx.gaps[0]["reason"] == GAP_NO_HEIGHT and ctx.gaps[0]["topic"] == "account_block"
    assert ctx.rejects == []  # the plain account filter's null answers are empty lists
    created = [
        r["method"]
        for r in emulator.received
        if "Filter" in r["method"] and "get" not in r["method"]
    ]
    assert (
        created.count("subscribe_newVmLogFilter") == 2
        and created.count("subscribe_newAccountBlockFilter") == 2
    )
    assert ctx.states() == ["up", "gap"]  # the connection never dropped


async def test_poll_mode_keeps_its_filters_across_a_reconnect(emulator: ViteEmulator) -> None:
    async with source_running(make_config(emulator.url, mode="poll")) as ctx:
        await wait_for(lambda: VMLOG_KEY in ctx.cursors)
        await away(emulator)
        await emulator.produce_vmlog(CONTRACT, [TRANSFER], b"buffered by the filter")
        await wait(ctx, lambda: ctx.events)
    assert len(emulator.requests("subscribe_newVmLogFilter")) == 1
    assert emulator.requests("ledger_getVmLogsByFilter") == [] and ctx.gaps == []


async def test_a_poll_answer_lost_in_flight_is_read_again_from_the_ledger(
    emulator: ViteEmulator,
) -> None:
    # The poll emptied the filter; the answer carrying the log never came (a cut): the
    # filter still exists after the reconnect, but what it held must be read again.
    async with source_running(make_config(emulator.url, mode="poll")) as ctx:
        await wait_for(lambda: VMLOG_KEY in ctx.cursors)
        emulator.lose_answer("subscribe_getChangesByFilterId", lambda result: result["result"])
        block = await emulator.produce_vmlog(CONTRACT, [TRANSFER], b"in the lost answer")
        await wait(ctx, lambda: ctx.events)
    assert [e.data["account_block_hash"] for e in ctx.events] == [block.hash]
    assert len(emulator.requests("subscribe_newVmLogFilter")) == 1  # the filter was kept
    assert ctx.cursors[VMLOG_KEY] == str(block.height) and ctx.gaps == []


async def test_a_malformed_poll_answer_is_read_again_from_the_ledger(
    emulator: ViteEmulator,
) -> None:
    # The poll emptied the filter; its answer could not be read: what it held was lost,
    # with a reject and no gap (second review, read in the code).
    async with source_running(make_config(emulator.url, mode="poll")) as ctx:
        await wait_for(lambda: VMLOG_KEY in ctx.cursors)
        emulator.mangle_answer("subscribe_getChangesByFilterId", lambda result: 42)
        block = await emulator.produce_vmlog(CONTRACT, [TRANSFER], b"in the bad answer")
        await wait(ctx, lambda: ctx.events)
    assert [e.data["account_block_hash"] for e in ctx.events] == [block.hash]
    assert ctx.rejects == ["malformed poll answer"] and ctx.gaps == []


# -- topics without heights ------------------------------------------------------------


async def test_unreceived_relists_and_all_accounts_gaps_after_a_reconnect(
    emulator: ViteEmulator,
) -> None:
    config = make_config(
        emulator.url,
        subscriptions=[{"topic": "unreceived_block", "address": ME}, {"topic": "account_block"}],
    )
    async with source_running(config) as ctx:
        await subscribed(emulator, ctx, 2, f"unreceived_block:{ME}", "account_block")
        first = await emulator.produce_account_block(PAYER, to=ME)
        await wait(ctx, lambda: len(ctx.events) == 2)  # the send, and it is unreceived by ME
        await away(emulator)
        second = await emulator.produce_account_block(PAYER, to=ME)
        await wait(ctx, lambda: len(ctx.gaps) == 2)
    unreceived = [e for e in ctx.events if e.type == "unreceived_block"]
    assert [e.data["hash"] for e in unreceived] == [first.hash, second.hash]  # re-listed: once each
    reasons = {g["topic"]: g["reason"] for g in ctx.gaps}
    assert reasons == {"unreceived_block": GAP_UNRECEIVED, "account_block": GAP_NO_HEIGHT}
    assert all(g["since"] and g["since"] <= g["until"] for g in ctx.gaps)


@pytest.mark.parametrize(
    ("unreceived", "gaps"), [(4, [GAP_UNRECEIVED]), (5, [GAP_UNRECEIVED_LIMIT, GAP_UNRECEIVED])]
)
async def test_exactly_backfill_limit_unreceived_blocks_are_not_more_than_it(
    emulator: ViteEmulator, unreceived: int, gaps: list[str]
) -> None:
    config = make_config(
        emulator.url, backfill_limit=4, subscriptions=[{"topic": "unreceived_block", "address": ME}]
    )
    async with source_running(config) as first:
        await subscribed(emulator, first, 1, f"unreceived_block:{ME}")
    for _ in range(unreceived):
        emulator.chain.add_account_block(PAYER, (), ME)
    async with source_running(config, restarted_from(first)) as ctx:
        await wait(ctx, lambda: ctx.gaps and ctx.gaps[-1]["reason"] == GAP_UNRECEIVED)
    assert [g["reason"] for g in ctx.gaps] == gaps
    assert len(ctx.events) == 4


# -- failures --------------------------------------------------------------------------


async def test_a_refused_subscription_is_down_with_the_reason_and_retried(
    emulator: ViteEmulator,
) -> None:
    emulator.fail("subscribe_subscribe", times=None, message="addressHeightRange is nil")
    async with source_running(make_config(emulator.url), wait_started=False) as ctx:
        await wait(ctx, lambda: ctx.states() == ["down"])
        await wait_for(lambda: emulator.connections >= 2)  # with backoff
        emulator.failing.clear()
        await wait(ctx, lambda: "up" in ctx.states())
    assert (
        ctx.status[0][1]
        == "the node refused newVmLog or createVmlogSubscription: addressHeightRange is nil (-32002)"
    )


async def test_a_node_without_the_subscribe_module_says_so(emulator: ViteEmulator) -> None:
    emulator.absent.add("subscribe_subscribe")
    async with source_running(make_config(emulator.url), wait_started=False) as ctx:
        await wait(ctx, lambda: ctx.states() == ["down"])
    assert "knows none of newVmLog or createVmlogSubscription" in ctx.status[0][1]
    assert "PublicModules" in ctx.status[0][1]


async def test_malformed_frames_are_counted_and_skipped(emulator: ViteEmulator) -> None:
    async with source_running(make_config(emulator.url)) as ctx:
        await subscribed(emulator, ctx, 1, VMLOG_KEY)
        sub_id = next(sid for c in emulator.clients for sid in c.subs)
        await emulator.push_raw("this is not json")
        bad_item = {
            "jsonrpc": "2.0",
            "method": "subscribe_subscription",
            "params": {"subscription": sub_id, "result": [{"vmlog": {}}]},
        }
        await emulator.push_raw(json.dumps(bad_item))
        await emulator.produce_vmlog(CONTRACT, [TRANSFER], b"ok")
        await wait(ctx, lambda: ctx.events)
        await emulator.push_raw("x" * (9 * 1024 * 1024))  # over max_size: closes (1009)
        await wait(ctx, lambda: ctx.states()[-1:] == ["up"] and len(ctx.states()) == 3)
    assert ctx.rejects == [
        "malformed frame: not JSON",
        "malformed vmlog item: no account block hash",
        "oversized frame",
    ]
    assert ctx.status[1][1] == "a frame over the size limit closed the connection"


async def test_silence_on_a_snapshot_subscription_is_stale(emulator: ViteEmulator) -> None:
    config = make_config(
        emulator.url, subscriptions=[{"topic": "snapshot_block"}], stale_after="1s"
    )
    async with source_running(config) as ctx:
        await wait(ctx, lambda: ctx.states() == ["up", "stale", "up"], within=5)
    assert ctx.status[1][1] == "no snapshot block for 1s"


async def test_a_quiet_vmlog_subscription_is_probed_not_dropped(emulator: ViteEmulator) -> None:
    async with source_running(make_config(emulator.url, stale_after="1s")):
        await wait_for(
            lambda: len(emulator.requests("ledger_getSnapshotChainHeight")) >= 2, within=5
        )
        assert emulator.connections == 1


async def test_an_unreachable_node_is_down_with_a_reason() -> None:
    async with ViteEmulator() as emu:
        url = emu.url  # nobody listens here once the emulator is closed
    async with source_running(make_config(url), wait_started=False) as ctx:
        await wait(ctx, lambda: ctx.states() == ["down"])
    assert ctx.status[0][1].startswith("cannot connect: ")


@pytest.fixture
async def quiet_emulator() -> AsyncIterator[ViteEmulator]:
    async with ViteEmulator() as emu:
        yield emu


async def test_two_logs_in_one_block_are_two_events(quiet_emulator: ViteEmulator) -> None:
    emu = quiet_emulator
    async with source_running(make_config(emu.url)) as ctx:
        await subscribed(emu, ctx, 1, VMLOG_KEY)
        same = log_of([TRANSFER], b"twice")
        await emu.produce_account_block(CONTRACT, [same, same, log_of([TRANSFER], b"other")])
        await wait(ctx, lambda: len(ctx.events) == 3)
        await away(emu)
        await emu.produce_account_block(CONTRACT, [same, same])
        await wait(ctx, lambda: len(ctx.events) == 5)
    assert len({e.id for e in ctx.events}) == 5
    await anyio.lowlevel.checkpoint()


async def test_a_fact_pushed_twice_is_emitted_once(emulator: ViteEmulator) -> None:
    async with source_running(make_config(emulator.url)) as ctx:
        await subscribed(emulator, ctx, 1, VMLOG_KEY)
        block = await emulator.produce_vmlog(CONTRACT, [TRANSFER], b"once")
        await wait(ctx, lambda: ctx.events)
        (sub_id,) = [sid for c in emulator.clients for sid in c.subs]
        item = {
            "vmlog": {"topics": [TRANSFER], "data": "b25jZQ=="},
            "accountBlockHash": block.hash,
            "accountBlockHeight": 1,  # a number this time: the same fact all the same
            "address": CONTRACT,
            "removed": False,
        }
        frame = {
            "jsonrpc": "2.0",
            "method": "subscribe_subscription",
            "params": {"subscription": sub_id, "result": [item]},
        }
        # Re-sent twice. (Two identical items in one push would be two identical logs of
        # one block, which get distinct ids: test_two_logs_in_one_block_are_two_events.)
        await emulator.push_raw(json.dumps(frame))
        await emulator.push_raw(json.dumps(frame))
        await emulator.produce_vmlog(CONTRACT, [TRANSFER], b"marker")
        await wait(ctx, lambda: len(ctx.events) >= 2)
    assert [e.data["log_data"] for e in ctx.events] == ["b25jZQ==", "bWFya2Vy"]


class PushesBeforeTheHead(ViteEmulator):
    """Produces a snapshot block (pushed at once) just before it answers a head read: the
    push reaches the source while it waits for the head, which then includes it."""

    async def _on_frame(self, client: Any, raw: str | bytes) -> None:
        if b"ledger_getLatestSnapshotBlock" in (raw.encode() if isinstance(raw, str) else raw):
            await self.produce_snapshots(1)
        await super()._on_frame(client, raw)


class Ordered(RecordingContext):
    """Records emits and cursor saves in the order they happen."""

    def __init__(self) -> None:
        super().__init__("chain", "vite")
        self.log: list[tuple[str, int]] = []

    async def emit(self, event: Any) -> None:
        if event.type == "snapshot_block":
            self.log.append(("emit", event.data["height"]))
        await super().emit(event)

    async def emit_many(self, events: Any) -> None:
        for event in events:
            await self.emit(event)

    async def save_cursor(self, key: str, value: str) -> None:
        self.log.append(("save", int(value)))
        await super().save_cursor(key, value)


async def test_a_first_start_saves_its_position_after_the_pushes_it_held() -> None:
    async with PushesBeforeTheHead() as emulator:
        config = make_config(emulator.url, subscriptions=[{"topic": "snapshot_block"}])
        ctx = Ordered()
        async with source_running(config, ctx):
            await wait_for(lambda: any(what == "save" for what, _ in ctx.log), what="a save")
        head = emulator.chain.snapshot_height
    # The block pushed while the head was read is emitted before any cursor reaches it:
    # killed after that save, a restart would otherwise never emit it.
    assert ctx.log[:2] == [("emit", head), ("save", head)]


async def test_a_reconnect_before_any_position_is_known_is_a_gap(emulator: ViteEmulator) -> None:
    config = make_config(emulator.url, subscriptions=[{"topic": "snapshot_block"}])
    emulator.fail("ledger_getLatestSnapshotBlock")  # the first start's head read only
    async with source_running(config) as ctx:
        await wait_for(lambda: emulator.requests("ledger_getLatestSnapshotBlock"), what="it")
        await away(emulator)
        await emulator.produce_snapshots(3)  # while away
        await wait(ctx, lambda: bool(ctx.gaps))
        await wait_for(lambda: "snapshot_block" in ctx.cursors, what="a first position")
    (gap,) = ctx.gaps
    assert gap["topic"] == "snapshot_block" and gap["reason"].startswith("reconnected before")


@pytest.mark.parametrize("address_first", [False, True])
async def test_a_watched_address_keeps_its_fields_beside_every_accounts_topic(
    emulator: ViteEmulator, address_first: bool
) -> None:
    subs: list[dict[str, Any]] = [
        {"topic": "account_block"},
        {"topic": "account_block", "address": ME},
    ]
    if address_first:
        subs.reverse()
    config = make_config(emulator.url, subscriptions=subs)
    async with source_running(config) as ctx:
        await subscribed(emulator, ctx, 2, f"account_block:{ME}")
        block = await emulator.produce_account_block(ME)
        await wait(ctx, lambda: any(e.data.get("address") == ME for e in ctx.events))
    full = [e for e in ctx.events if e.data.get("address") == ME]
    assert [(e.data["hash"], e.data["height"]) for e in full] == [(block.hash, block.height)]
    # One fact, one id, whichever topic told it first.
    assert {e.id for e in ctx.events} == {full[0].id}


SNAPSHOTS = [{"topic": "snapshot_block"}]


async def seen_snapshots(emulator: ViteEmulator, ctx: RecordingContext, count: int) -> None:
    """Subscribed to snapshot blocks; ``count`` of them made and emitted."""
    await subscribed(emulator, ctx, 1, "snapshot_block")
    await emulator.produce_snapshots(count)
    await wait(ctx, lambda: len(ctx.events) == count)


async def test_a_rollback_below_the_cursor_while_away_reads_the_new_blocks_and_says_so(
    emulator: ViteEmulator,
) -> None:
    async with source_running(make_config(emulator.url, subscriptions=SNAPSHOTS)) as ctx:
        await seen_snapshots(emulator, ctx, 2)
        await away(emulator)
        gone = await emulator.rollback_snapshots(2)  # the two blocks seen, while away
        await emulator.produce_snapshots(3)  # what replaced them, and one more
        await wait(ctx, lambda: len(ctx.events) == 7)
    chain = emulator.chain.snapshots[-3:]
    seen, removals, added = ctx.events[:2], ctx.events[2:4], ctx.events[4:]
    assert {e.data["hash"] for e in seen} == set(gone)
    # The two facts the rollback removed are retracted (by id: the daemon gives the
    # retraction the data of the alert it retracts), then what replaced them comes.
    assert [(e.id, e.removed, e.data) for e in removals] == [(e.id, True, {}) for e in seen]
    assert [(e.data["height"], e.data["hash"]) for e in added] == [
        (b.height, b.hash) for b in chain
    ]
    (gap,) = ctx.gaps
    assert (
        gap["reason"].startswith("the chain was rolled back") and gap["height"] == chain[1].height
    )


async def test_a_rollback_to_a_shorter_chain_while_away_is_retracted_and_read_again(
    emulator: ViteEmulator,
) -> None:
    async with source_running(make_config(emulator.url, subscriptions=SNAPSHOTS)) as ctx:
        await seen_snapshots(emulator, ctx, 3)
        await away(emulator)
        await emulator.rollback_snapshots(2)  # the last two seen, while away
        await emulator.produce_snapshots(1)  # the new head: below the cursor
        replaced = emulator.chain.snapshots[-1]
        await wait(ctx, lambda: any(e.data.get("hash") == replaced.hash for e in ctx.events))
        await emulator.produce_snapshots(2)  # and the chain goes on past the old cursor
        await wait(ctx, lambda: len(ctx.events) == 8)
    seen, removals, after = ctx.events[:3], ctx.events[3:5], ctx.events[5:]
    assert [(e.id, e.removed, e.data) for e in removals] == [(e.id, True, {}) for e in seen[1:]]
    assert [(e.data["height"], e.data["hash"]) for e in after] == [
        (b.height, b.hash) for b in emulator.chain.snapshots[-3:]
    ]
    (gap,) = ctx.gaps
    assert gap["reason"].startswith("the chain was rolled back")
    assert ctx.cursors["snapshot_block"] == str(emulator.chain.snapshot_height)


async def test_a_rollback_while_stopped_is_found_at_the_restart(emulator: ViteEmulator) -> None:
    config = make_config(emulator.url, subscriptions=SNAPSHOTS)
    async with source_running(config) as first:
        await seen_snapshots(emulator, first, 2)
        await wait_for(lambda: "snapshot_block#block" in first.cursors, what="the block's hash")
    await emulator.rollback_snapshots(2)  # while the daemon is stopped
    await emulator.produce_snapshots(3)
    async with source_running(config, restarted_from(first)) as ctx:
        await wait(ctx, lambda: bool(ctx.gaps))
        await wait(
            ctx, lambda: ctx.cursors["snapshot_block"] == str(emulator.chain.snapshot_height)
        )
    new = {(b.height, b.hash) for b in emulator.chain.snapshots[-3:]}
    assert new <= {(e.data["height"], e.data["hash"]) for e in ctx.events if not e.removed}
    assert ctx.gaps[0]["reason"].startswith("the chain was rolled back")
    # The facts of the first run that the rollback removed: retracted at the restart.
    assert {e.id for e in ctx.events if e.removed} == {e.id for e in first.events}


def test_a_watch_keeps_the_facts_of_its_last_heights_only() -> None:
    from tocsin_vite.backfill import RECENT_FACTS, REREAD, Watch
    from tocsin_vite.protocol import SNAPSHOT
    from tocsin_vite.source import _read_recent

    watch = Watch(SNAPSHOT, None, (), "snapshot_block")
    for height in range(1, 41):
        watch.remember((height, f"h{height}", f"id{height}", "snapshot_block"))
    watch.remember((40, "h40", "id40", "snapshot_block"))  # the same fact again: kept once
    assert [r[0] for r in watch.recent] == list(range(41 - REREAD, 41))
    watch.forget("id40")
    assert watch.recent[-1][2] == "id39"
    for n in range(RECENT_FACTS + 10):  # many logs in one block: bounded
        watch.remember((50, "h50", f"log{n}", "vmlog"))
    assert len(watch.recent) == RECENT_FACTS and watch.recent[-1][2] == f"log{RECENT_FACTS + 9}"
    assert _read_recent(json.dumps(watch.recent[:2])) == watch.recent[:2]
    assert len(_read_recent(json.dumps(watch.recent * 3))) == RECENT_FACTS  # bounded too
    unreadable_values = (None, "", "{}", "[[1]]", '[["x", "h", "i", "t"]]', "not json")
    for unreadable in (*unreadable_values, '[[1e400, "h", "i", "t"]]'):
        assert _read_recent(unreadable) == []


async def test_a_rollback_under_a_cursor_without_a_log_is_found_at_the_restart(
    emulator: ViteEmulator,
) -> None:
    # A vmlog cursor moves on to blocks without logs (here: the resume of a restart reads
    # the head). Only the block at the cursor used to be checked, and it had no log: the
    # rolled-back log was never retracted, and the log that replaced it never read.
    config = make_config(emulator.url)
    async with source_running(config) as first:
        await subscribed(emulator, first, 1, VMLOG_KEY)
        await emulator.produce_vmlog(CONTRACT, [TRANSFER], b"pay me")
        await emulator.produce_account_block(CONTRACT)  # no log
        await wait(first, lambda: len(first.events) == 1)
    second = restarted_from(first)
    async with source_running(config, second):
        await wait_for(lambda: second.cursors[VMLOG_KEY] == "2", what="the cursor at 2")
    await emulator.rollback_account(CONTRACT, count=2)  # while stopped
    await emulator.produce_account_block(CONTRACT)
    replacement = await emulator.produce_vmlog(CONTRACT, [TRANSFER], b"pay me again")
    third = restarted_from(second)
    async with source_running(config, third) as ctx:
        await wait(ctx, lambda: len(ctx.events) == 2)
    removal, added = ctx.events
    assert (removal.id, removal.removed, removal.data) == (first.events[0].id, True, {})
    assert (added.removed, added.data["account_block_hash"]) == (False, replacement.hash)
    (gap,) = ctx.gaps
    assert gap["reason"].startswith("the chain was rolled back") and gap["height"] == 2


async def test_a_shorter_chain_that_grows_again_retracts_the_blocks_it_replaced(
    emulator: ViteEmulator,
) -> None:
    # Rolled back to below the cursor while stopped, with nothing at or below the new head
    # to tell it from a node that is behind: the new blocks at those heights tell it.
    key = f"account_block:{ME}"
    config = make_config(emulator.url, subscriptions=[{"topic": "account_block", "address": ME}])
    async with source_running(config) as first:
        await subscribed(emulator, first, 1, key)
        for _ in range(3):
            await emulator.produce_account_block(ME)
        await wait(first, lambda: len(first.events) == 3)
    await emulator.rollback_account(ME, count=2)  # heights 2 and 3, while stopped
    async with source_running(config, restarted_from(first)) as ctx:
        await wait_for(lambda: ctx.cursors[key] == "1", what="the cursor at the node's head")
        new = [await emulator.produce_account_block(ME) for _ in range(2)]
        await wait(ctx, lambda: len(ctx.events) == 4)
    assert [(e.id, e.removed) for e in ctx.events if e.removed] == [
        (e.id, True) for e in first.events[1:]
    ]
    assert [e.data["hash"] for e in ctx.events if not e.removed] == [b.hash for b in new]
    # Each retraction comes before the block that replaced it.
    assert [e.removed for e in ctx.events] == [True, False, True, False]


async def test_a_rollback_check_that_fails_is_a_gap(emulator: ViteEmulator) -> None:
    config = make_config(emulator.url, subscriptions=SNAPSHOTS)
    async with source_running(config) as first:
        await seen_snapshots(emulator, first, 2)
    await emulator.rollback_snapshots(2)  # while stopped
    await emulator.produce_snapshots(3)
    emulator.fail("ledger_getSnapshotBlocks")  # the check, once
    async with source_running(config, restarted_from(first)) as ctx:
        await wait(ctx, lambda: bool(ctx.gaps))
    (gap,) = ctx.gaps
    assert gap["reason"] == GAP_UNCHECKED
    assert (gap["from_height"], gap["to_height"]) == tuple(heights(first, "snapshot_block"))


async def test_the_logs_of_a_busy_contract_are_read_a_page_at_a_time(
    emulator: ViteEmulator,
) -> None:
    # 1000 heights of 10 logs of 600 bytes: one answer was over the frame limit, and the
    # source reconnected and asked the same again for ever (no event, no gap).
    async with source_running(make_config(emulator.url)) as first:
        await subscribed(emulator, first, 1, VMLOG_KEY)
    for _ in range(1000):
        logs = [log_of([TRANSFER, f"{i:064x}"], bytes(600)) for i in range(10)]
        emulator.chain.add_account_block(CONTRACT, logs)
    async with source_running(make_config(emulator.url), restarted_from(first)) as ctx:
        await wait(ctx, lambda: ctx.cursors[VMLOG_KEY] == "1000", within=30)
    pages = [r["params"][0]["pageIndex"] for r in emulator.requests("ledger_getVmLogsByFilter")]
    assert pages == list(range(11))  # 10 full pages, and an empty one that ends the range
    assert len(ctx.events) == 10_000 and not ctx.gaps and emulator.connections == 2
