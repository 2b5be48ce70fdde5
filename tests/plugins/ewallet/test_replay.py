"""Record and replay: the frames a live eWallet source read give back the events it emitted."""

from __future__ import annotations

import json
from typing import Any

import anyio
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tocsin_ewallet.emulator import DEMO_USER, EWalletEmulator
from tocsin_ewallet.protocol import FINALIZED_EVENT, REQUEST_EVENT, server_frame

from support import JSON
from tocsin import Event, EventFactory, FrameParser
from tocsin.testing import RecordingContext

from .ewallet_helpers import REQUEST_TOPIC, make_config, running_source, source_class

USER_TOPIC = f"user:{DEMO_USER}"


def parser(ctx: EventFactory | None = None) -> FrameParser:
    config = make_config("ws://127.0.0.1:1/api/client/socket")
    made = source_class().frame_parser(config, ctx or RecordingContext("wallet", "ewallet"))
    assert made is not None
    return made


def replay(parse: FrameParser, frames: list[str | bytes]) -> list[Event]:
    return [event for frame in frames for event in parse(frame)]


async def test_recorded_frames_replay_as_the_live_events(emulator: EWalletEmulator) -> None:
    config = make_config(emulator.url, channels=[REQUEST_TOPIC, USER_TOPIC])
    async with running_source(config) as ctx:
        first = await emulator.request_consumption()  # reaches both joined topics
        await emulator.finalize(first["id"])
        await emulator.finalize(first["id"])  # the same fact again
        second = await emulator.request_consumption()
        await emulator.fail_finalize(second["id"], "expired")
        await emulator.push_raw("not json")  # rejected live, malformed on replay
        with anyio.fail_after(5):
            await ctx.wait_until(lambda: len(ctx.events) == 4 and bool(ctx.rejects))
    assert [e.type for e in ctx.events] == [REQUEST_EVENT, FINALIZED_EVENT] * 2
    assert ctx.rejects == ["malformed frame: not JSON"]
    assert len(ctx.frames) > 6  # join replies, broadcasts on two topics, heartbeat replies

    parse = parser()
    events: list[Event] = []
    malformed: list[str] = []
    for frame in ctx.frames:
        try:
            events += parse(frame)
        except ValueError as err:
            malformed.append(str(err))
    assert malformed == ctx.rejects
    assert [e.envelope() for e in events] == [e.envelope() for e in ctx.events]


def test_control_frames_give_no_event() -> None:
    parse = parser()
    reply = server_frame(REQUEST_TOPIC, "phx_reply", "1")
    heartbeat = server_frame("phoenix", "phx_reply", 3)
    closed = server_frame(REQUEST_TOPIC, "phx_close", "1", success=False)
    v1_reply = json.dumps(
        {"topic": "phoenix", "event": "phx_reply", "ref": "2", "payload": {"status": "ok"}}
    )
    assert replay(parse, [reply, heartbeat, closed, v1_reply]) == []


def test_a_broadcast_on_two_topics_is_one_event_and_v1_payloads_are_read() -> None:
    consumption = {"id": "txc_1", "status": "pending", "updated_at": "2026-11-22T10:00:00Z"}
    on_request = server_frame(REQUEST_TOPIC, REQUEST_EVENT, None, data=consumption)
    on_user = server_frame(USER_TOPIC, REQUEST_EVENT, None, data=consumption)
    v1 = json.dumps(
        {
            "topic": USER_TOPIC,
            "event": FINALIZED_EVENT,
            "ref": None,
            "payload": {**consumption, "status": "confirmed"},
        }
    )
    (request, final) = replay(parser(), [on_request, on_user, v1])
    assert (request.type, request.time) == (REQUEST_EVENT, "2026-11-22T10:00:00.000Z")
    assert request.data["topic"] == REQUEST_TOPIC and request.source == "wallet"
    assert final.type == FINALIZED_EVENT and final.data["status"] == "confirmed"


@pytest.mark.parametrize(
    ("frame", "reason"),
    [
        (b"\x00\xff garbage", "malformed frame: not JSON"),
        ('[null, null, "user:1", "phx_reply", {}]', "malformed frame: not a JSON object"),
        ('{"topic": 1, "event": "x"}', "malformed frame: no topic or event"),
        ('{"topic": "a", "event": "b", "ref": true, "success": true}', "malformed frame: bad ref"),
        ('{"topic": "a", "event": "b", "ref": null}', "malformed frame: no success flag"),
        (
            server_frame(REQUEST_TOPIC, REQUEST_EVENT, None, data=[1, 2]),
            "malformed consumption: consumption is not an object",
        ),
    ],
)
def test_malformed_frames_raise_value_error(frame: str | bytes, reason: str) -> None:
    with pytest.raises(ValueError) as err:
        parser()(frame)
    assert str(err.value) == reason


FRAMES = st.fixed_dictionaries(
    {
        "topic": st.sampled_from([REQUEST_TOPIC, "phoenix"]) | JSON,
        "event": st.sampled_from([REQUEST_EVENT, FINALIZED_EVENT, "phx_reply"]) | JSON,
        "ref": JSON,
    },
    optional={"success": JSON, "data": JSON, "error": JSON, "payload": JSON, "version": JSON},
)


@settings(max_examples=200, deadline=None)
@given(st.one_of(st.binary(max_size=200), st.text(max_size=200), FRAMES.map(json.dumps)))
def test_any_frame_gives_events_or_value_error(frame: Any) -> None:
    try:
        events = parser()(frame)
    except ValueError:
        return
    assert all(isinstance(e, Event) for e in events)
