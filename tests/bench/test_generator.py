"""``make bench``'s generator: a real client gets every frame, whole and in order.

The generator writes pre-built WebSocket frames straight to the transport, past
``websockets``' ``send()``; these tests hold it to what a client must receive.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import anyio
import pytest
from anyio.streams.buffered import BufferedByteReceiveStream
from tocsin_eospark.protocol import MAX_FRAME, subscribe_message
from websockets.asyncio.client import connect

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))

from generator import MEMO, account, frame  # noqa: E402

FRAMES = 300


async def receive_all(port: int) -> list[dict[str, Any]]:
    url = f"ws://127.0.0.1:{port}/v1/ws"
    async with connect(url, additional_headers={"apikey": "bench-key"}, max_size=MAX_FRAME) as ws:
        # permessage-deflate is on: the uncompressed frames must decode all the same
        assert [e.name for e in ws.protocol.extensions] == ["permessage-deflate"]
        await ws.send(subscribe_message(["benchsender1"], ["eosio.token"], "transfer"))
        data: list[dict[str, Any]] = []
        with anyio.fail_after(20):
            while len(data) < FRAMES:
                message = json.loads(await ws.recv())
                if message.get("msg_type") == "data":
                    data.append(message)
        return data


@pytest.mark.parametrize("rate", [0, 5000])
async def test_a_client_gets_every_frame_whole_and_in_order(rate: int) -> None:
    command = [sys.executable, str(BENCH / "generator.py"), "--frames", str(FRAMES),
               "--rate", str(rate), "--match-every", "100", "--rules", "7"]  # fmt: skip
    async with await anyio.open_process(command) as proc:
        assert proc.stdin is not None and proc.stdout is not None
        lines = BufferedByteReceiveStream(proc.stdout)
        port = json.loads(await lines.receive_until(b"\n", 1000))["port"]
        received = await receive_all(port)
        sent = json.loads(await lines.receive_until(b"\n", 1000))
        await proc.stdin.aclose()  # the generator serves until its stdin closes
    assert sent["sent"] == FRAMES and sent["cpu"] > 0
    for i, got in enumerate(received):
        if i % 100:
            assert got == json.loads(frame(i, "nobody", MEMO + str(i)))
            continue
        # the n-th matching frame: to rule n's account, stamped with its send time
        memo = got["data"]["actions"][0]["data"]["memo"]
        assert got == json.loads(frame(i, account(i // 100 % 7), memo))
        assert sent["t0"] <= float(memo.removeprefix("t=")) <= sent["t1"]


async def test_the_sans_io_floor_of_bench_split_receives_every_data_frame() -> None:
    # bench/split.py's Sans-I/O floor (docs/performance.md, "What 70% would take") stops at
    # its FRAMES-th data frame: it must do the real handshake and subscription to get any,
    # and a count short of what the generator sent would leave it waiting.
    command = [sys.executable, str(BENCH / "generator.py"), "--frames", str(FRAMES),
               "--rate", "0", "--match-every", "100", "--rules", "7"]  # fmt: skip
    async with await anyio.open_process(command) as proc:
        assert proc.stdin is not None and proc.stdout is not None
        lines = BufferedByteReceiveStream(proc.stdout)
        port = json.loads(await lines.receive_until(b"\n", 1000))["port"]
        url = f"ws://127.0.0.1:{port}/v1/ws"
        with anyio.fail_after(30):
            out = await anyio.run_process(
                [sys.executable, str(BENCH / "split.py"), "--sansio", url, str(FRAMES)]
            )
            sent = json.loads(await lines.receive_until(b"\n", 1000))
        await proc.stdin.aclose()
    result = json.loads(out.stdout)
    assert sent["sent"] == FRAMES
    assert sent["t0"] <= result["t1"] and result["cpu"] > 0
