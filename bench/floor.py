"""The floor of ``make bench``: the same websockets client and JSON decoder, nothing else.

    python bench/floor.py ws://127.0.0.1:PORT/v1/ws FRAMES

Connects to the generator like the EOSPark source does (API key header, one subscribe,
websockets' client with the daemon's ``BatchedConnection``: the frames of a read taken
together, as the source takes them), then receives and decodes frames with
``tocsin.parse_json`` (orjson: the daemon's generic decoder; its EOSPark plugin decodes
data pushes into typed msgspec structs, and docs/performance.md says why the floor keeps
the generic one) until ``FRAMES`` data frames have arrived. Prints ``{"frames": n, "t1":
monotonic time of the last one, "cpu": seconds of CPU}``.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

from tocsin_eospark.protocol import MAX_FRAME, subscribe_message
from websockets.asyncio.client import connect

from tocsin import BatchedConnection, parse_json


async def main(url: str, frames: int) -> None:
    async with connect(
        url,
        additional_headers={"apikey": "bench-key"},
        max_size=MAX_FRAME,
        create_connection=BatchedConnection,
    ) as ws:
        assert isinstance(ws, BatchedConnection)
        await ws.send(subscribe_message(["benchsender1"], ["eosio.token"], "transfer"))
        seen = 0
        cpu = time.process_time()
        while seen < frames:
            for raw in await ws.recv_batch():
                frame = parse_json(raw)
                if frame.get("msg_type") == "data":
                    seen += 1
        t1 = time.monotonic()
        cpu = time.process_time() - cpu
    print(json.dumps({"frames": seen, "t1": t1, "cpu": cpu}), flush=True)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2])))
