"""CPU cost per webhook POST: aiohttp vs httpx, against a local server in another process.

    python bench/http_client.py [-n 3000] [--rounds 3] [--json bench/results.json]

Each client sends ``n`` sequential POSTs of a typical alert body (one connection, kept
alive) to an aiohttp.web server on 127.0.0.1 that runs in a separate process, so
``time.process_time()`` measures the client's CPU alone. Reported: CPU microseconds per
POST and requests per second of wall time, the median of ``--rounds`` rounds after a
warm-up. httpx is not a tocsin dependency: it is skipped when it cannot be imported
(install it in a scratch venv to compare). When tocsin is importable, its webhook action
(aiohttp plus JSON encoding and HMAC signing) is measured too.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import platform
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from multiprocessing.connection import Connection
from typing import Any

import aiohttp
import orjson
from aiohttp import web

WARMUP = 200

EVENT: dict[str, Any] = {
    "id": "3f1c9a7e5b2d4c60",
    "source": "eos",
    "provider": "eospark",
    "type": "action",
    "time": "2026-11-22T10:00:00Z",
    "removed": False,
    "data": {
        "contract": "eosio.token",
        "action": "transfer",
        "authorization": [{"actor": "alice", "permission": "active"}],
        "args": {"from": "alice", "to": "myaccount", "quantity": "12.5000 EOS", "memo": "rent"},
        "trx_id": "9b1e" * 16,
        "block_num": 312345678,
    },
}
PAYLOAD: dict[str, Any] = {
    "id": "a1b2c3d4e5f60718",
    "status": "firing",
    "rule": "incoming transfer",
    "title": "Received 12.5000 EOS",
    "body": "from alice to myaccount: rent",
    "fired_at": "2026-11-22T10:00:00Z",
    "event": EVENT,
}
BODY = orjson.dumps(PAYLOAD)
HEADERS = {"Content-Type": "application/json", "Idempotency-Key": str(PAYLOAD["id"])}


# --- the server (its own process) -------------------------------------------------------


def serve(conn: Connection) -> None:
    """Run the receiver; send its port through ``conn``; stop when ``conn`` says so."""

    async def receive(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(text="ok")

    async def main() -> None:
        app = web.Application()
        app.router.add_post("/hook", receive)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        conn.send(runner.addresses[0][1])
        # Block in a thread so the loop keeps serving until the parent says stop.
        await asyncio.get_running_loop().run_in_executor(None, conn.recv)
        await runner.cleanup()

    asyncio.run(main())


# --- the clients ------------------------------------------------------------------------

Post = Callable[[], Awaitable[None]]


@dataclass
class Result:
    client: str
    version: str
    requests: int
    cpu_us_per_post: float
    wall_rate_per_s: float


async def measure(post: Post, n: int, rounds: int) -> tuple[float, float]:
    """Median CPU seconds per POST and median POSTs per wall second over ``rounds``."""
    for _ in range(WARMUP):
        await post()
    cpu, rate = [], []
    for _ in range(rounds):
        cpu0, wall0 = time.process_time(), time.perf_counter()
        for _ in range(n):
            await post()
        cpu1, wall1 = time.process_time(), time.perf_counter()
        cpu.append((cpu1 - cpu0) / n)
        rate.append(n / (wall1 - wall0))
    return statistics.median(cpu), statistics.median(rate)


async def bench_aiohttp(url: str, n: int, rounds: int) -> Result:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=4)) as session:

        async def post() -> None:
            async with session.post(url, data=BODY, headers=HEADERS) as resp:
                await resp.read()
                if resp.status != 200:
                    raise RuntimeError(f"HTTP {resp.status}")

        cpu, rate = await measure(post, n, rounds)
    return Result("aiohttp", aiohttp.__version__, n, cpu * 1e6, rate)


async def bench_httpx(url: str, n: int, rounds: int) -> Result | None:
    try:
        import httpx  # type: ignore[import-not-found, unused-ignore]
    except ImportError:
        print("httpx is not importable: skipped (pip install httpx in a scratch venv)")
        return None
    limits = httpx.Limits(max_connections=4)
    async with httpx.AsyncClient(limits=limits) as client:

        async def post() -> None:
            resp = await client.post(url, content=BODY, headers=HEADERS)
            if resp.status_code != 200:
                raise RuntimeError(f"HTTP {resp.status_code}")

        cpu, rate = await measure(post, n, rounds)
    return Result("httpx", httpx.__version__, n, cpu * 1e6, rate)


async def bench_tocsin(url: str, n: int, rounds: int) -> Result | None:
    try:
        from tocsin import Alert, __version__
        from tocsin_builtin.webhook import WebhookAction, WebhookConfig
    except ImportError:
        return None
    config = WebhookConfig.model_validate(
        {"plugin": "webhook", "url": url, "secret": "bench-secret-0123"}
    )
    action = WebhookAction("bench", config)
    alert = Alert(**PAYLOAD)
    await action.start()
    try:

        async def post() -> None:
            await action.deliver(alert, "")

        cpu, rate = await measure(post, n, rounds)
    finally:
        await action.aclose()
    return Result("tocsin webhook (aiohttp + signing)", __version__, n, cpu * 1e6, rate)


async def run(url: str, n: int, rounds: int) -> list[Result]:
    results = [await bench_aiohttp(url, n, rounds)]
    for bench in (bench_httpx, bench_tocsin):
        result = await bench(url, n, rounds)
        if result is not None:
            results.append(result)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, default=3000, help="POSTs per round (default 3000)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds; the median is kept")
    parser.add_argument("--json", metavar="PATH", help="also write the results there")
    args = parser.parse_args(argv)

    ctx = multiprocessing.get_context("spawn")  # no fork of this process's state
    parent, child = ctx.Pipe()
    server = ctx.Process(target=serve, args=(child,), daemon=True)
    server.start()
    try:
        if not parent.poll(30):
            print("the server did not start", file=sys.stderr)
            return 1
        url = f"http://127.0.0.1:{parent.recv()}/hook"
        results = asyncio.run(run(url, args.n, args.rounds))
    finally:
        parent.send("stop")
        server.join(10)
        if server.is_alive():
            server.terminate()

    print(f"Python {platform.python_version()} on {platform.machine()}, body {len(BODY)} bytes,")
    print(f"{args.n} sequential POSTs x {args.rounds} rounds (median), server in another process")
    print(f"{'client':38} {'version':>8} {'CPU us/POST':>12} {'POST/s':>9}")
    for r in results:
        print(f"{r.client:38} {r.version:>8} {r.cpu_us_per_post:12.1f} {r.wall_rate_per_s:9.0f}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as out:
            json.dump([asdict(r) for r in results], out, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
