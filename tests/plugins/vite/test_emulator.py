"""The emulator against a plain WebSocket client: PROTOCOLS.md section 3 scenarios 1-8."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import pytest
from tocsin_vite import ViteEmulator
from tocsin_vite.emulator import DEMO_CONTRACT
from tocsin_vite.protocol import filter_param, vite_address
from websockets.asyncio.client import ClientConnection, connect

from support import wait_for

from .conftest import CONTRACT, ME, PAYER, TRANSFER


class Client:
    """A bare JSON-RPC client: numbered requests, answers and pushes kept apart."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.n = 0
        self.pushes: list[dict[str, Any]] = []

    async def frame(self, within: float = 3) -> Any:
        with anyio.fail_after(within):
            return json.loads(await self.ws.recv())

    async def call(self, method: str, *params: Any) -> dict[str, Any]:
        """The answer (``result`` or ``error``) to one request; pushes meanwhile are kept."""
        self.n += 1
        rid = self.n
        await self.ws.send(
            json.dumps({"jsonrpc": "2.0", "id": rid, "method": method, "params": list(params)})
        )
        while True:
            frame = await self.frame()
            if isinstance(frame, dict) and frame.get("id") == rid:
                return frame
            self.pushes.append(frame)

    async def result(self, method: str, *params: Any) -> Any:
        answer = await self.call(method, *params)
        assert "error" not in answer, answer
        return answer["result"]

    async def push(self) -> dict[str, Any]:
        if self.pushes:
            return self.pushes.pop(0)
        frame = await self.frame()
        assert frame["method"] == "subscribe_subscription"
        return frame["params"]


@asynccontextmanager
async def client(url: str) -> AsyncIterator[Client]:
    async with connect(url) as ws:
        yield Client(ws)


def missing(method: str) -> dict[str, Any]:
    return {"code": -32601, "message": f"The method {method} does not exist/is not available"}


async def test_1_subscribe_returns_an_id_then_array_pushes(emulator: ViteEmulator) -> None:
    async with client(emulator.url) as rpc:
        await emulator.produce_snapshots(2)  # before the subscription: not pushed
        sub = await rpc.result("subscribe_subscribe", "newSnapshotBlock")
        assert isinstance(sub, str) and sub.startswith("0x") and not sub.startswith("0x0")
        await wait_for(lambda: emulator.subscriptions == 1)
        await emulator.produce_snapshots()
        push = await rpc.push()
        height = emulator.chain.snapshot_height
        assert push == {
            "subscription": sub,
            "result": [
                {"hash": emulator.chain.snapshots[-1].hash, "height": str(height), "removed": False}
            ],
        }
        await emulator.rollback_snapshots(2)  # one event, two items: a batched array
        push = await rpc.push()
        assert [i["height"] for i in push["result"]] == [str(height), str(height - 1)]
        assert all(i["removed"] for i in push["result"])


async def test_every_topic_pushes_its_shape(emulator: ViteEmulator) -> None:
    async with client(emulator.url) as rpc:
        by_addr = await rpc.result("subscribe_subscribe", "newAccountBlockByAddress", PAYER)
        unreceived = await rpc.result(
            "subscribe_subscribe", "createUnreceivedBlockSubscriptionByAddress", ME
        )
        logs = await rpc.result("subscribe_subscribe", "newVmLog", filter_param({PAYER: (0, 0)}))
        legacy = await rpc.result("subscribe_subscribe", "newLogs", {"addrRange": {PAYER: None}})
        await wait_for(lambda: emulator.subscriptions == 4)
        block = await emulator.produce_account_block(PAYER, [_log(b"\x07")], to=ME)
        got = {p["subscription"]: p["result"] for p in [await rpc.push() for _ in range(4)]}
    assert got[by_addr] == [{"hash": block.hash, "height": "1", "removed": False}]
    assert got[unreceived] == [{"hash": block.hash, "received": False, "removed": False}]
    assert got[logs] == [
        {
            "vmlog": {"topics": [TRANSFER], "data": "Bw=="},
            "accountBlockHash": block.hash,
            "accountBlockHeight": "1",
            "address": PAYER,
            "removed": False,
        }
    ]
    assert got[legacy][0]["log"] == got[logs][0]["vmlog"] and got[legacy][0]["addr"] == PAYER
    assert got[legacy][0]["accountHeight"] == "1"


