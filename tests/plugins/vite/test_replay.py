"""Record and replay: the frames a live Vite source read give back the events it pushed."""

from __future__ import annotations

import json
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tocsin_vite import ViteConfig, ViteEmulator, ViteSource
from tocsin_vite.protocol import (
    METHOD_NOT_FOUND,
    error_frame,
    notification_frame,
    result_frame,
    snapshot_id,
)

from support import JSON, wait_for
from support import replay_frames as replay
from tocsin import Event, FrameParser
from tocsin.testing import RecordingContext

from .conftest import CONTRACT, ME, OTHER, PAYER, TRANSFER, make_config, source_running, wait

ALL_TOPICS = [
    {"topic": "snapshot_block"},
    {"topic": "account_block"},
    {"topic": "account_block", "address": ME},
    {"topic": "unreceived_block", "address": ME},
    {"topic": "vmlog", "addresses": [CONTRACT, OTHER]},
]


def parser(config: ViteConfig) -> FrameParser:
    made = ViteSource.frame_parser(config, RecordingContext("chain", "vite"))
    assert made is not None
    return made


def envelope(event: Event) -> dict[str, Any]:
    """The envelope less the time: pushes carry none, so it is the receipt time."""
    out = event.envelope()
    del out["time"]
    return out


async def subscribed(emulator: ViteEmulator, ctx: RecordingContext, count: int) -> None:
    await wait_for(lambda: emulator.subscriptions == count, what=f"{count} subscriptions")
    # RecordingContext.save_cursor does not wake wait_until: poll for the cursors.
    await wait_for(lambda: len(ctx.cursors) >= count, what="the cursors")


async def test_recorded_pushes_replay_as_the_live_events(emulator: ViteEmulator) -> None:
    config = make_config(emulator.url, subscriptions=ALL_TOPICS)
    async with source_running(config) as ctx:
        await subscribed(emulator, ctx, 5)
        await emulator.produce_snapshots(2)
        send = await emulator.produce_account_block(PAYER, to=ME)
        await emulator.receive(ME, send.hash)
        await emulator.produce_vmlog(CONTRACT, [TRANSFER, "00" * 32], b"\x01")
        await emulator.produce_vmlog(OTHER, [TRANSFER], b"\x02")
        await emulator.rollback_account(CONTRACT, readd=True)  # removed, then re-added
        dropped = await emulator.rollback_snapshots(1)
        await wait(
            ctx, lambda: any(e.id == snapshot_id(dropped[0]) and e.removed for e in ctx.events)
        )
        old_ids = {sid for c in emulator.clients for sid in c.subs}
        await emulator.drop_connections()
        await wait_for(lambda: not emulator.clients, what="the connection to close")
        await subscribed(emulator, ctx, 5)
        # The heads read again (ME, CONTRACT, OTHER, in order): what comes next is pushed,
        # not fetched by the resume (a backfilled fact would not replay).
        heads = "ledger_getLatestAccountBlock"
        await wait_for(lambda: len(emulator.requests(heads)) == 6, what="the resume")
        seen = len(ctx.events)
        stale = notification_frame(next(iter(old_ids)), [{"hash": "ab", "height": "1"}])
        await emulator.push_raw(json.dumps(stale))  # an id of the last connection
        await emulator.push_raw("not json")
        await emulator.produce_snapshots()
        await emulator.produce_vmlog(OTHER, [TRANSFER], b"\x03")
        await wait(ctx, lambda: ctx.events[-1].data.get("log_data") == "Aw==")
        assert len(ctx.events) > seen + 2  # a snapshot, the log and its account block
    # A push that comes while a call of the resume is in flight waits for its answer; a
    # frame that is not JSON is refused as it is read: the two may come either way round.
    assert sorted(ctx.rejects) == [
        "malformed frame: not JSON",
        "push for an unknown subscription id",
    ]
    types = [e.type for e in ctx.events]
    assert {"snapshot_block", "account_block", "unreceived_block", "vmlog"} <= set(types)
    # rolled back: the log and its account block, then the snapshot
    assert [e.removed for e in ctx.events].count(True) == 3

    events, malformed = replay(parser(config), ctx.frames)
    assert sorted(malformed) == sorted(ctx.rejects)
    assert [envelope(e) for e in events] == [envelope(e) for e in ctx.events]
    assert all(e.time.endswith("Z") for e in events)


async def test_backfilled_facts_do_not_replay(emulator: ViteEmulator) -> None:
    config = make_config(emulator.url)  # vmlog of CONTRACT
    async with source_running(config) as ctx:
        await subscribed(emulator, ctx, 1)
        await emulator.produce_vmlog(CONTRACT, [TRANSFER], b"live 1")
        await wait(ctx, lambda: len(ctx.events) == 1)
        await emulator.drop_connections()
        await wait_for(lambda: not emulator.clients, what="the connection to close")
        await emulator.produce_vmlog(CONTRACT, [TRANSFER], b"away")  # only the ledger has it
        await wait(ctx, lambda: len(ctx.events) == 2)  # fetched after the reconnect
        await emulator.produce_vmlog(CONTRACT, [TRANSFER], b"live 2")
        await wait(ctx, lambda: len(ctx.events) == 3)
    events, malformed = replay(parser(config), ctx.frames)
    assert malformed == []
    live = [envelope(e) for e in ctx.events]
    assert [envelope(e) for e in events] == [live[0], live[2]]


