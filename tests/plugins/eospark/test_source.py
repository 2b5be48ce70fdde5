"""The EOSPark source against the emulator over real sockets, with a RecordingContext."""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import anyio
import pytest
from pydantic import ValidationError
from tocsin_eospark import EOSParkConfig, EOSParkEmulator, EOSParkSource
from tocsin_eospark.emulator import action, transaction, transfer
from tocsin_eospark.protocol import MAX_FRAME, action_id, envelope
from tocsin_eospark.source import GAP_REASON, WS_LOGGER, failure
from websockets.asyncio.client import connect
from websockets.datastructures import Headers
from websockets.exceptions import InvalidStatus
from websockets.http11 import Response

from support import wait_for
from tocsin.testing import RecordingContext

from .conftest import HEARTBEAT, KEY, ME, make_config, source_running


async def wait(ctx: RecordingContext, condition: Any, within: float = 5) -> None:
    with anyio.fail_after(within):
        await ctx.wait_until(condition)


def incoming(amount: str = "150.0000 EOS", frm: str = "alice") -> dict[str, Any]:
    return transaction([transfer(frm, ME, amount, "hello")])


# -- config ----------------------------------------------------------------------------


def test_config_defaults_and_forms(registry: Any) -> None:
    assert registry.source("eospark") is EOSParkSource
    config = EOSParkConfig.model_validate(
        {
            "plugin": "eospark",
            "api_key": KEY,
            "subscriptions": [
                {"account": "alice, bob", "contract": ["eosio.token", "eosio"]},
                {"account": ["carol"], "contract": "eosio.token", "action": "transfer"},
            ],
        }
    )
    assert config.url == "wss://ws.eospark.com/v1/ws"
    assert config.stale_after == 30.0
    assert config.subscriptions[0].account == ["alice", "bob"]
    assert config.subscriptions[0].contract == ["eosio.token", "eosio"]
    assert config.subscriptions[0].action == ""
    assert KEY not in repr(config) and KEY not in str(config.model_dump())


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"subscriptions": [{"account": [f"acct{c}" for c in "12345a"], "contract": "eosio"}]},
            "at most 5 accounts on a connection (one connection per API key); these name 6",
        ),
        (
            {
                "subscriptions": [
                    {"account": ME, "contract": "c1,c2,c3"},
                    {"account": ME, "contract": "c4,c5,c1,ca"},
                ]
            },
            "at most 5 contracts",
        ),
        ({"subscriptions": []}, "at least 1 item"),
        ({"subscriptions": [{"account": "", "contract": "eosio"}]}, "must name at least one"),
        ({"subscriptions": [{"account": "Alice", "contract": "eosio"}]}, "is not an EOS name"),
        ({"subscriptions": [{"account": ME, "contract": "x", "action": "Xfer"}]}, "action name"),
        ({"url": "https://ws.eospark.com/v1/ws"}, "ws:// or wss://"),
        ({"url": "wss://ws.eospark.com/v1/ws?apikey=abc"}, "not in the URL"),
        ({"stale_after": "500ms"}, "greater than or equal to 1"),
        ({"apikey": "x"}, "Extra inputs are not permitted"),
    ],
)
def test_config_errors(change: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError) as err:
        make_config(**change)
    assert message in str(err.value)


def test_websockets_debug_lines_mask_the_key(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger="websockets.client"):
        WS_LOGGER.debug("> %s: %s", "apikey", "unregistered-k3y")
        WS_LOGGER.debug("> GET %s HTTP/1.1", "/v1/ws?apikey=unregistered-k3y&x=1")
        WS_LOGGER.debug("> %s: %s", "Host", "example")
    assert "unregistered-k3y" not in caplog.text
    assert "/v1/ws?apikey=***&x=1" in caplog.text
    assert "> Host: example" in caplog.text


# -- scenarios over real sockets -------------------------------------------------------


