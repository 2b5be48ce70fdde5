"""protocol.py without sockets: the seed's frames, normalization, stable ids, fuzzing."""

from __future__ import annotations

import contextlib
import json
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tocsin_vite.protocol import (
    ACCOUNT,
    ACCOUNT_BY_ADDRESS,
    SNAPSHOT,
    TOPICS,
    UNRECEIVED,
    VMLOG,
    Notification,
    Response,
    RpcError,
    filter_param,
    latest_height,
    make_address,
    new_id,
    normalize,
    normalize_items,
    parse_frame,
    poll_changes,
    request,
    topic_hash,
    unreceived_id,
    vite_address,
    vmlog_id,
)

from .conftest import fixture_json, fixture_text

SEED_CONTRACT = "vite_f48f811a1800d9bde268e3d2eacdc4b4f8b9110e017bd7a76f"
SEED_USER = "vite_ab24ef68b84e642c0ddca06beec81c9acb1977bbd7da27a87a"


def only(frame: str) -> Any:
    (msg,) = parse_frame(frame)
    return msg


def test_the_seed_push_of_a_vmlog() -> None:
    note = only(fixture_text("vmlog_notification.json"))
    assert isinstance(note, Notification)
    assert note.subscription == "0x4b97e0674a5ebef942dbb07709c4a608"
    (fact,) = normalize_items(VMLOG, note.result)[0]
    raw = fixture_json("vmlog_notification.json")["params"]["result"][0]
    assert fact.type == "vmlog" and not fact.removed
    assert fact.data == {
        "address": SEED_CONTRACT,
        "account_block_hash": raw["accountBlockHash"],
        "account_block_height": 10,
        "topics": raw["vmlog"]["topics"],
        "log_data": "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAo=",
    }
    assert fact.height == 10 and fact.address == SEED_CONTRACT
    assert fact.id == vmlog_id(
        raw["accountBlockHash"], raw["vmlog"]["topics"], raw["vmlog"]["data"]
    )


def test_the_seed_subscribe_answer_and_the_request_we_send() -> None:
    answer = only(fixture_text("subscribe_response.json"))
    assert answer == Response(1, "0x4b97e0674a5ebef942dbb07709c4a608", None)
    seed = fixture_json("subscribe_vmlog_request.json")
    ours = orjson.loads(
        request(
            1,
            "subscribe_subscribe",
            ["createVmlogSubscription", filter_param({SEED_CONTRACT: (0, 0)})],
        )
    )
    assert ours == seed
    seed_filter = fixture_json("create_vmlog_filter_request.json")
    assert seed_filter["method"] in VMLOG.filters  # the seed's spelling is a fallback we try
    assert VMLOG.filters[0] == "subscribe_newVmLogFilter"
    assert "createVmlogSubscription" in VMLOG.push


@pytest.mark.parametrize(
    ("name", "topic", "address", "expected"),
    [
        (
            "poll_snapshot.json",
            SNAPSHOT,
            None,
            [{"height": 124}, {"height": 125}, {"height": 126}],
        ),
        ("poll_account.json", ACCOUNT, None, [{}, {}]),
        (
            "poll_account_by_address.json",
            ACCOUNT_BY_ADDRESS,
            SEED_USER,
            [{"height": 15, "address": SEED_USER}],
        ),
        (
            "poll_unreceived.json",
            UNRECEIVED,
            SEED_USER,
            [
                {"received": False, "address": SEED_USER},
                {"received": True, "address": SEED_USER},
                {"received": False, "address": SEED_USER},
            ],
        ),
    ],
)
def test_the_seed_poll_answers(
    name: str, topic: Any, address: str | None, expected: list[dict[str, Any]]
) -> None:
    answer = only(fixture_text(name))
    assert isinstance(answer, Response) and answer.error is None
    raw = poll_changes(answer.result)
    facts, rejects = normalize_items(topic, raw, address)
    assert rejects == []
    assert [{k: v for k, v in f.data.items() if k != "hash"} for f in facts] == expected
    assert [f.data["hash"] for f in facts] == [item["hash"] for item in raw]
    assert all(f.type == topic.event_type for f in facts)


