"""The hand-written reference of ``make bench``: what a user might write instead of tocsin.

    python bench/handwritten.py ws://127.0.0.1:PORT/v1/ws FRAMES RULES http://127.0.0.1:PORT/hook

The same websockets client and decoder as the floor, plus one rule checked by hand (is the
transfer to one of the ``RULES`` watched accounts?) and an aiohttp POST of each match to
the webhook receiver: no normalization, no index, no state, no retries, nothing durable.
Prints ``{"frames": n, "cpu": seconds of CPU}`` once every match has been answered.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

import aiohttp
from generator import account
from tocsin_eospark.protocol import MAX_FRAME, subscribe_message
from websockets.asyncio.client import connect

from tocsin import parse_json


async def main(url: str, frames: int, rules: int, hook: str) -> None:
    watched = {account(i) for i in range(rules)}
    posts: set[asyncio.Task[None]] = set()
    async with aiohttp.ClientSession() as session:

        async def post(action: dict[str, object]) -> None:
            body = json.dumps({"event": {"data": action}}).encode()
            async with session.post(hook, data=body) as response:
                await response.read()

        async with connect(
            url, additional_headers={"apikey": "bench-key"}, max_size=MAX_FRAME
        ) as ws:
            await ws.send(subscribe_message(["benchsender1"], ["eosio.token"], "transfer"))
            seen = 0
            cpu = time.process_time()
            while seen < frames:
                frame = parse_json(await ws.recv())
                if frame.get("msg_type") != "data":
                    continue
                seen += 1
                for action in frame["data"]["actions"]:
                    args = action.get("data") or {}
                    if action.get("name") == "transfer" and args.get("to") in watched:
                        task = asyncio.create_task(post({"args": args}))
                        posts.add(task)
                        task.add_done_callback(posts.discard)
            await asyncio.gather(*posts)
            cpu = time.process_time() - cpu
    print(json.dumps({"frames": seen, "cpu": cpu}), flush=True)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]))