def _log(data: bytes) -> Any:
    from tocsin_vite.chain import log_of

    return log_of([TRANSFER], data)


async def test_2_a_filter_param_without_addresses_is_refused(emulator: ViteEmulator) -> None:
    async with client(emulator.url) as rpc:
        nil = await rpc.call("subscribe_subscribe", "newVmLog", {"addressHeightRange": {}})
        backwards = await rpc.call(
            "subscribe_newVmLogFilter",
            {"addressHeightRange": {CONTRACT: {"fromHeight": "9", "toHeight": "3"}}},
        )
    assert nil["error"] == {"code": -32002, "message": "addressHeightRange is nil"}
    assert backwards["error"] == {"code": -32002, "message": "to height < from height"}


async def test_3_unknown_methods_and_the_seed_spelling_in_strict_mode(
    emulator: ViteEmulator,
) -> None:
    param = filter_param({CONTRACT: (0, 0)})
    async with client(emulator.url) as rpc:
        assert (await rpc.call("subscribe_createVmlogFilter", param))["error"] == missing(
            "subscribe_createVmlogFilter"
        )
        assert (await rpc.call("ledger_getVmlogsByFilter", param))["error"] == missing(
            "ledger_getVmlogsByFilter"
        )
        assert (await rpc.call("subscribe_subscribe", "nope"))["error"] == missing("subscribe_nope")
        assert (await rpc.call("eth_blockNumber"))["error"] == missing("eth_blockNumber")
        assert await rpc.result("subscribe_createVmLogFilter", param)  # go-vite's own spelling
        assert await rpc.result("ledger_getVmLogsByFilter", param) is None  # nil: nothing yet
        assert (await rpc.call("ledger_getSnapshotBlocks", 5))["error"] == {
            "code": -32602,
            "message": "ledger_GetSnapshotBlocks expects 2 parameters, got 1",
        }
    async with ViteEmulator(names="both") as lenient, client(lenient.url) as rpc:
        assert await rpc.result("subscribe_createVmlogFilter", param)
        assert await rpc.result("subscribe_createVmLogFilter", param)
        await rpc.result("ledger_getVmlogsByFilter", param)
    async with ViteEmulator(names="seed") as seed, client(seed.url) as rpc:
        assert (await rpc.call("subscribe_subscribe", "newSnapshotBlock"))["error"] == missing(
            "subscribe_newSnapshotBlock"
        )
        assert await rpc.result("subscribe_subscribe", "createSnapshotBlockSubscription")
        # The seed's empty poll "returns an empty array" where go-vite gives null.
        fid = await rpc.result("subscribe_createAccountBlockFilter")
        changes = await rpc.result("subscribe_getChangesByFilterId", fid)
        assert changes == {"result": [], "subscription": fid}


async def test_4_an_idle_filter_dies_and_uninstall_of_an_unknown_id_is_false() -> None:
    async with ViteEmulator(filter_expiry=0.2) as emu, client(emu.url) as rpc:
        fid = await rpc.result("subscribe_newAccountBlockFilter")
        assert await rpc.result("subscribe_getChangesByFilterId", fid) == {
            "result": None,
            "subscription": fid,
        }
        kept = await rpc.result("subscribe_newSnapshotBlockFilter")
        assert await rpc.result("subscribe_getChangesByFilterId", kept) == {
            "result": [],
            "subscription": kept,
        }
        await emu.produce_snapshots()
        changes = await rpc.result("subscribe_getChangesByFilterId", kept)
        assert [i["height"] for i in changes["result"]] == [str(emu.chain.snapshot_height)]
        idle_since = time.monotonic()

        with anyio.fail_after(3):  # polling would keep it alive; the sweeper runs on requests
            while fid in emu.filters:
                await rpc.result("ledger_getSnapshotChainHeight")
                await anyio.sleep(0.02)
        # go-vite's filters die between one and two expiry periods after the last poll
        assert 0.2 <= time.monotonic() - idle_since < 2
        assert (await rpc.call("subscribe_getChangesByFilterId", fid))["error"] == {
            "code": -32002,
            "message": "filter not found",
        }
        assert await rpc.result("subscribe_uninstallFilter", "0x1234") is False
        fresh = await rpc.result("subscribe_newSnapshotBlockFilter")
        assert await rpc.result("subscribe_uninstallFilter", fresh) is True
        assert await rpc.result("subscribe_uninstallFilter", fresh) is False


