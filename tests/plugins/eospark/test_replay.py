"""Frames recorded from a live run against the emulator replay into the same events."""

from __future__ import annotations

from typing import Any

import anyio
import pytest
from tocsin_eospark import EOSParkEmulator, EOSParkSource
from tocsin_eospark.emulator import action, transaction, transfer
from tocsin_eospark.protocol import heartbeat_frame

from support import replay_frames
from tocsin import Event
from tocsin.testing import RecordingContext

from .conftest import ME, make_config, source_running


def fact(event: Event) -> dict[str, Any]:
    """What replay must reproduce: the whole envelope (EOSPark events carry block time)."""
    return event.envelope()


def replay(frames: list[str | bytes]) -> tuple[list[Event], int]:
    """The frames through ``frame_parser``: the events, and how many frames were malformed."""
    factory = RecordingContext("eos", "eospark")
    parse = EOSParkSource.frame_parser(make_config(), factory)
    assert parse is not None
    events, malformed = replay_frames(parse, frames)
    return events, len(malformed)


async def test_recorded_frames_replay_into_the_live_events(emulator: EOSParkEmulator) -> None:
    big = transaction([transfer("alice", ME, "250.0000 EOS", "invoice 7")])
    multi = transaction(
        [
            transfer("bob", ME, "1.0000 EOS"),
            action("eosio.token", "issue", "eosio", {"to": ME, "quantity": "5.0000 EOS"}),
            transfer(ME, "carol", "2.5000 EOS", "back"),
        ],
        global_action_seq=77,
    )
    async with source_running(make_config(emulator.url, stale_after="5s")) as ctx:
        with anyio.fail_after(5):
            await ctx.wait_until(lambda: emulator.subscribed > 0)
            await emulator.push_transaction(big, times=3)  # re-pushes: one event
            await emulator.push_raw("not json at all")
            await emulator.push_raw(heartbeat_frame("2026-11-22 18:00:00"))
            await emulator.push_transaction(multi)
            await ctx.wait_until(lambda: len(ctx.events) == 4)
    assert len(ctx.rejects) == 1
    # The subscribe ack, the three copies of the push, the bad frame, the heartbeat, the
    # second push (and perhaps the emulator's own heartbeats): every frame was recorded.
    assert len(ctx.frames) >= 7
    assert all(isinstance(f, str) for f in ctx.frames)

    events, bad = replay(ctx.frames)
    assert [fact(e) for e in events] == [fact(e) for e in ctx.events]
    assert bad == len(ctx.rejects)


def test_control_frames_give_no_event_and_a_broken_frame_raises() -> None:
    parse = EOSParkSource.frame_parser(make_config(), RecordingContext("eos", "eospark"))
    assert parse is not None
    assert parse(heartbeat_frame("2026-11-22 18:00:00")) == []
    assert parse('{"errno": 0, "msg_type": "subscribe", "data": {"subscribe": true}}') == []
    assert parse('{"errno": 403, "msg_type": "auth", "errmsg": "Forbidden"}') == []
    for broken in ("", "[]", '{"msg_type": "data", "errno": 0, "data": {}}', b"\xff"):
        with pytest.raises(ValueError):
            parse(broken)