def test_unreceived_new_received_and_rollback_are_two_facts() -> None:
    raw = poll_changes(only(fixture_text("poll_unreceived.json")).result)
    new, received, rolled_back = normalize_items(UNRECEIVED, raw, SEED_USER)[0]
    block = raw[0]["hash"]
    assert new.id == unreceived_id(block, False) != received.id == unreceived_id(block, True)
    # The rollback retracts the "new" fact: same id, same data, removed.
    assert rolled_back.removed and rolled_back.id == new.id and rolled_back.data == new.data


def test_a_removal_carries_the_id_and_data_of_its_fact() -> None:
    frame = fixture_json("vmlog_notification.json")
    item = frame["params"]["result"][0]
    added = normalize(VMLOG, item)
    removed = normalize(VMLOG, {**item, "removed": True})
    assert removed.removed and not added.removed
    assert (removed.id, removed.data) == (added.id, added.data)


def test_the_same_fact_has_one_id_whichever_way_it_comes() -> None:
    pushed = normalize_items(SNAPSHOT, only(fixture_text("snapshot_notification.json")).result)[0][
        0
    ]
    polled_v1 = normalize_items(
        SNAPSHOT, only(fixture_text("snapshot_v1_notification.json")).result
    )[0][0]
    ledger = normalize(
        SNAPSHOT,
        {"hash": pushed.data["hash"], "height": 250, "timestamp": 1_700_000_000, "producer": "x"},
    )
    assert pushed.id == polled_v1.id == ledger.id
    assert (
        pushed.data == polled_v1.data == ledger.data == {"hash": pushed.data["hash"], "height": 250}
    )
    assert ledger.time == "2023-11-14T22:13:20.000Z" and pushed.time == ""
    # An account block is its hash, from the all-accounts topic or the by-address one.
    block = "20009ee78d5f77122d215c3021f839b4024e4f2701e57bdb574e0cae1ae44e6c"
    assert (
        normalize(ACCOUNT, {"hash": block}).id
        == normalize(ACCOUNT_BY_ADDRESS, {"hash": block, "height": "1"}, SEED_USER).id
    )


def test_legacy_v1_and_old_ledger_vmlog_fields() -> None:
    v1 = normalize_items(VMLOG, only(fixture_text("logs_v1_notification.json")).result)[0][0]
    assert v1.data["account_block_height"] == 10 and v1.data["address"] == SEED_CONTRACT
    old_ledger = {
        "vmLog": {"topics": v1.data["topics"], "data": v1.data["log_data"]},
        "accountBlockHash": v1.data["account_block_hash"],
        "accountHeight": "10",
        "address": SEED_CONTRACT,
    }
    assert normalize(VMLOG, old_ledger).id == v1.id
    unreceived_v1 = normalize(
        UNRECEIVED, {"hash": "ab" * 32, "closed": True, "removed": False}, SEED_USER
    )
    assert unreceived_v1.data["received"] is True


def test_identical_logs_in_one_block_get_distinct_ids() -> None:
    item = fixture_json("vmlog_notification.json")["params"]["result"][0]
    other = {**item, "vmlog": {"topics": item["vmlog"]["topics"], "data": None}}
    facts, _ = normalize_items(VMLOG, [item, item, other, item])
    assert len({f.id for f in facts}) == 4
    assert facts[2].data["log_data"] == ""  # Go's nil []byte
    again, _ = normalize_items(VMLOG, [item, item, other, item])
    assert [f.id for f in facts] == [f.id for f in again]  # and stably so
    # A removal batch numbers its own duplicates the same way.
    removed, _ = normalize_items(VMLOG, [{**item, "removed": True}] * 2)
    assert [f.id for f in removed] == [facts[0].id, facts[1].id]