async def test_5_unsubscribe_twice(emulator: ViteEmulator) -> None:
    async with client(emulator.url) as rpc:
        sub = await rpc.result("subscribe_subscribe", "newSnapshotBlock")
        assert await rpc.result("subscribe_unsubscribe", sub) is True
        again = await rpc.call("subscribe_unsubscribe", sub)
    assert again["error"] == {"code": -32002, "message": "subscription not found"}


async def test_6_a_rollback_pair(emulator: ViteEmulator) -> None:
    async with client(emulator.url) as rpc:
        sub = await rpc.result("subscribe_subscribe", "newVmLog", filter_param({CONTRACT: (0, 0)}))
        await wait_for(lambda: emulator.subscriptions == 1)
        block = await emulator.produce_vmlog(CONTRACT, [TRANSFER], b"\x01")
        added = (await rpc.push())["result"][0]
        await emulator.rollback_account(CONTRACT, readd=True)
        removed = (await rpc.push())["result"][0]
        readded = (await rpc.push())["result"][0]
        assert (await rpc.push() if rpc.pushes else None) is None
    assert (
        added["accountBlockHash"]
        == removed["accountBlockHash"]
        == readded["accountBlockHash"]
        == block.hash
    )
    assert (added["removed"], removed["removed"], readded["removed"]) == (False, True, False)
    assert {**removed, "removed": False} == added == readded
    assert sub


async def test_7_ids_die_with_the_connection(emulator: ViteEmulator) -> None:
    async with client(emulator.url) as rpc:
        old = await rpc.result("subscribe_subscribe", "newSnapshotBlock")
        await wait_for(lambda: emulator.subscriptions == 1)
    await wait_for(lambda: emulator.subscriptions == 0)
    async with client(emulator.url) as rpc:
        assert (await rpc.call("subscribe_unsubscribe", old))["error"][
            "message"
        ] == "subscription not found"
        new = await rpc.result("subscribe_subscribe", "newSnapshotBlock")
        await wait_for(lambda: emulator.subscriptions == 1)
        await emulator.produce_snapshots()
        assert (await rpc.push())["subscription"] == new != old
    assert emulator.connections == 2


async def test_8_a_batch_gets_a_batch_and_subscribes_after_the_answer(
    emulator: ViteEmulator,
) -> None:
    async with connect(emulator.url) as ws:
        batch = [
            {
                "jsonrpc": "2.0",
                "id": 1,
                "method": "subscribe_subscribe",
                "params": ["newSnapshotBlock"],
            },
            {"jsonrpc": "2.0", "id": 2, "method": "ledger_getSnapshotChainHeight", "params": []},
            {"jsonrpc": "2.0", "id": 3, "method": "nope_nope", "params": []},
            {
                "jsonrpc": "2.0",
                "method": "ledger_getSnapshotChainHeight",
                "params": [],
            },  # a notification
        ]
        await ws.send(json.dumps(batch))
        with anyio.fail_after(3):
            answer = json.loads(await ws.recv())
        assert [a["id"] for a in answer] == [1, 2, 3]
        assert answer[1]["result"] == str(emulator.chain.snapshot_height)
        assert answer[2]["error"] == missing("nope_nope")
        await wait_for(lambda: emulator.subscriptions == 1)
        await ws.send("[]")
        with anyio.fail_after(3):
            assert json.loads(await ws.recv())["error"] == {
                "code": -32600,
                "message": "empty batch",
            }
        await ws.send("{not json")
        with anyio.fail_after(3):
            assert json.loads(await ws.recv())["error"]["code"] == -32700


