"""The pure protocol functions, over recorded frames and hypothesis input; no sockets."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from tocsin_ewallet.protocol import (
    ACCEPT,
    FINALIZED_EVENT,
    REQUEST_EVENT,
    ServerFrame,
    authorization,
    check_topic,
    consumption_event,
    heartbeat_message,
    join_message,
    leave_message,
    parse_frame,
    provider_time,
    ref_key,
    reply_error,
    server_frame,
    socket_kind,
    upgrade_headers,
)

from tocsin import RecentIds

from .ewallet_helpers import FIXTURES, fixture_json, fixture_text


@pytest.mark.parametrize("path", sorted(FIXTURES.glob("*.json")), ids=lambda p: p.stem)
def test_every_recorded_frame_parses(path: Path) -> None:
    frame = parse_frame(path.read_text(encoding="utf-8"))
    assert isinstance(frame, ServerFrame)
    assert frame.topic and frame.event


def test_join_reply_and_heartbeat_reply_refs() -> None:
    ok = parse_frame(fixture_text("join_ok"))
    assert (ok.event, ok.success, ok.ref, ok.data, ok.error) == ("phx_reply", True, "1", None, None)
    beat = parse_frame(fixture_text("heartbeat_reply_number_ref"))
    assert beat.topic == "phoenix" and beat.ref == 7
    # The server echoes the JSON type the client sent: both compare equal to the sent "7".
    assert ref_key(beat.ref) == ref_key("7") == "7"
    assert ref_key(None) is None


@pytest.mark.parametrize(
    ("name", "code", "description"),
    [
        ("join_forbidden", "websocket:forbidden_channel", "You don't have access to this channel."),
        ("join_invalid_parameter", "client:invalid_parameter", "Invalid parameter provided."),
        ("join_unmatched_topic", "websocket:connect_error", "unmatched topic"),
        ("phoenix_v1_reply_error", "unmatched topic", "unmatched topic"),
    ],
)
def test_join_refusals(name: str, code: str, description: str) -> None:
    frame = parse_frame(fixture_text(name))
    assert frame.event == "phx_reply" and frame.success is False
    error = reply_error(frame)
    assert (error.code, error.description) == (code, description)


def test_consumption_request_event() -> None:
    event = consumption_event(parse_frame(fixture_text("consumption_request")))
    raw = fixture_json("consumption_request")
    assert event.type == REQUEST_EVENT
    assert event.data["id"] == "txc_01cbfg9qtdken61agxhx6wvj9h"
    assert event.data["status"] == "pending"
    assert event.data["amount"] == 100
    assert event.data["token_id"] == "tok_OMG_01cbffwvj6ma9a9gg1tb24880q"
    assert event.data["topic"] == raw["topic"]
    assert event.data["success"] is True and event.data["error"] is None
    # Everything the server sent in data is kept; three fields are added.
    assert set(event.data) == set(raw["data"]) | {"topic", "success", "error"}
    assert event.time == "2018-01-01T00:00:00.000Z"


def test_one_fact_one_id_whatever_the_topic_or_ref() -> None:
    on_request = consumption_event(parse_frame(fixture_text("consumption_finalized")))
    on_user = consumption_event(parse_frame(fixture_text("consumption_finalized_on_user_topic")))
    seed_ref = consumption_event(parse_frame(fixture_text("consumption_finalized_seed_ref")))
    again = consumption_event(parse_frame(fixture_text("consumption_finalized")))
    assert on_request.id == on_user.id == seed_ref.id == again.id
    assert on_user.data["topic"].startswith("user:")
    assert on_request.type == FINALIZED_EVENT and on_request.data["status"] == "confirmed"
    assert on_request.time == "2018-01-01T00:00:05.000Z"


def test_distinct_facts_get_distinct_ids() -> None:
    request = consumption_event(parse_frame(fixture_text("consumption_request")))
    confirmed = consumption_event(parse_frame(fixture_text("consumption_finalized")))
    failed = consumption_event(parse_frame(fixture_text("consumption_finalize_failed")))
    assert len({request.id, confirmed.id, failed.id}) == 3


def test_failed_finalize_is_an_event_with_its_error() -> None:
    event = consumption_event(parse_frame(fixture_text("consumption_finalize_failed")))
    assert event.type == FINALIZED_EVENT
    assert event.data["success"] is False
    assert event.data["status"] == "failed"
    assert event.data["error"]["code"] == "transaction:insufficient_funds"


def test_failed_finalize_without_data_still_has_a_topic_independent_id() -> None:
    raw = fixture_json("consumption_finalize_failed_no_data")
    first = consumption_event(parse_frame(json.dumps(raw)))
    second = consumption_event(parse_frame(json.dumps({**raw, "topic": "user:usr_x"})))
    assert first.id == second.id
    assert first.data == {"topic": raw["topic"], "success": False, "error": raw["error"]}
    assert first.time == ""  # no provider time: the receipt time is used


def test_non_consumption_events_are_not_events() -> None:
    for name in ("join_ok", "phx_close", "phx_error"):
        with pytest.raises(ValueError, match="not a consumption event"):
            consumption_event(parse_frame(fixture_text(name)))
    raw = fixture_json("consumption_request")
    with pytest.raises(ValueError, match="consumption is not an object"):
        consumption_event(parse_frame(json.dumps({**raw, "data": [1, 2]})))


def test_stock_phoenix_frames_are_read_too() -> None:
    ok = parse_frame(
        '{"topic":"t:1","event":"phx_reply","ref":"1","payload":{"status":"ok","response":{}}}'
    )
    assert ok.success is True and ok.error is None
    push = parse_frame(
        '{"topic":"t:1","event":"transaction_consumption_request","ref":null,"payload":{"id":"txc_1"}}'
    )
    assert push.success is True and push.data == {"id": "txc_1"}


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        ("not json", "not JSON"),
        (b"\xff\xfe\x00", "not JSON"),
        ('[null,"1","t:1","phx_reply",{}]', "not a JSON object"),
        ('{"event":"phx_reply","ref":"1","success":true}', "no topic or event"),
        ('{"topic":"t","event":5,"ref":"1","success":true}', "no topic or event"),
        ('{"topic":"t","event":"e","ref":true,"success":true}', "bad ref"),
        ('{"topic":"t","event":"e","ref":1.5,"success":true}', "bad ref"),
        ('{"topic":"t","event":"e","ref":"1","success":"yes"}', "bad success flag"),
        ('{"topic":"t","event":"e","ref":"1"}', "no success flag"),
        ("[" * 100_000, "not JSON"),
    ],
)
def test_malformed_frames_raise_a_fixed_reason(raw: str | bytes, reason: str) -> None:
    with pytest.raises(ValueError) as caught:
        parse_frame(raw)
    assert str(caught.value) == reason


def test_client_messages() -> None:
    assert json.loads(join_message("user:usr_1", "1")) == {
        "topic": "user:usr_1",
        "event": "phx_join",
        "ref": "1",
        "data": {},
    }
    assert json.loads(leave_message("user:usr_1", "2"))["event"] == "phx_leave"
    assert json.loads(heartbeat_message("3")) == {
        "topic": "phoenix",
        "event": "heartbeat",
        "ref": "3",
        "data": {},
    }


def test_authorization_and_headers() -> None:
    value = authorization("OMGClient", "api-key", "auth:token")
    scheme, token = value.split(" ")
    assert scheme == "OMGClient"
    assert base64.b64decode(token) == b"api-key:auth:token"
    assert upgrade_headers(value) == {"Authorization": value, "Accept": ACCEPT}
    assert ACCEPT == "application/vnd.omisego.v1+json"


def test_server_frame_has_exactly_the_serializer_keys() -> None:
    frame = json.loads(server_frame("t:1", "phx_reply", 3))
    assert set(frame) == {"success", "version", "data", "error", "topic", "event", "ref"}
    assert frame["ref"] == 3 and frame["version"] == "1"


@pytest.mark.parametrize(
    ("url", "kind"),
    [
        ("wss://ewallet.example.com/api/client/socket", "client"),
        ("ws://127.0.0.1:4000/api/admin/socket", "admin"),
        ("wss://example.com/ewallet/api/client/socket", "client"),
    ],
)
def test_socket_kind(url: str, kind: str) -> None:
    assert socket_kind(url) == kind


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("https://example.com/api/client/socket", "ws:// or wss://"),
        ("wss://example.com/api/client/socket/websocket", "must end with"),
        ("wss://example.com/socket", "must end with"),
        ("wss:///api/client/socket", "no host"),
        ("wss://example.com/api/client/socket?headers[Authorization]=x", "no query string"),
    ],
)
def test_bad_socket_urls(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        socket_kind(url)


def test_topics() -> None:
    for topic in (
        "user:usr_01",
        "address:5555cer3-15d1",
        "account:acc_1",
        "transaction_request:txr_1",
        "transaction_consumption:txc_1",
    ):
        assert check_topic(topic) == topic
    for bad, message in (
        ("foo:bar", "not an eWallet channel"),
        ("transaction_request", "not an eWallet channel"),
        ("transaction_request_consumption:txc_1", "not an eWallet channel"),
        ("user:", "needs an id"),
        ("user: usr_1", "needs an id"),
    ):
        with pytest.raises(ValueError, match=message):
            check_topic(bad)


def test_provider_time() -> None:
    assert provider_time("2018-01-01T00:00:00Z") == "2018-01-01T00:00:00.000Z"
    assert provider_time("2018-01-01T02:00:00.123456+02:00") == "2018-01-01T00:00:00.123Z"
    assert provider_time("2018-01-01T00:00:00") == "2018-01-01T00:00:00.000Z"  # naive: UTC
    for bad in (None, 5, "", "yesterday", "0001-01-01T00:00:00Z", "9999-12-31T23:59:59-12:00"):
        assert provider_time(bad) == ""


def test_recent_ids_are_bounded() -> None:
    recent = RecentIds(size=3)
    assert [recent.seen(i) for i in "abca"] == [False, False, False, True]
    recent.seen("d")
    recent.seen("e")  # b was the oldest, then c: a (seen again) stays
    assert recent.seen("a")
    assert not recent.seen("b")


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
frame_like = st.fixed_dictionaries(
    {},
    optional={
        "topic": st.sampled_from(["t:1", "phoenix"]) | json_values,
        "event": st.sampled_from([REQUEST_EVENT, FINALIZED_EVENT, "phx_reply", "phx_error"])
        | json_values,
        "ref": json_values,
        "success": json_values,
        "data": json_values,
        "error": json_values,
        "payload": json_values,
    },
)


@given(st.binary() | st.text() | frame_like.map(json.dumps) | json_values.map(json.dumps))
def test_any_input_is_a_frame_or_a_value_error(raw: str | bytes) -> None:
    try:
        frame = parse_frame(raw)
    except ValueError:
        return
    assert isinstance(frame, ServerFrame)
    reply_error(frame)  # never raises on a parsed frame
    try:
        event = consumption_event(frame)
    except ValueError:
        return
    assert event.type in (REQUEST_EVENT, FINALIZED_EVENT)
    assert len(event.id) == 32


@given(st.text(max_size=50) | json_values)
def test_provider_time_never_raises(value: object) -> None:
    assert isinstance(provider_time(value), str)