async def test_subscribes_emits_one_event_per_action_and_logs_no_key(
    emulator: EOSParkEmulator, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    config = make_config(
        emulator.url,
        subscriptions=[
            {"account": [ME, "bob"], "contract": "eosio.token", "action": "transfer"},
            {"account": ME, "contract": "eosio"},
        ],
    )
    async with source_running(config) as ctx:
        assert ctx.states() == ["up"]
        assert emulator.received == [
            {
                "msg_type": "subscribe",
                "account": f"{ME},bob",
                "contract": "eosio.token",
                "action_name": "transfer",
            },
            {"msg_type": "subscribe", "account": ME, "contract": "eosio", "action_name": ""},
        ]
        stake = action("eosio", "delegatebw", ME, {"from": ME, "receiver": ME})
        trx = transaction(
            [stake, transfer(ME, "carol", "2.0000 EOS", "rent")],
            block_num=300_000_123,
            timestamp="2026-11-22T10:00:00.500",
            global_action_seq=42,
        )
        assert await emulator.push_transaction(transaction([transfer("x", "y", "1.0000 EOS")])) == 0
        assert await emulator.push_transaction(trx) == 1
        await wait(ctx, lambda: len(ctx.events) == 2)
    first, second = ctx.events
    assert [e.id for e in ctx.events] == [action_id(trx["trx_id"], 0), action_id(trx["trx_id"], 1)]
    assert all(
        e.type == "action" and e.source == "eos" and e.provider == "eospark" for e in ctx.events
    )
    assert first.time == "2026-11-22T10:00:00.500Z"
    assert first.data["contract"] == "eosio" and first.data["action"] == "delegatebw"
    assert second.data == {
        "contract": "eosio.token",
        "action": "transfer",
        "authorization": [{"actor": ME, "permission": "active"}],
        "args": {"from": ME, "to": "carol", "quantity": "2.0000 EOS", "memo": "rent"},
        "hex_data": trx["actions"][1]["hex_data"],
        "trx_id": trx["trx_id"],
        "block_num": 300_000_123,
        "trx_timestamp": "2026-11-22T10:00:00.500",
        "action_index": 1,
        "global_action_seq": 42,
    }
    assert "apikey: ***" in caplog.text  # websockets did log the handshake
    assert KEY not in caplog.text


async def test_7_duplicates_emit_once_also_across_a_reconnect(emulator: EOSParkEmulator) -> None:
    async with source_running(make_config(emulator.url)) as ctx:
        dup, other = incoming(frm="alice"), incoming(frm="bob")
        await emulator.push_transaction(dup, times=2)
        await emulator.push_transaction(other)
        await wait(ctx, lambda: len(ctx.events) == 2)
        lost = time.time()
        await emulator.drop_connections()
        await wait(ctx, lambda: "gap" in ctx.states())
        await emulator.push_transaction(dup)  # EOSPark re-sends after the reconnect
        marker = incoming(frm="carol")
        await emulator.push_transaction(marker)
        await wait(ctx, lambda: len(ctx.events) == 3)
    assert [e.data["args"]["from"] for e in ctx.events] == ["alice", "bob", "carol"]
    assert ctx.states() == ["up", "down", "up", "gap"]
    down_reason = ctx.status[1][1]
    assert down_reason == "connection closed (1011 dropped by the emulator)"
    gap = ctx.status[3][1]
    assert gap.startswith(f"{GAP_REASON} since ")
    since = gap.rsplit(" ", 1)[1]
    assert since.endswith("Z") and since <= time.strftime(
        "%Y-%m-%dT%H:%M:%S", time.gmtime(lost + 1)
    )
    assert emulator.accepted == 2


async def test_8_silence_is_stale_then_reconnect_and_gap(emulator: EOSParkEmulator) -> None:
    async with source_running(make_config(emulator.url, stale_after="1s")) as ctx:
        await wait_for(lambda: emulator.clients)
        emulator.stop_heartbeats()  # the TCP connection stays open
        await wait(ctx, lambda: "stale" in ctx.states())
        await wait(ctx, lambda: ctx.states()[-2:] == ["up", "gap"])
        await emulator.push_transaction(incoming())
        await wait(ctx, lambda: ctx.events)
    assert ctx.states() == ["up", "stale", "up", "gap"]
    assert ctx.status[1][1] == "nothing received for 1s"
    assert emulator.accepted == 2


async def test_a_burst_handled_for_longer_than_stale_after_loses_nothing(
    emulator: EOSParkEmulator,
) -> None:
    # Review of 49eaa4a: the frames of a batch still in hand when the silence deadline
    # passed were handled under an already-cancelled scope: half of them were lost, and
    # the source declared itself stale in the middle of the burst.
    ctx = RecordingContext("eos", "eospark", hand_over=0.15)
    async with anyio.create_task_group() as tg:
        with anyio.fail_after(5):
            await tg.start(EOSParkSource(make_config(emulator.url, stale_after="1s"), ctx).run)
        for n in range(12):  # 1.8 s of handling, in one read or a few
            await emulator.push_transaction(incoming(f"{n + 1}.0000 EOS"))
        await wait(ctx, lambda: len(ctx.events) == 12)
        tg.cancel_scope.cancel()
    assert [e.data["args"]["quantity"] for e in ctx.events] == [
        f"{n + 1}.0000 EOS" for n in range(12)
    ]
    assert ctx.states() == ["up"]


async def test_heartbeats_keep_a_quiet_connection_alive(emulator: EOSParkEmulator) -> None:
    async with source_running(make_config(emulator.url, stale_after="1s")) as ctx:
        with anyio.move_on_after(HEARTBEAT * 6):  # well past stale_after, with heartbeats
            await ctx.wait_until(lambda: len(ctx.status) > 1)
    assert ctx.states() == ["up"] and emulator.accepted == 1


async def test_2_refused_key_waits_max_backoff_then_comes_back() -> None:
    async with EOSParkEmulator(api_keys=["another"]) as emu:
        config = make_config(emu.url, max_backoff="2s")
        async with source_running(config, wait_started=False) as ctx:
            await wait(ctx, lambda: ctx.states() == ["down"])
            refused_at = time.monotonic()
            emu.api_keys.add(KEY)  # the key is fixed (or rotated) at the provider
            await wait(ctx, lambda: "up" in ctx.states())
            waited = time.monotonic() - refused_at
    assert ctx.states() == ["down", "up"]  # no gap: it never was up before
    assert ctx.status[0][1] == "EOSPark refused the API key (403 Forbidden)"
    assert emu.refused[403] == 1
    # Only the user can fix a key: no tight loop, max_backoff at once (an ordinary first
    # retry waits at most 1 s).
    assert waited >= 1.8


async def test_2_refused_key_at_the_handshake() -> None:
    async with EOSParkEmulator(api_keys=["another"], auth_refusal="http") as emu:
        config = make_config(emu.url, max_backoff="2s")
        async with source_running(config, wait_started=False) as ctx:
            await wait(ctx, lambda: ctx.states() == ["down"])
    assert ctx.status[0][1] == "EOSPark refused the API key (HTTP 403)"
    assert failure(InvalidStatus(Response(403, "Forbidden", Headers())))[1] is True
    assert failure(InvalidStatus(Response(406, "Not Acceptable", Headers())))[1] is False


async def test_3_a_second_connection_is_retried_not_given_up(emulator: EOSParkEmulator) -> None:
    async with connect(emulator.url, additional_headers={"apikey": KEY}) as holder:
        config = make_config(emulator.url, max_backoff="10s")
        async with source_running(config, wait_started=False) as ctx:
            await wait(ctx, lambda: ctx.states() == ["down"])
            refused_at = time.monotonic()
            await holder.close()  # the old connection is reaped
            await wait(ctx, lambda: "up" in ctx.states())
            waited = time.monotonic() - refused_at
    assert "(406 No repeat connection.)" in ctx.status[0][1]
    assert waited < 3  # an ordinary backoff, not the 10 s max_backoff of a refused key
    assert emulator.refused[406] >= 1


async def test_4_subscription_refused_by_the_server() -> None:
    async with EOSParkEmulator(api_keys=[KEY], max_accounts=1) as emu:
        config = make_config(
            emu.url, subscriptions=[{"account": [ME, "bob"], "contract": "eosio.token"}]
        )
        async with source_running(config, wait_started=False) as ctx:
            await wait(ctx, lambda: ctx.states() == ["down"])
            await wait_for(lambda: emu.connections >= 2)  # retried with backoff
    assert ctx.status[0][1] == "EOSPark refused the subscription: Subscribe up to 1 accounts"
    assert "up" not in ctx.states()


async def test_malformed_frames_are_counted_and_skipped(emulator: EOSParkEmulator) -> None:
    async with source_running(make_config(emulator.url)) as ctx:
        await emulator.push_raw("this is not json")
        await emulator.push_raw(json.dumps({"errno": 0, "msg_type": "data", "data": {}}))
        await emulator.push_transaction(incoming())
        await wait(ctx, lambda: ctx.events)
        assert ctx.rejects == [
            "malformed frame: not JSON",
            "malformed frame: data push without a trx_id",
        ]
        await emulator.push_raw("x" * (MAX_FRAME + 1))  # closes the connection (1009)
        await wait(ctx, lambda: ctx.states()[-1:] == ["gap"])
    assert ctx.rejects[-1] == "oversized frame"
    assert ctx.states() == ["up", "down", "up", "gap"]
    assert ctx.status[1][1] == "a frame over the size limit closed the connection"


async def test_an_error_frame_reconnects(emulator: EOSParkEmulator) -> None:
    async with source_running(make_config(emulator.url)) as ctx:
        await emulator.push_raw(envelope("subscribe", errno=500, errmsg="Internal error"))
        await wait(ctx, lambda: ctx.states()[-1:] == ["gap"])
    assert ctx.status[1] == ("down", "EOSPark error 500 on subscribe: Internal error")


async def test_an_unreachable_server_is_down_with_a_reason() -> None:
    async with EOSParkEmulator() as emu:
        url = emu.url  # a port nobody listens on once the emulator is closed
    async with source_running(make_config(url), wait_started=False) as ctx:
        await wait(ctx, lambda: ctx.states() == ["down"])
    assert ctx.status[0][1].startswith("cannot connect: ")
