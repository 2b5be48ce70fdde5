"""protocol.py without sockets: recorded frames, normalization, stable ids, fuzzing."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tocsin_eospark.protocol import (
    MAX_FRAME,
    Ack,
    Heartbeat,
    Message,
    PushData,
    Refusal,
    Transaction,
    _typed_push,
    action_id,
    checked_frame,
    event_time,
    is_eos_name,
    parse_frame,
    read_frame,
    split_names,
    subscribe_message,
    unsubscribe_message,
)
from tocsin_eospark.source import transaction_events

from tocsin import Event, RecentIds, stable_id
from tocsin.testing import RecordingContext

from .conftest import fixture_json, fixture_text

SEED_TRX = "689b818fa45704e3c92d4c8b6c10bcea4fb0b24e0009c2d6273282eea7d1bec6"


def test_heartbeat() -> None:
    assert parse_frame(fixture_text("heartbeat.json")) == Heartbeat("2018-11-02 15:30:02")


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("subscribe_ok.json", Ack("subscribe", True, "ok")),
        ("subscribe_refused.json", Ack("subscribe", False, "Subscribe up to 5 accounts")),
        # The seed's example says "subscribe", its field table "unsubscribe": both are fine.
        ("unsubscribe_ok_example.json", Ack("unsubscribe", True, "ok")),
        ("unsubscribe_ok_table.json", Ack("unsubscribe", True, "ok")),
        ("subscribe_account_ok.json", Ack("subscribe_account", True, "ok")),
    ],
)
def test_acks(name: str, expected: Ack) -> None:
    assert parse_frame(fixture_text(name)) == expected


def test_auth_refusals() -> None:
    forbidden = parse_frame(fixture_text("auth_forbidden.json"))
    assert forbidden == Refusal(403, "auth", "Forbidden")
    assert isinstance(forbidden, Refusal)
    assert forbidden.bad_key and not forbidden.repeat_connection
    repeat = parse_frame(fixture_text("auth_repeat.json"))
    assert repeat == Refusal(406, "auth", "No repeat connection.")
    assert isinstance(repeat, Refusal)
    assert repeat.repeat_connection and not repeat.bad_key
    # errno as a string is read the same way
    assert parse_frame('{"errno":"403","msg_type":"auth","errmsg":"Forbidden"}') == forbidden


def events_of(trx: Transaction) -> list[Event]:
    """The events the live loop makes of ``trx``, with nothing seen before."""
    return transaction_events(trx, RecentIds(), RecordingContext("eos", "eospark"))


def test_seed_push_becomes_one_action_event() -> None:
    trx = parse_frame(fixture_text("data_seed.json").encode())  # bytes work as well as str
    assert isinstance(trx, Transaction)
    (event,) = events_of(trx)
    assert event.type == "action"
    assert event.id == action_id(SEED_TRX, 0)
    assert event.time == "2018-11-06T06:30:50.000Z"
    raw_action = fixture_json("data_seed.json")["data"]["actions"][0]
    assert event.data == {
        "contract": "eosio.token",
        "action": "transfer",
        "authorization": [{"actor": "luckymedice1", "permission": "active"}],
        "args": raw_action["data"],
        "hex_data": raw_action["hex_data"],
        "trx_id": SEED_TRX,
        "block_num": 25477790,
        "trx_timestamp": "2018-11-06T06:30:50.000",
        "action_index": 0,
    }
    assert "global_action_seq" not in event.data  # only when the push carries it


def test_multi_action_push_one_event_per_action_with_stable_ids() -> None:
    text = fixture_text("data_multi_action.json")
    first = parse_frame(text)
    assert isinstance(first, Transaction)
    events = events_of(first)
    assert [(e.data["contract"], e.data["action"]) for e in events] == [
        ("eosio", "buyrambytes"),
        ("eosio.token", "transfer"),
        ("eosio.token", "transfer"),
    ]
    assert [e.data["action_index"] for e in events] == [0, 1, 2]
    assert len({e.id for e in events}) == 3
    assert all(e.data["global_action_seq"] == 3120730087 for e in events)
    assert all(e.time == "2018-11-06T06:33:31.500Z" for e in events)
    # The same push again (a duplicate, a reconnect, a restart) gives the same ids.
    again = parse_frame(json.dumps(json.loads(text), indent=2))
    assert isinstance(again, Transaction)
    assert [e.id for e in events_of(again)] == [e.id for e in events]


def test_action_level_global_action_seq_wins() -> None:
    frame = fixture_json("data_multi_action.json")
    frame["data"]["actions"][1]["global_action_seq"] = 3120730089
    trx = parse_frame(json.dumps(frame))
    assert isinstance(trx, Transaction)
    assert [e.data["global_action_seq"] for e in events_of(trx)] == [
        3120730087,
        3120730089,
        3120730087,
    ]


def test_tolerated_variations() -> None:
    frame = fixture_json("data_seed.json")
    frame["data"]["block_num"] = "25477790"  # a numeric string
    del frame["data"]["actions"][0]["authorization"]
    del frame["data"]["actions"][0]["hex_data"]
    trx = parse_frame(json.dumps(frame))
    assert isinstance(trx, Transaction)
    (event,) = events_of(trx)
    assert event.data["block_num"] == 25477790
    assert event.data["authorization"] == []
    assert event.data["hex_data"] == ""
    # an unknown message type is well-formed: liveness, nothing else
    assert parse_frame('{"errno":0,"msg_type":"notice","errmsg":""}').__class__.__name__ == "Other"


def _seed_with(change: Any) -> str:
    frame = fixture_json("data_seed.json")
    change(frame)
    return json.dumps(frame)


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        ("nope", "not JSON"),
        (b"\xff\xfe\x00", "not JSON"),
        ("[1, 2]", "not a JSON object"),
        ("{}", "no msg_type"),
        ('{"msg_type": "data", "errno": true}', "bad errno"),
        ('{"msg_type": "data", "errno": 0}', "data push without a transaction"),
        (_seed_with(lambda f: f["data"].pop("trx_id")), "data push without a trx_id"),
        (_seed_with(lambda f: f["data"].update(actions={})), "data push without actions"),
        (_seed_with(lambda f: f["data"].update(block_num=-1)), "bad block_num"),
        (_seed_with(lambda f: f["data"].update(trx_timestamp=5)), "bad trx_timestamp"),
        (_seed_with(lambda f: f["data"]["actions"][0].pop("name")), "malformed action"),
        (_seed_with(lambda f: f["data"]["actions"].append("x")), "malformed action"),
        (
            _seed_with(lambda f: f["data"]["actions"][0].update(authorization="luckymedice1")),
            "malformed action",
        ),
        ('{"errno":0,"msg_type":"subscribe","data":{"subscribe":"yes"}}', "malformed ack"),
        ("x" * (MAX_FRAME + 1), "oversized frame"),
    ],
)
def test_malformed_frames_raise_a_fixed_reason(raw: str | bytes, reason: str) -> None:
    with pytest.raises(ValueError, match=f"^{reason}$"):
        parse_frame(raw)


@pytest.mark.parametrize(
    ("text", "iso"),
    [
        ("2018-11-06T06:30:50.000", "2018-11-06T06:30:50.000Z"),
        ("2018-11-06T06:30:50", "2018-11-06T06:30:50.000Z"),
        ("2018-11-06T06:30:50.5Z", "2018-11-06T06:30:50.500Z"),
        ("2018-11-06 14:30:50+08:00", "2018-11-06T06:30:50.000Z"),
        ("0001-01-01T00:00:00", "0001-01-01T00:00:00.000Z"),
        ("", ""),
        ("yesterday", ""),
    ],
)
def test_event_time(text: str, iso: str) -> None:
    assert event_time(text) == iso


def test_client_messages_match_the_seed() -> None:
    assert json.loads(subscribe_message(["iameoschatio"], ["eosio.token"], "transfer")) == {
        "msg_type": "subscribe",
        "account": "iameoschatio",
        "contract": "eosio.token",
        "action_name": "transfer",
    }
    assert json.loads(subscribe_message(["a1", "a2"], ["eosio.token", "eosio"]))["account"] == (
        "a1,a2"
    )
    assert json.loads(unsubscribe_message("a1", "eosio.token")) == {
        "msg_type": "unsubscribe",
        "account": "a1",
        "contract": "eosio.token",
        "action_name": "",
    }


def test_names() -> None:
    assert split_names(" a1, a2,,a1 ") == ["a1", "a2"]
    assert split_names(["a1", "a2,a3"]) == ["a1", "a2", "a3"]
    with pytest.raises(ValueError):
        split_names(5)
    assert is_eos_name("eosio.token") and is_eos_name("vvvvvvvvvvva") and is_eos_name("a")
    assert not is_eos_name("Alice") and not is_eos_name("eosio.t0ken") and not is_eos_name("")
    assert not is_eos_name("abcdefghijklmz")  # 13th character beyond a-j


def test_recent_ids_are_bounded() -> None:
    recent = RecentIds(size=2)
    assert not recent.seen("a")
    assert recent.seen("a")
    assert not recent.seen("b")
    assert not recent.seen("c")  # evicts "a", the least recently seen
    assert recent.seen("b")
    assert not recent.seen("a")


def _parses_or_value_error(raw: str | bytes) -> Message | None:
    try:
        msg = parse_frame(raw)
    except ValueError:
        return None
    if isinstance(msg, Transaction):
        for event in events_of(msg):  # making events of what parsed never raises either
            json.dumps(event.data)
    return msg


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.binary(max_size=300), st.text(max_size=300)))
def test_any_input_gives_a_message_or_value_error(raw: str | bytes) -> None:
    _parses_or_value_error(raw)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=20,
)
names = st.sampled_from(["msg_type", "errno", "data", "trx_id", "actions", "account", "name"])


@settings(max_examples=150, deadline=None)
@given(
    msg_type=st.sampled_from(["data", "heartbeat", "subscribe", "unsubscribe", "auth", "x"]),
    errno=st.one_of(st.just(0), json_values),
    data=st.one_of(
        json_values,
        st.fixed_dictionaries(
            {
                "trx_id": json_values | st.text(min_size=1, max_size=64),
                "block_num": json_values,
                "trx_timestamp": json_values | st.text(max_size=30),
                "actions": st.lists(
                    st.dictionaries(names, json_values)
                    | st.fixed_dictionaries(
                        {"account": st.text(max_size=12), "name": st.text(max_size=12)},
                        optional={"authorization": json_values, "data": json_values},
                    ),
                    max_size=3,
                ),
            }
        ),
    ),
)
def test_any_envelope_gives_a_message_or_value_error(msg_type: str, errno: Any, data: Any) -> None:
    frame = {"errno": errno, "msg_type": msg_type, "errmsg": "", "data": data}
    _parses_or_value_error(json.dumps(frame))
    _typed_path_agrees(json.dumps(frame))
    _live_path_agrees(json.dumps(frame))


def _live_path_agrees(raw: str) -> None:
    """The live loop's ``read_frame`` gives the events ``parse_frame`` gives (the same
    message, or its decoded ``PushData`` read the same by ``action_parts``)."""
    try:
        expected = parse_frame(raw)
    except ValueError:
        with pytest.raises(ValueError):
            read_frame(raw)
        return
    live = read_frame(raw)
    if type(live) is not PushData:
        assert live == expected
        return
    assert isinstance(expected, Transaction)
    ctx = RecordingContext("eos", "eospark")
    made = [transaction_events(trx, RecentIds(), ctx) for trx in (live, expected)]
    live_events, expected_events = (
        [(e.id, e.type, e.data, e.time, e.removed) for e in events] for events in made
    )
    assert live_events == expected_events


def _typed_path_agrees(raw: str) -> Transaction | None:
    """The typed path of data pushes gives what the checked path gives, or declines."""
    typed = _typed_push(raw)
    if typed is not None:
        assert typed == checked_frame(raw)
    return typed


def test_the_typed_path_reads_pushes_and_leaves_the_rest_to_the_checked_path() -> None:
    for name in ("data_seed.json", "data_multi_action.json"):
        assert _typed_path_agrees(fixture_text(name)) is not None
        _live_path_agrees(fixture_text(name))
    for name in ("heartbeat.json", "subscribe_ok.json", "auth_forbidden.json"):
        assert _typed_push(fixture_text(name)) is None
    frame = fixture_json("data_multi_action.json")
    frame["data"]["actions"][1]["global_action_seq"] = 3120730089
    frame["data"]["actions"][0]["data"] = {"big": 2**70, "n": [1.5, None, True, "x"]}
    del frame["data"]["actions"][2]["authorization"]
    assert _typed_path_agrees(json.dumps(frame)) is not None
    # Declined, and read by the checked path: tolerated variations, out-of-range integers.
    for change in (
        lambda f: f["data"].update(block_num="25477790"),
        lambda f: f.update(errno="0"),
        lambda f: f["data"].update(block_num=2**63),
        lambda f: f["data"].update(global_action_seq=-1),
        lambda f: f["data"]["actions"][0].update(authorization=[{"actor": 1}]),
    ):
        raw = _seed_with(change)
        assert _typed_push(raw) is None
        assert isinstance(parse_frame(raw), Transaction)
    # Declined, and refused by the checked path: what the types alone do not rule out.
    for change in (
        lambda f: f["data"]["actions"][0].update(name=""),
        lambda f: f["data"]["actions"][0].update(account=""),
        lambda f: f["data"].update(trx_id=""),
        lambda f: f["data"].update(trx_id="a" * 257),
        lambda f: f.update(errno=403),
        lambda f: f.update(msg_type="data2"),
    ):
        raw = _seed_with(change)
        assert _typed_push(raw) is None
        assert not isinstance(_parses_or_value_error(raw), Transaction)


u64_edges = st.sampled_from([0, 1, 2**63 - 1, 2**63, 2**64 - 1, 2**64, -1, 2**70])


@settings(max_examples=200, deadline=None)
@given(
    block_num=st.one_of(st.none(), u64_edges, json_values),
    trx_seq=st.one_of(st.none(), u64_edges, json_values),
    action_seq=st.one_of(st.none(), u64_edges, json_values),
    authorization=st.one_of(
        st.none(), json_values, st.lists(st.dictionaries(st.text(max_size=6), json_values))
    ),
    args=json_values,
    hex_data=st.one_of(st.text(max_size=8), json_values),
)
def test_typed_path_agrees_on_variations_of_a_real_push(
    block_num: Any, trx_seq: Any, action_seq: Any, authorization: Any, args: Any, hex_data: Any
) -> None:
    frame = fixture_json("data_seed.json")
    frame["data"].update(block_num=block_num, global_action_seq=trx_seq)
    frame["data"]["actions"][0].update(
        global_action_seq=action_seq, authorization=authorization, data=args, hex_data=hex_data
    )
    _typed_path_agrees(json.dumps(frame))


@given(st.text(max_size=80), st.integers(min_value=0, max_value=10_000))
def test_action_id_is_the_stable_id_of_the_transaction_and_index(trx_id: str, index: int) -> None:
    # action_id spells stable_id out for speed: it must never give another id.
    assert action_id(trx_id, index) == stable_id("eospark", trx_id, index)


def test_hostile_numbers_and_nesting_are_refused_or_read_never_raised_otherwise() -> None:
    def frame(block_num: object, args: object) -> str:
        trx = {
            "trx_id": "ab" * 32,
            "block_num": block_num,
            "actions": [{"account": "eosio.token", "name": "transfer", "data": args}],
        }
        return json.dumps({"msg_type": "data", "errno": 0, "data": trx})

    # A block number beyond 64 bits, written as a string: a bad frame, as the typed path says.
    with pytest.raises(ValueError, match="bad block_num"):
        parse_frame(frame("99999999999999999999", {}))
    assert isinstance(parse_frame(frame("9223372036854775807", {})), Transaction)
    # Args nested a thousand deep (msgspec gives up with RecursionError): read, not raised.
    deep = frame(7, {"deep": "HERE"}).replace('"HERE"', "[" * 1000 + "1" + "]" * 1000)
    assert isinstance(parse_frame(deep), Transaction)


class Sifting(RecordingContext):
    """A context whose rules watch transfers to ``wanted`` only (the daemon's ``sift``)."""

    def __init__(self, wanted: str) -> None:
        super().__init__("eos", "eospark")
        self.wanted = wanted
        self.sifted: list[str] = []

    def sift(self, type: str, data: dict[str, Any]) -> bool:
        if data["args"]["to"] == self.wanted:
            return True
        self.sifted.append(data["args"]["to"])
        return False


def test_actions_no_rule_can_fire_on_are_sifted_before_their_id_and_duplicate_check() -> None:
    from tocsin_eospark.emulator import transaction, transfer

    trx = parse_frame(
        json.dumps(
            {
                "errno": 0,
                "msg_type": "data",
                "data": transaction(
                    [
                        transfer("alice", "bob", "1.0000 EOS"),
                        transfer("alice", "me", "2.0000 EOS"),
                        transfer("alice", "carol", "3.0000 EOS"),
                        transfer("alice", "me", "4.0000 EOS"),
                    ]
                ),
            }
        )
    )
    assert isinstance(trx, Transaction)
    recent, ctx = RecentIds(), Sifting("me")
    events = transaction_events(trx, recent, ctx)
    # The two to "me", with the ids and order they have unsifted.
    assert [e.id for e in events] == [action_id(trx.trx_id, 1), action_id(trx.trx_id, 3)]
    assert [e.data["action_index"] for e in events] == [1, 3]
    assert ctx.sifted == ["bob", "carol"]
    assert len(recent) == 2  # the duplicate check remembers only what went on
    assert transaction_events(trx, recent, ctx) == []  # a re-push: dropped as before