async def test_the_ledger_answers_what_a_backfill_needs(emulator: ViteEmulator) -> None:
    first = await emulator.produce_vmlog(CONTRACT, [TRANSFER], b"a")
    await emulator.produce_account_block(CONTRACT)
    third = await emulator.produce_vmlog(CONTRACT, [TRANSFER.replace("a", "c")], b"c")
    send = await emulator.produce_account_block(PAYER, to=ME)
    await emulator.produce_snapshots(3)
    top = emulator.chain.snapshot_height
    async with client(emulator.url) as rpc:
        latest = await rpc.result("ledger_getLatestSnapshotBlock")
        assert latest["height"] == top and latest["hash"] == emulator.chain.snapshots[-1].hash
        blocks = await rpc.result("ledger_getSnapshotBlocks", top, 2)
        assert [b["height"] for b in blocks] == [top, top - 1]  # from the height downwards
        assert (await rpc.result("ledger_getLatestAccountBlock", CONTRACT))["height"] == "3"
        assert await rpc.result("ledger_getLatestAccountBlock", ME) is None
        ranged = await rpc.result("ledger_getAccountBlocksByHeightRange", CONTRACT, 2, 3)
        assert [b["height"] for b in ranged] == ["2", "3"]
        assert await rpc.result("ledger_getAccountBlocksByHeightRange", CONTRACT, 5, 9) is None
        logs = await rpc.result(
            "ledger_getVmLogsByFilter", filter_param({CONTRACT: (1, 0)}, [[TRANSFER]])
        )
        assert [item["accountBlockHash"] for item in logs] == [first.hash]
        assert "removed" not in logs[0]
        logs = await rpc.result("ledger_getVmLogsByFilter", filter_param({CONTRACT: (2, 3)}))
        assert [item["accountBlockHash"] for item in logs] == [third.hash]
        pending = await rpc.result("ledger_getUnreceivedBlocksByAddress", ME, 0, 10)
        assert [b["hash"] for b in pending] == [send.hash] and pending[0]["toAddress"] == ME
        assert await rpc.result("ledger_getUnreceivedBlocksByAddress", ME, 1, 10) == []
        too_many = await rpc.call("ledger_getSnapshotBlocks", top, 1001)
        assert too_many["error"] == {"code": -32002, "message": "count must be less than 1000"}
        emulator.fail("ledger_getLatestSnapshotBlock", message="boom")
        assert (await rpc.call("ledger_getLatestSnapshotBlock"))["error"] == {
            "code": -32002,
            "message": "boom",
        }
        assert "result" in await rpc.call("ledger_getLatestSnapshotBlock")  # once only
        emulator.absent.add("ledger_getSnapshotBlocks")
        assert (await rpc.call("ledger_getSnapshotBlocks", top, 1))["error"] == missing(
            "ledger_getSnapshotBlocks"
        )


async def test_control_counts_and_records(emulator: ViteEmulator) -> None:
    async with client(emulator.url) as rpc:
        await rpc.result("subscribe_subscribe", "newSnapshotBlock")
        await wait_for(lambda: emulator.subscriptions == 1)
        await emulator.drop_connections()
        with pytest.raises(Exception):  # noqa: B017 - any close is fine here
            await rpc.frame()
    assert emulator.connections == 1 and emulator.requests("subscribe_subscribe")[0]["params"] == [
        "newSnapshotBlock"
    ]
    assert vite_address(DEMO_CONTRACT) == DEMO_CONTRACT
    table = emulator.demo_source()
    assert table["plugin"] == "vite" and table["url"] == emulator.url
    assert {"topic": "vmlog", "address": DEMO_CONTRACT} in table["subscriptions"]


async def test_demo_traffic_makes_blocks_logs_and_rollback_pairs() -> None:
    async with ViteEmulator(demo_interval=0.001) as emu, client(emu.url) as rpc:
        sub = await rpc.result(
            "subscribe_subscribe", "newVmLog", filter_param({DEMO_CONTRACT: (0, 0)})
        )
        await wait_for(lambda: emu.subscriptions == 1)
        async with anyio.create_task_group() as tg:
            tg.start_soon(emu.demo_traffic)
            removed = False
            with anyio.fail_after(5):
                while not removed:
                    push = await rpc.push()
                    removed = any(item["removed"] for item in push["result"])
            tg.cancel_scope.cancel()
    assert push["subscription"] == sub
    assert emu.chain.snapshot_height >= 110  # a block a tick, the pair at the 10th