def test_errors_and_batches() -> None:
    missing = only(fixture_text("error_method_missing.json"))
    assert missing.error == RpcError(
        -32601, "The method subscribe_createVmlogFilter does not exist/is not available"
    )
    assert missing.error.method_missing and not missing.error.filter_missing
    gone = only(fixture_text("error_filter_not_found.json")).error
    assert gone.filter_missing and not gone.method_missing
    nil = only(fixture_text("error_address_range_nil.json")).error
    assert not nil.method_missing and not nil.filter_missing
    assert str(nil) == "addressHeightRange is nil (-32002)"
    first, second = parse_frame(fixture_text("batch_response.json"))
    assert first == Response(1, "0x7a", None)
    assert isinstance(second, Response) and second.error is not None
    assert RpcError(-32000, "method not found").method_missing  # another server's wording
    assert parse_frame('{"jsonrpc":"2.0","id":"7","error":{"code":"-32601","message":"x"}}') == [
        Response("7", None, RpcError(-32601, "x"))
    ]


def test_null_is_an_empty_list() -> None:
    assert poll_changes(only(fixture_text("poll_account_null.json")).result) == []
    assert poll_changes(None) == [] and poll_changes([{"hash": "ab"}]) == [{"hash": "ab"}]
    note = only('{"method":"subscribe_subscription","params":{"subscription":"0x1","result":null}}')
    assert note == Notification("0x1", [])
    assert latest_height(None) == 0
    assert latest_height({"height": 7}) == latest_height({"height": "7"}) == latest_height("7") == 7


@pytest.mark.parametrize(
    ("frame", "reason"),
    [
        ("nope", "not JSON"),
        ("[]", "empty batch"),
        ("3", "not a JSON object"),
        ('{"jsonrpc":"2.0"}', "neither a response nor a notification"),
        ('{"method":"subscribe_subscription","params":{"result":[]}}', "without a subscription id"),
        (
            '{"method":"subscribe_subscription","params":{"subscription":"0x1","result":5}}',
            "malformed notification",
        ),
        ('{"id":true,"result":1}', "bad response id"),
        ('{"id":1,"error":"boom"}', "malformed error"),
    ],
)
def test_malformed_frames(frame: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        parse_frame(frame)


@pytest.mark.parametrize(
    ("topic", "item", "reason"),
    [
        (SNAPSHOT, {"hash": "ab"}, "without a height"),
        (SNAPSHOT, {"hash": "zz", "height": 1}, "bad hash"),
        (SNAPSHOT, {"hash": "ab", "height": "-1"}, "bad height"),
        (SNAPSHOT, {"hash": "ab", "height": 1, "removed": "yes"}, "bad removed flag"),
        (ACCOUNT_BY_ADDRESS, {"hash": "ab"}, "without a height"),
        (VMLOG, {"accountBlockHash": "ab"}, "without a log"),
        (VMLOG, {"vmlog": {"topics": [1]}, "accountBlockHash": "ab"}, "no topic"),
        (
            VMLOG,
            {"vmlog": {}, "accountBlockHash": "ab", "accountBlockHeight": 1, "address": "x"},
            "Vite address",
        ),
        (UNRECEIVED, [], "not an object"),
    ],
)
def test_malformed_items(topic: Any, item: Any, reason: str) -> None:
    _, rejects = normalize_items(
        topic, [item, {"hash": "cd", "height": 2}] if topic is SNAPSHOT else [item]
    )
    assert rejects and reason in rejects[0]


def test_addresses_topics_and_ids() -> None:
    assert vite_address(SEED_CONTRACT.upper().replace("VITE_", "vite_")) == SEED_CONTRACT
    contract = make_address("x", contract=True)
    assert vite_address(contract) == contract and vite_address(make_address("x")) != contract
    with pytest.raises(ValueError, match="checksum does not match"):
        vite_address(SEED_CONTRACT[:-1] + "0")
    with pytest.raises(ValueError, match="50 hex characters"):
        vite_address("vite_1234")
    assert topic_hash("AA" * 32) == "aa" * 32
    with pytest.raises(ValueError, match="64 hex"):
        topic_hash("0x" + "aa" * 32)
    ids = {new_id() for _ in range(200)}
    assert len(ids) == 200 and all(i.startswith("0x") and not i.startswith("0x0") for i in ids)
    assert set(TOPICS) == {
        "snapshot_block",
        "account_block",
        "account_block_by_address",
        "unreceived_block",
        "vmlog",
    }


def test_filter_param() -> None:
    assert filter_param({SEED_CONTRACT: (3, 9)}, [["aa" * 32], []]) == {
        "addressHeightRange": {SEED_CONTRACT: {"fromHeight": "3", "toHeight": "9"}},
        "topics": [["aa" * 32], []],
    }
    assert "topics" not in filter_param({SEED_CONTRACT: (0, 0)})


# -- fuzzing ---------------------------------------------------------------------------


def _parses_or_value_error(raw: str | bytes) -> None:
    try:
        messages = parse_frame(raw)
    except ValueError:
        return
    for msg in messages:
        if isinstance(msg, Notification):
            for topic in TOPICS.values():
                facts, _ = normalize_items(topic, msg.result, SEED_USER)
                for fact in facts:
                    json.dumps(fact.data)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.binary(max_size=300), st.text(max_size=300)))
