"""The emulator over real sockets with a bare websockets client: PROTOCOLS.md section 4,
emulator scenarios 1-8, strict where eWallet is strict."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import pytest
from tocsin_ewallet.emulator import (
    DEMO_API_KEY,
    DEMO_AUTH_TOKEN,
    DEMO_USER,
    EWalletEmulator,
)
from tocsin_ewallet.ledger import Party
from tocsin_ewallet.protocol import ACCEPT, authorization
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from .ewallet_helpers import CLIENT_AUTH, PROVIDER_AUTH, REQUEST_TOPIC

FRAME_KEYS = {"success", "version", "data", "error", "topic", "event", "ref"}
USER_TOPIC = f"user:{DEMO_USER}"


@asynccontextmanager
async def client(
    url: str, headers: dict[str, str] | None = None
) -> AsyncIterator[ClientConnection]:
    given = {"Authorization": CLIENT_AUTH, "Accept": ACCEPT} if headers is None else headers
    async with connect(url, additional_headers=given, open_timeout=5) as ws:
        yield ws


async def recv(ws: ClientConnection) -> dict[str, Any]:
    with anyio.fail_after(5):
        frame = json.loads(await ws.recv())
    assert isinstance(frame, dict) and set(frame) == FRAME_KEYS, frame
    return frame


async def send(ws: ClientConnection, topic: str, event: str, ref: Any, **data: Any) -> None:
    await ws.send(json.dumps({"topic": topic, "event": event, "ref": ref, "data": data}))


async def join(ws: ClientConnection, topic: str, ref: Any = "1") -> dict[str, Any]:
    await send(ws, topic, "phx_join", ref)
    return await recv(ws)


async def refused(url: str, headers: dict[str, str]) -> int:
    with pytest.raises(InvalidStatus) as caught:
        async with connect(url, additional_headers=headers, open_timeout=5):
            pass
    response = caught.value.response
    assert response.body == b""  # eWallet answers 403 with an empty body
    return response.status_code


# -- scenario 1: the upgrade -----------------------------------------------------------


async def test_exact_accept_and_the_client_scheme_are_required(emulator: EWalletEmulator) -> None:
    async with client(emulator.url) as ws:
        assert (await join(ws, REQUEST_TOPIC))["success"] is True
    basic = authorization("Basic", DEMO_API_KEY, DEMO_AUTH_TOKEN)
    async with client(emulator.url, {"Authorization": basic, "Accept": ACCEPT}):
        pass
    for headers in (
        {"Authorization": CLIENT_AUTH},
        {"Authorization": CLIENT_AUTH, "Accept": "application/json"},
        {"Authorization": CLIENT_AUTH, "Accept": ACCEPT + "; charset=utf-8"},
        {"Authorization": CLIENT_AUTH, "Accept": "application/vnd.omisego.v2+json"},
        {"Accept": ACCEPT},
        {"Authorization": authorization("OMGClient", DEMO_API_KEY, "wrong"), "Accept": ACCEPT},
        {"Authorization": "OMGClient not-base64!", "Accept": ACCEPT},
        # The seed says OMGProvider works on the client socket; the code says 403.
        {"Authorization": PROVIDER_AUTH, "Accept": ACCEPT},
    ):
        assert await refused(emulator.url, headers) == 403
    assert emulator.connections == 2
    assert emulator.refused == 8
    assert [h.accepted for h in emulator.handshakes] == [True, True] + [False] * 8


async def test_admin_socket_takes_the_provider_scheme_only(emulator: EWalletEmulator) -> None:
    async with client(emulator.admin_url, {"Authorization": PROVIDER_AUTH, "Accept": ACCEPT}) as ws:
        assert (await join(ws, USER_TOPIC))["success"] is True
    assert (
        await refused(emulator.admin_url, {"Authorization": CLIENT_AUTH, "Accept": ACCEPT}) == 403
    )


async def test_query_string_headers_replace_the_real_ones(emulator: EWalletEmulator) -> None:
    from urllib.parse import quote

    query = (
        f"?headers[Authorization]={quote(CLIENT_AUTH)}&headers[Accept]={quote(ACCEPT)}&vsn=1.0.0"
    )
    async with client(emulator.url + query, {}) as ws:
        assert (await join(ws, REQUEST_TOPIC))["success"] is True
    # With a query headers map present, good real headers do not help.
    bad = f"?headers[Authorization]={quote(CLIENT_AUTH)}"
    assert (
        await refused(emulator.url + bad, {"Authorization": CLIENT_AUTH, "Accept": ACCEPT}) == 403
    )


async def test_other_paths_are_not_routed(emulator: EWalletEmulator) -> None:
    # Stock phoenix.js appends /websocket, which misses eWallet's route.
    assert (
        await refused(emulator.url + "/websocket", {"Authorization": CLIENT_AUTH, "Accept": ACCEPT})
        == 404
    )


# -- scenarios 2 and 3: join refusals --------------------------------------------------


@pytest.mark.parametrize(
    ("topic", "code", "description"),
    [
        (
            "user:usr_someone_else",
            "websocket:forbidden_channel",
            "You don't have access to this channel.",
        ),
        (
            "transaction_request:txr_unknown",
            "websocket:forbidden_channel",
            "You don't have access to this channel.",
        ),
        ("foo:bar", "websocket:connect_error", "unmatched topic"),
        ("transaction_request:", "client:invalid_parameter", "Invalid parameter provided."),
        ("account:acc_1", "websocket:connect_error", "join crashed"),
    ],
)
async def test_join_refusals(
    emulator: EWalletEmulator, topic: str, code: str, description: str
) -> None:
    async with client(emulator.url) as ws:
        reply = await join(ws, topic, ref=9)
        assert reply["event"] == "phx_reply" and reply["topic"] == topic and reply["ref"] == 9
        assert reply["success"] is False and reply["data"] is None
        assert reply["error"] == {
            "object": "error",
            "code": code,
            "description": description,
            "messages": None,
        }
        # The socket stays open: a good join still works.
        assert (await join(ws, REQUEST_TOPIC, ref=10))["success"] is True


async def test_forbid_control(emulator: EWalletEmulator) -> None:
    emulator.forbid(REQUEST_TOPIC)
    async with client(emulator.url) as ws:
        assert (await join(ws, REQUEST_TOPIC))["error"]["code"] == "websocket:forbidden_channel"


# -- scenario 4: heartbeat and idle timeout --------------------------------------------


async def test_heartbeat_reply_echoes_the_ref_type(emulator: EWalletEmulator) -> None:
    async with client(emulator.url) as ws:
        await send(ws, "phoenix", "heartbeat", "4")
        assert await recv(ws) == {
            "success": True,
            "version": "1",
            "data": None,
            "error": None,
            "topic": "phoenix",
            "event": "phx_reply",
            "ref": "4",
        }
        await send(ws, "phoenix", "heartbeat", 5)
        assert (await recv(ws))["ref"] == 5
        emulator.answer_heartbeats = False
        await send(ws, "phoenix", "heartbeat", "6")
        await send(ws, "nowhere:1", "ping", "7")  # a marker that does get an answer
        marker = await recv(ws)
        assert marker["ref"] == "7" and marker["error"]["description"] == "unmatched topic"
    assert [f.json()["ref"] for f in emulator.received] == ["4", 5, "6", "7"]


async def test_idle_socket_is_closed() -> None:
    async with EWalletEmulator(idle_timeout=0.3) as emulator:
        before = anyio.current_time()  # before the server accepts: its idle timer starts later
        async with client(emulator.url) as ws:
            with anyio.fail_after(5), pytest.raises(ConnectionClosed):
                await ws.recv()
        # Taken after the connection opened, the client's clock ran 0.2992 s once in CI.
        assert anyio.current_time() - before >= 0.3 - 0.01  # timers may fire a tick early
        assert emulator.idle_closes == 1


# -- scenarios 5 and 6: broadcasts -----------------------------------------------------


async def test_one_broadcast_reaches_every_joined_topic_with_ref_null(
    emulator: EWalletEmulator,
) -> None:
    async with client(emulator.url) as ws:
        await join(ws, REQUEST_TOPIC, "1")
        await join(ws, USER_TOPIC, "2")
        consumption = await emulator.request_consumption(amount=250)
        first, second = await recv(ws), await recv(ws)
    assert {first["topic"], second["topic"]} == {REQUEST_TOPIC, USER_TOPIC}
    for frame in (first, second):
        assert frame["event"] == "transaction_consumption_request"
        assert frame["ref"] is None and frame["success"] is True and frame["error"] is None
        assert frame["data"] == consumption
    assert consumption["status"] == "pending" and consumption["amount"] == 250


async def test_finalized_goes_to_the_consumption_and_both_parties(
    emulator: EWalletEmulator,
) -> None:
    consumer = emulator.add_user("usr_consumer1", "addr-consumer-1")
    consumption = await emulator.request_consumption(consumer=consumer)
    cid = consumption["id"]
    assert emulator.finalized_topics(cid) == [
        REQUEST_TOPIC,
        "address:5555cer3-15d1-4463-9ec2-02bc8ded7120",
        USER_TOPIC,
        f"transaction_consumption:{cid}",
        "address:addr-consumer-1",
        "user:usr_consumer1",
    ]
    emulator.add_client("consumer-key", "consumer-token", "usr_consumer1")
    auth = authorization("OMGClient", "consumer-key", "consumer-token")
    async with client(emulator.url, {"Authorization": auth, "Accept": ACCEPT}) as ws:
        assert (await join(ws, f"transaction_consumption:{cid}"))["success"] is True
        assert (await join(ws, REQUEST_TOPIC))["success"] is False  # not the consumer's request
        assert await emulator.finalize(cid) == 1
        frame = await recv(ws)
    assert frame["event"] == "transaction_consumption_finalized"
    assert frame["data"]["status"] == "confirmed" and frame["data"]["transaction_id"]


@pytest.mark.parametrize(
    ("status", "code"),
    [
        ("failed", "transaction:insufficient_funds"),
        ("expired", "transaction_consumption:expired"),
        ("pending", "transaction_consumption:unfinalized"),
    ],
)
async def test_failed_finalize(emulator: EWalletEmulator, status: str, code: str) -> None:
    async with client(emulator.url) as ws:
        await join(ws, REQUEST_TOPIC)
        consumption = await emulator.request_consumption()
        await recv(ws)
        await emulator.fail_finalize(consumption["id"], status=status)
        frame = await recv(ws)
    assert frame["success"] is False and frame["ref"] is None
    assert frame["data"]["id"] == consumption["id"] and frame["data"]["status"] == status
    assert frame["error"]["code"] == code


async def test_seed_broadcast_ref_switch() -> None:
    async with EWalletEmulator(seed_broadcast_ref=True) as emulator, client(emulator.url) as ws:
        await join(ws, REQUEST_TOPIC)
        await emulator.request_consumption()
        assert (await recv(ws))["ref"] == "1"


# -- scenario 7: leave, and channel closes ---------------------------------------------


async def test_leave_replies_then_closes_the_channel(emulator: EWalletEmulator) -> None:
    async with client(emulator.url) as ws:
        await join(ws, REQUEST_TOPIC, "1")
        await send(ws, REQUEST_TOPIC, "phx_leave", "2")
        reply, close = await recv(ws), await recv(ws)
        assert (reply["event"], reply["ref"], reply["success"]) == ("phx_reply", "2", True)
        assert (close["event"], close["ref"], close["success"]) == ("phx_close", "1", False)
        assert close["data"] is None and close["error"] is None
        assert emulator.joined(REQUEST_TOPIC) == 0
        assert await emulator.broadcast([REQUEST_TOPIC], "x", {}) == 0
        await send(ws, REQUEST_TOPIC, "phx_leave", "3")  # not joined any more
        assert (await recv(ws))["error"]["description"] == "unmatched topic"


async def test_duplicate_join_closes_the_old_channel_and_crash_sends_phx_error(
    emulator: EWalletEmulator,
) -> None:
    async with client(emulator.url) as ws:
        await join(ws, REQUEST_TOPIC, "1")
        await send(ws, REQUEST_TOPIC, "phx_join", "2")
        close, reply = await recv(ws), await recv(ws)
        assert (close["event"], close["ref"]) == ("phx_close", "1")
        assert (reply["event"], reply["ref"], reply["success"]) == ("phx_reply", "2", True)
        await emulator.crash_channel(REQUEST_TOPIC)
        error = await recv(ws)
        assert (error["event"], error["ref"], error["success"]) == ("phx_error", "2", False)
        assert emulator.joined(REQUEST_TOPIC) == 0


# -- scenario 8: frames the serializer cannot decode -----------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        '["1","1","transaction_request:x","phx_join",{}]',  # Phoenix V2 array frame
        '{"topic":"phoenix","event":"heartbeat","data":{}}',  # no ref
        "not json",
        b'{"topic":"phoenix","event":"heartbeat","ref":"1","data":{}}',  # binary
    ],
)
async def test_undecodable_frames_close_the_socket(
    emulator: EWalletEmulator, raw: str | bytes
) -> None:
    async with client(emulator.url) as ws:
        await ws.send(raw)
        with anyio.fail_after(5), pytest.raises(ConnectionClosed):
            await ws.recv()
    assert emulator.received[-1].raw == raw


async def test_payload_is_ignored_and_data_is_read(emulator: EWalletEmulator) -> None:
    async with client(emulator.url) as ws:
        await ws.send(
            json.dumps({"topic": REQUEST_TOPIC, "event": "phx_join", "ref": "1", "payload": {}})
        )
        assert (await recv(ws))["success"] is True


# -- control methods -------------------------------------------------------------------


async def test_drop_count_record_and_raw_push(emulator: EWalletEmulator) -> None:
    async with client(emulator.url) as ws:
        await join(ws, REQUEST_TOPIC)
        await emulator.push_raw("garbage")
        with anyio.fail_after(5):
            assert await ws.recv() == "garbage"
        await emulator.drop_connections()
        with anyio.fail_after(5), pytest.raises(ConnectionClosed) as caught:
            await ws.recv()
        assert caught.value.rcvd is not None and caught.value.rcvd.code == 1011
    assert emulator.connections == 1
    assert emulator.frames("phx_join") == [
        {"topic": REQUEST_TOPIC, "event": "phx_join", "ref": "1", "data": {}}
    ]


async def test_demo_source_and_traffic(emulator: EWalletEmulator) -> None:
    table = emulator.demo_source()
    assert table["plugin"] == "ewallet" and table["url"] == emulator.url
    auth = authorization("OMGClient", table["api_key"], table["auth_token"])
    async with anyio.create_task_group() as tg:
        tg.start_soon(emulator.demo_traffic)
        async with client(emulator.url, {"Authorization": auth, "Accept": ACCEPT}) as ws:
            for n, topic in enumerate(table["channels"]):
                assert (await join(ws, topic, str(n)))["success"] is True
            joined = anyio.current_time()
            seen: list[dict[str, Any]] = []
            while not any(f["event"] == "transaction_consumption_finalized" for f in seen):
                seen.append(await recv(ws))
            # The demo rule's first alert comes well within 3 s of subscribing.
            assert anyio.current_time() - joined < 3
        tg.cancel_scope.cancel()
    finalized = next(f for f in seen if f["event"] == "transaction_consumption_finalized")
    assert finalized["data"]["status"] == "confirmed" and finalized["success"] is True
    assert {f["topic"] for f in seen} == set(table["channels"])


def test_party_topics() -> None:
    assert Party("a1", "u1", "acc1").topics() == ["address:a1", "user:u1", "account:acc1"]
    assert Party("a2").topics() == ["address:a2"]
