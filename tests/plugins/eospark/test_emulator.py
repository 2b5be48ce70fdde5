"""The emulator against plain WebSocket clients: PROTOCOLS.md section 1 scenarios 1-9."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import pytest
from tocsin_eospark import EOSParkEmulator
from tocsin_eospark.emulator import DEMO_KEY, name_to_u64, transaction, transfer, transfer_hex
from tocsin_eospark.protocol import legacy_message, subscribe_message, unsubscribe_message
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from support import wait_for

from .conftest import HEARTBEAT, KEY, ME, fixture_json


@asynccontextmanager
async def client(url: str, key: str | None = KEY, query: bool = False) -> AsyncIterator[Any]:
    headers = {"apikey": key} if key is not None and not query else {}
    target = f"{url}?apikey={key}" if query else url
    async with connect(target, additional_headers=headers) as ws:
        yield ws


async def next_frame(ws: ClientConnection, kind: str | None = None, within: float = 3) -> Any:
    """The next frame (of ``msg_type`` ``kind``, skipping heartbeats otherwise)."""
    with anyio.fail_after(within):
        while True:
            frame = json.loads(await ws.recv())
            if (kind is None and frame["msg_type"] != "heartbeat") or frame["msg_type"] == kind:
                return frame


async def subscribe(
    ws: ClientConnection, accounts: list[str], contracts: list[str], action: str = ""
) -> Any:
    await ws.send(subscribe_message(accounts, contracts, action))
    return await next_frame(ws, "subscribe")


def trx_of(*actions: dict[str, Any]) -> dict[str, Any]:
    return transaction(actions)


async def test_hex_data_matches_the_seed() -> None:
    raw = fixture_json("data_seed.json")["data"]["actions"][0]
    args = raw["data"]
    assert transfer_hex(args["from"], args["to"], args["quantity"], args["memo"]) == raw["hex_data"]
    assert name_to_u64("eosio") == 0x5530EA0000000000


@pytest.mark.parametrize("query", [False, True], ids=["header", "query"])
async def test_1_key_in_header_or_query_and_heartbeats(
    emulator: EOSParkEmulator, query: bool, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="websockets.server")
    async with client(emulator.url, query=query) as ws:
        beat = await next_frame(ws, "heartbeat", within=5)  # a bound, generous under load
    # The emulator's own logs show no key either (this test's plain client would).
    server_log = "\n".join(r.getMessage() for r in caplog.records if r.name == "websockets.server")
    assert "apikey" in server_log and KEY not in server_log
    assert beat["errno"] == 0 and beat["errmsg"] == ""
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", beat["data"]["heart_beat"])
    assert emulator.accepted == 1


async def test_1_heartbeat_every_10s_by_default() -> None:
    assert EOSParkEmulator().heartbeat_interval == 10.0


@pytest.mark.parametrize("key", ["wrong", None])
async def test_2_bad_key_gets_403_and_a_close(emulator: EOSParkEmulator, key: str | None) -> None:
    async with client(emulator.url, key=key) as ws:
        assert await next_frame(ws) == {"errno": 403, "msg_type": "auth", "errmsg": "Forbidden"}
        with anyio.fail_after(3), pytest.raises(ConnectionClosed):
            await ws.recv()
    assert emulator.refused[403] == 1 and emulator.accepted == 0


async def test_2_http_refusal_mode() -> None:
    async with EOSParkEmulator(api_keys=[KEY], auth_refusal="http") as emu:
        with pytest.raises(InvalidStatus) as refused:
            async with client(emu.url, key="wrong"):
                pass
        assert refused.value.response.status_code == 403
        assert json.loads(refused.value.response.body)["errno"] == 403
        async with client(emu.url) as ws:  # a good key still connects
            assert (await subscribe(ws, [ME], ["eosio.token"]))["data"]["subscribe"] is True


async def test_2_unknown_path_is_404(emulator: EOSParkEmulator) -> None:
    with pytest.raises(InvalidStatus) as refused:
        async with client(emulator.url.replace("/v1/ws", "/v2/ws")):
            pass
    assert refused.value.response.status_code == 404


async def test_3_one_connection_per_key(emulator: EOSParkEmulator) -> None:
    async with client(emulator.url) as first:
        await subscribe(first, [ME], ["eosio.token"])
        async with client(emulator.url) as second:
            assert await next_frame(second) == {
                "errno": 406,
                "msg_type": "auth",
                "errmsg": "No repeat connection.",
            }
            with anyio.fail_after(3), pytest.raises(ConnectionClosed):
                await second.recv()
        # the first connection is unaffected
        await next_frame(first, "heartbeat")
        await emulator.push_transaction(trx_of(transfer("alice", ME, "1.0000 EOS")))
        assert (await next_frame(first, "data"))["data"]["actions"][0]["data"]["from"] == "alice"
    # once the first is gone, the key connects again
    await wait_for(lambda: not emulator.clients, what="the first connection to be reaped")
    async with client(emulator.url) as third:
        assert (await subscribe(third, [ME], ["eosio.token"]))["data"]["subscribe"] is True
    assert emulator.refused[406] == 1 and emulator.accepted == 2


async def test_4_at_most_5_accounts_and_5_contracts(emulator: EOSParkEmulator) -> None:
    six = [f"acct{c}" for c in "12345a"]
    async with client(emulator.url) as ws:
        refused = await subscribe(ws, six, ["eosio.token"])
        assert refused["data"]["subscribe"] is False
        assert "5 accounts" in refused["data"]["msg"]
        assert (await subscribe(ws, [ME], [f"c{c}" for c in "12345a"]))["data"][
            "subscribe"
        ] is False
        assert (await subscribe(ws, six[:3], ["eosio.token"]))["data"]["subscribe"] is True
        # the limit is on the connection's total, not on one message
        assert (await subscribe(ws, six[3:], ["eosio.token"]))["data"]["subscribe"] is False
        assert (await subscribe(ws, six[3:5], ["eosio.token"]))["data"]["subscribe"] is True
        # subscribing again is idempotent (the Go example re-sends every 20 s)
        assert (await subscribe(ws, six[:5], ["eosio.token"]))["data"]["subscribe"] is True
        empty = await subscribe(ws, [], ["eosio.token"])
        assert empty["data"] == {"subscribe": False, "msg": "account can not be empty"}


async def test_5_matching_actions_are_pushed_others_not(emulator: EOSParkEmulator) -> None:
    async with client(emulator.url) as ws:
        await subscribe(ws, [ME], ["eosio.token"], "transfer")
        not_pushed = [
            trx_of(transfer("alice", "bob", "9.0000 EOS")),  # neither actor nor notified
            trx_of(transfer("alice", ME, "9.0000 EOS", contract="eosiotoken12")),  # contract
            trx_of(  # the right contract and account, another action
                {**transfer(ME, "bob", "1.0000 EOS"), "name": "open", "data": {"owner": ME}}
            ),
        ]
        for trx in not_pushed:
            assert await emulator.push_transaction(trx) == 0
        incoming = trx_of(transfer("alice", ME, "5.0000 EOS"))  # ME is notified
        outgoing = trx_of(transfer(ME, "bob", "6.0000 EOS"))  # ME is the actor
        assert await emulator.push_transaction(incoming) == 1
        assert await emulator.push_transaction(outgoing) == 1
        first, second = await next_frame(ws, "data"), await next_frame(ws, "data")
    assert first == {"errno": 0, "msg_type": "data", "errmsg": "", "data": incoming}
    assert second["data"]["trx_id"] == outgoing["trx_id"]


async def test_6_unsubscribe(emulator: EOSParkEmulator) -> None:
    async with client(emulator.url) as ws:
        await subscribe(ws, [ME], ["eosio.token", "eosio"])
        await subscribe(ws, [ME], ["eosio.token"], "transfer")
        await ws.send(unsubscribe_message(ME, "eosio.token", "transfer"))
        assert (await next_frame(ws, "unsubscribe"))["data"] == {"subscribe": True, "msg": "ok"}
        # removing one action leaves the all-actions subscription of the pair
        assert await emulator.push_transaction(trx_of(transfer("alice", ME, "1.0000 EOS"))) == 1
        await ws.send(unsubscribe_message(ME, "eosio.token", ""))
        await next_frame(ws, "unsubscribe")
        # the empty action_name removed the whole pair; eosio stays subscribed
        assert await emulator.push_transaction(trx_of(transfer("alice", ME, "2.0000 EOS"))) == 0
        stake = transfer(ME, ME, "3.0000 EOS", contract="eosio") | {"name": "delegatebw"}
        assert await emulator.push_transaction(trx_of(stake)) == 1
        await ws.send(unsubscribe_message(f"{ME},bob", "eosio", ""))
        assert (await next_frame(ws, "unsubscribe"))["data"]["subscribe"] is False


async def test_6_unsubscribe_ack_key_is_configurable() -> None:
    emulator = EOSParkEmulator(api_keys=[KEY], unsubscribe_ack_key="unsubscribe")
    async with emulator, client(emulator.url) as ws:
        await ws.send(unsubscribe_message(ME, "eosio.token"))
        ack = await next_frame(ws, "unsubscribe")
    assert ack["data"] == {"unsubscribe": True, "msg": "ok"}


async def test_7_a_transaction_pushed_twice(emulator: EOSParkEmulator) -> None:
    async with client(emulator.url) as ws:
        await subscribe(ws, [ME], ["eosio.token"])
        trx = trx_of(transfer("alice", ME, "5.0000 EOS"))
        assert await emulator.push_transaction(trx, times=2) == 1
        assert await next_frame(ws, "data") == await next_frame(ws, "data")
    assert emulator.pushed == 2


async def test_8_heartbeats_stop_with_tcp_open(emulator: EOSParkEmulator) -> None:
    async with client(emulator.url) as ws:
        await next_frame(ws, "heartbeat")
        emulator.stop_heartbeats()
        with anyio.move_on_after(HEARTBEAT * 4) as silent:
            await next_frame(ws, "heartbeat", within=60)
        assert silent.cancelled_caught, "a heartbeat came after stop_heartbeats()"
        # the connection is still open and answering
        assert (await subscribe(ws, [ME], ["eosio.token"]))["data"]["subscribe"] is True
        emulator.resume_heartbeats()
        await next_frame(ws, "heartbeat")


async def test_9_legacy_subscribe_account(emulator: EOSParkEmulator) -> None:
    async with client(emulator.url) as ws:
        await ws.send(legacy_message("subscribe_account", ME))
        ack = await next_frame(ws)
        assert ack == {
            "errno": 0,
            "msg_type": "subscribe_account",
            "errmsg": "",
            "data": {"subscribe": True, "msg": "ok"},
        }
        # an account subscription covers every contract
        assert await emulator.push_transaction(trx_of(transfer("alice", ME, "1.0000 EOS"))) == 1
        assert (
            await emulator.push_transaction(
                trx_of(transfer(ME, "bob", "1.0000 EOS", contract="eosiotoken12"))
            )
            == 1
        )
        await ws.send(legacy_message("unsubscribe_account", ME))
        assert (await next_frame(ws, "unsubscribe_account"))["data"]["subscribe"] is True
        assert await emulator.push_transaction(trx_of(transfer("alice", ME, "1.0000 EOS"))) == 0


async def test_bad_messages_get_an_error_and_the_socket_stays(emulator: EOSParkEmulator) -> None:
    async with client(emulator.url) as ws:
        await ws.send("{not json")
        assert (await next_frame(ws))["errno"] == 400
        await ws.send(json.dumps({"msg_type": "subscribe_everything"}))
        assert (await next_frame(ws)) == {
            "errno": 400,
            "msg_type": "subscribe_everything",
            "errmsg": "Unknown msg_type",
        }
        assert (await subscribe(ws, [ME], ["eosio.token"]))["data"]["subscribe"] is True
    assert emulator.received[0] == "{not json"
    assert emulator.received[-1]["account"] == ME


async def test_demo_source_and_traffic() -> None:
    async with EOSParkEmulator(demo_interval=0.01) as emu:
        assert emu.demo_source()["api_key"] == DEMO_KEY
        async with anyio.create_task_group() as tg:
            tg.start_soon(emu.demo_traffic)
            async with client(emu.url, key=DEMO_KEY) as ws:
                sub = emu.demo_source()["subscriptions"][0]
                await subscribe(ws, [sub["account"]], sub["contract"], sub["action"])
                frames = [await next_frame(ws, "data") for _ in range(15)]
            tg.cancel_scope.cancel()
    actions = [a for f in frames for a in f["data"]["actions"]]
    contracts = {a["account"] for a in actions}
    assert contracts == {"eosio.token", "eosio"}  # the look-alike token is never pushed
    incoming = [a for a in actions if a["name"] == "transfer" and a["data"]["to"] == ME]
    big = [a for a in incoming if float(a["data"]["quantity"].split()[0]) >= 100]
    assert big and len(big) < len(incoming)  # some above the threshold, some below
    assert frames[0]["data"]["actions"][0] == big[0]  # the first push is one to alert on
    assert len({f["data"]["trx_id"] for f in frames}) < len(frames)  # and a re-sent push


async def test_drop_connections_with_or_without_a_close_frame(emulator: EOSParkEmulator) -> None:
    for abort in (False, True):
        async with client(emulator.url) as ws:
            await subscribe(ws, [ME], ["eosio.token"])
            await emulator.drop_connections(abort=abort)
            with anyio.fail_after(3), pytest.raises(ConnectionClosed) as closed:
                await ws.recv()
        assert (closed.value.rcvd is None) is abort
        await wait_for(lambda: not emulator.clients)
    assert emulator.accepted == 2