def test_any_bytes_give_messages_or_value_error(raw: str | bytes) -> None:
    _parses_or_value_error(raw)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=20,
)
keys = st.sampled_from(
    [
        "hash",
        "height",
        "heightStr",
        "removed",
        "received",
        "closed",
        "vmlog",
        "log",
        "topics",
        "data",
        "accountBlockHash",
        "accountBlockHeight",
        "accountHeight",
        "address",
        "addr",
    ]
)
items = st.dictionaries(keys, json_values | st.sampled_from(["ab" * 32, "12", SEED_CONTRACT]))


@settings(max_examples=200, deadline=None)
@given(
    subscription=json_values | st.text(max_size=40),
    result=st.lists(items, max_size=4) | json_values,
)
def test_any_notification_gives_facts_or_rejects(subscription: Any, result: Any) -> None:
    frame = {
        "jsonrpc": "2.0",
        "method": "subscribe_subscription",
        "params": {"subscription": subscription, "result": result},
    }
    _parses_or_value_error(json.dumps(frame))


@settings(max_examples=100, deadline=None)
@given(st.lists(items, max_size=4) | json_values)
def test_any_ledger_or_poll_answer_gives_facts_or_value_error(result: Any) -> None:
    try:
        listed = poll_changes(result)
    except ValueError:
        return
    for topic in TOPICS.values():
        normalize_items(topic, listed, SEED_USER)
    with contextlib.suppress(ValueError):
        latest_height(result)


async def test_pushes_held_during_a_call_are_bounded_in_bytes_too() -> None:
    from tocsin_vite.rpc import MAX_PENDING_BYTES, RpcConnection

    from tocsin import SourceError

    conn = RpcConnection(
        None,  # type: ignore[arg-type]  # no socket: frames are fed by hand
        timeout=1.0,
        reject=lambda reason: None,
        on_frame=lambda: None,
        received=lambda raw: None,
    )
    memo = "x" * (4 * 1024 * 1024)
    big = (
        '{"jsonrpc":"2.0","method":"subscribe_subscription","params":{"subscription":"0x1",'
        f'"result":[{{"hash":"{memo}"}}]}}}}'
    )
    held = 0
    with pytest.raises(SourceError, match="too many pushes held"):
        while True:
            conn._messages(big)
            held += 1
    assert held * len(big) > MAX_PENDING_BYTES >= (held - 1) * len(big)
    assert len(conn.pending) == held  # a handful of 4 MiB frames, not 10,000
    await conn.next_notification(0)
    assert conn.pending_bytes == (held - 1) * len(big)
    conn.clear_pending()
    assert conn.pending_bytes == 0 and not conn.pending