async def test_poll_answers_replay(emulator: ViteEmulator) -> None:
    subs = [{"topic": "snapshot_block"}, {"topic": "vmlog", "address": CONTRACT}]
    config = make_config(emulator.url, mode="poll", subscriptions=subs)
    async with source_running(config) as ctx:
        await wait_for(lambda: len(emulator.filters) == 2, what="two filters")
        await emulator.produce_snapshots(2)
        await emulator.produce_vmlog(CONTRACT, [TRANSFER], b"polled")
        await emulator.rollback_snapshots(1)
        await wait(ctx, lambda: len(ctx.events) == 4)
    events, malformed = replay(parser(config), ctx.frames)
    assert malformed == []
    assert [envelope(e) for e in events] == [envelope(e) for e in ctx.events]


# -- learning ids from the answers -----------------------------------------------------


def frame(obj: dict[str, Any]) -> str:
    return orjson.dumps(obj).decode()


def test_ids_follow_the_config_order_and_a_spelling_fallback() -> None:
    config = make_config(
        subscriptions=[{"topic": "snapshot_block"}, {"topic": "vmlog", "address": CONTRACT}]
    )
    parse = parser(config)
    vmlog = {
        "vmlog": {"topics": [TRANSFER], "data": "AQ=="},
        "accountBlockHash": "ab" * 32,
        "accountBlockHeight": "7",
        "address": CONTRACT,
        "removed": False,
    }
    frames = [
        frame(result_frame(1, "0xaa")),  # snapshot_block
        frame(error_frame(2, METHOD_NOT_FOUND, "The method subscribe_newVmLog does not exist")),
        frame(result_frame(3, "0xbb")),  # vmlog, under the seed's name
        frame(result_frame(4, {"height": "100"})),  # the head: no event
        frame(notification_frame("0xaa", [{"hash": "cd" * 32, "height": "101"}])),
        frame(notification_frame("0xbb", [vmlog, {**vmlog, "removed": True}])),
        frame(notification_frame("0xbb", [vmlog])),  # re-added after the rollback
        frame(notification_frame("0xbb", [vmlog])),  # the same again: nothing
    ]
    events, malformed = replay(parse, frames)
    assert malformed == []
    assert [(e.type, e.removed) for e in events] == [
        ("snapshot_block", False),
        ("vmlog", False),
        ("vmlog", True),
        ("vmlog", False),
    ]
    assert events[0].data == {"hash": "cd" * 32, "height": 101}
    assert events[1].data["account_block_height"] == 7 and events[1].id == events[2].id

    # A new connection: its first answer resets the ids; the old ones are dead.
    assert parse(frame(result_frame(1, "0xcc"))) == []
    with pytest.raises(ValueError, match="push for an unknown subscription id"):
        parse(frame(notification_frame("0xaa", [{"hash": "ef" * 32, "height": "102"}])))
    (event,) = parse(frame(notification_frame("0xcc", [{"hash": "ef" * 32, "height": "102"}])))
    assert event.type == "snapshot_block"


def test_pushes_without_their_subscribe_answer_are_not_guessed() -> None:
    parse = parser(make_config(subscriptions=[{"topic": "snapshot_block"}]))
    with pytest.raises(ValueError, match="push for an unknown subscription id"):
        parse(frame(notification_frame("0x1", [{"hash": "ab", "height": "1"}])))
    parse(frame(error_frame(1, -32002, "refused")))  # refused: no id learnt
    with pytest.raises(ValueError, match="push for an unknown subscription id"):
        parse(frame(notification_frame("0x1", [{"hash": "ab", "height": "1"}])))


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"\xff\x00 garbage", "malformed frame: not JSON"),
        ("[]", "malformed frame: empty batch"),
        ("[1]", "malformed frame: not a JSON object"),
        ('{"jsonrpc": "2.0"}', "malformed frame: neither a response nor a notification"),
        (
            '{"method": "subscribe_subscription", "params": {"result": []}}',
            "malformed frame: notification without a subscription id",
        ),
        ("x" * (8 * 1024 * 1024 + 1), "malformed frame: oversized frame"),
    ],
)
def test_malformed_frames_raise_value_error(raw: str | bytes, reason: str) -> None:
    with pytest.raises(ValueError) as err:
        parser(make_config())(raw)
    assert str(err.value) == reason


def test_a_malformed_item_raises_unless_the_frame_has_good_ones() -> None:
    parse = parser(make_config(subscriptions=[{"topic": "snapshot_block"}]))
    parse(frame(result_frame(1, "0xaa")))
    with pytest.raises(ValueError, match="malformed snapshot_block item: bad hash"):
        parse(frame(notification_frame("0xaa", [{"hash": "zz", "height": "1"}])))
    good = {"hash": "ab", "height": "2"}
    (event,) = parse(frame(notification_frame("0xaa", [{"hash": "zz"}, good])))
    assert event.data == {"hash": "ab", "height": 2}


ITEMS = st.lists(
    st.dictionaries(
        st.sampled_from(["hash", "height", "removed", "received", "vmlog", "address"]),
        JSON,
        max_size=5,
    ),
    max_size=3,
)
FRAMES = st.one_of(
    st.builds(result_frame, st.integers(0, 3), st.sampled_from(["0x1", "0x2"]) | JSON),
    st.builds(notification_frame, st.sampled_from(["0x1", "0x2"]), ITEMS),
    JSON,
).map(lambda obj: json.dumps(obj))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(st.binary(max_size=100), st.text(max_size=100), FRAMES), max_size=6))
def test_any_frames_give_events_or_value_error(frames: list[str | bytes]) -> None:
    parse = parser(make_config(subscriptions=ALL_TOPICS))
    for raw in frames:
        try:
            events = parse(raw)
        except ValueError:
            continue
        assert all(isinstance(e, Event) for e in events)
