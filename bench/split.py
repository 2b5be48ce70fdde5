"""A probe for issue 7, outside ``make bench``: the ceiling of a receive-only process split.

    python bench/split.py [--rounds 4] [--frames 40000]

Two clients take turns against the same generator (``bench/generator.py``) as in
``make bench``, and each round prints their rates and the ratio:

- the floor (``bench/floor.py``): websockets receiving, ``parse_json`` decoding;
- the split: a child process receives with the same websockets client and hands the raw
  frames, batched, over a pipe; this process decodes, normalizes and matches them with
  what the daemon uses (``parse_frame``, ``transaction_events``, the ``Engine`` with 1,000
  ``match`` rules, 1% of the frames matching). No store, no delivery, no event loop on
  this side: a ceiling for a daemon built that way, not a measure of one;
- the Sans-I/O floor: the floor's work (receive, ``parse_json``) in one process, but
  receiving through ``websockets``' Sans-I/O layer (``ClientProtocol`` under an asyncio
  ``Protocol``, every frame of a read handled at once) instead of its asyncio client's
  ``recv()``, with the same handshake, extensions and text decoding: what a receive loop
  of tocsin's own on the same library would cost.

docs/performance.md ("What 70% would take") quotes it.
"""

from __future__ import annotations

import argparse
import asyncio
import fcntl
import json
import os
import statistics
import struct
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio
from run import PY, Generator, config_text, floor
from tocsin_eospark.protocol import MAX_FRAME, Transaction, parse_frame, subscribe_message
from tocsin_eospark.source import transaction_events

from tocsin import Event, RecentIds, parse_json
from tocsin.config import load_config
from tocsin.plugins import build_registry, make_plugin_manager
from tocsin.rules import Engine, compile_rules

LENGTH = struct.Struct("<I")
FLUSH_AT = 128  # frames per write at most; fewer when websockets has no more queued
PIPE_SIZE = 1 << 20  # the pipe holds a few thousand frames: the child need not wait


def receive(url: str, frames: int, out: int) -> None:
    """The child: receive ``frames`` data frames (and what comes with them), forward all."""
    from websockets.asyncio.client import connect

    async def main() -> None:
        async with connect(
            url, additional_headers={"apikey": "bench-key"}, max_size=MAX_FRAME
        ) as ws:
            await ws.send(subscribe_message(["benchsender1"], ["eosio.token"], "transfer"))
            # websockets' queue of frames received but not yet read: a private attribute,
            # read only to flush a batch as soon as nothing more is waiting.
            queued = ws.recv_messages.frames
            batch: list[bytes] = []
            forwarded = 0
            while forwarded <= frames:  # the data frames and the subscription's ack
                raw = await ws.recv(decode=False)
                batch += (LENGTH.pack(len(raw)), raw)
                forwarded += 1
                if len(batch) >= 2 * FLUSH_AT or not len(queued) or forwarded > frames:
                    os.write(out, b"".join(batch))
                    batch = []

    asyncio.run(main())


class Matcher:
    """This side: the daemon's decoding, normalization and matching, nothing else."""

    def __init__(self, rules: int) -> None:
        registry = build_registry(make_plugin_manager())
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "tocsin.toml"
            path.write_text(config_text("ws://127.0.0.1:1/", 1, rules, False))
            self.engine = Engine(compile_rules(load_config(str(path), registry), registry))
        self.recent = RecentIds()

    def event(self, type: str, data: dict[str, Any], *, id: str, time: str = "") -> Event:
        return Event(id, "eos", "eospark", type, data, time, False)

    def sift(self, type: str, data: dict[str, Any]) -> bool:
        return True  # this probe measures every event through the engine, as it was

    def run(self, pipe: int, frames: int) -> tuple[float, float, int]:
        """Handle ``frames`` data frames: (monotonic end, CPU seconds, alerts)."""
        seen = alerts = 0
        pending = b""
        cpu = time.process_time()
        while seen < frames:
            chunk = os.read(pipe, 1 << 20)
            if not chunk:
                raise SystemExit("the receiving process ended early")
            data = pending + chunk if pending else chunk
            at, end = 0, len(data)
            while at + 4 <= end:
                (size,) = LENGTH.unpack_from(data, at)
                if at + 4 + size > end:
                    break
                msg = parse_frame(data[at + 4 : at + 4 + size])
                at += 4 + size
                if isinstance(msg, Transaction):
                    seen += 1
                    for event in transaction_events(msg, self.recent, self):
                        alerts += len(self.engine.process(event))
            pending = data[at:]
        return time.monotonic(), time.process_time() - cpu, alerts


class SansIO(asyncio.Protocol):
    """The Sans-I/O floor's connection: the floor's handshake and subscription, then
    ``parse_json`` on every data frame, in ``data_received``."""

    def __init__(self, url: str, frames: int, done: asyncio.Future[tuple[float, float]]):
        from websockets.client import ClientProtocol
        from websockets.extensions.permessage_deflate import enable_client_permessage_deflate
        from websockets.uri import parse_uri

        # What the floor's connect() offers by default: permessage-deflate (the generator's
        # frames are not compressed, but every frame is checked for it, as in the floor).
        extensions = enable_client_permessage_deflate(None)
        self.ws = ClientProtocol(parse_uri(url), extensions=extensions, max_size=MAX_FRAME)
        self.frames, self.done, self.seen, self.cpu = frames, done, 0, 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        request = self.ws.connect()
        request.headers["apikey"] = "bench-key"
        self.ws.send_request(request)
        self.flush()

    def flush(self) -> None:
        for data in self.ws.data_to_send():
            if data:
                self.transport.write(data)

    def data_received(self, data: bytes) -> None:
        from websockets.frames import Frame, Opcode

        self.ws.receive_data(data)
        for event in self.ws.events_received():
            if not isinstance(event, Frame):  # the handshake's response
                message = subscribe_message(["benchsender1"], ["eosio.token"], "transfer")
                self.ws.send_text(message.encode())
                self.cpu = time.process_time()  # from the subscription, as the floor
            elif (
                event.opcode is Opcode.TEXT  # decoded to text first, as recv() does
                and parse_json(event.data.decode()).get("msg_type") == "data"
            ):
                self.seen += 1
                if self.seen == self.frames:
                    self.done.set_result((time.monotonic(), time.process_time() - self.cpu))
        self.flush()


def sansio_client(url: str, frames: int) -> None:
    """``python split.py --sansio URL FRAMES``: one Sans-I/O floor run, as JSON."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        done: asyncio.Future[tuple[float, float]] = loop.create_future()
        host, _, port = url.split("/")[2].partition(":")
        transport, _ = await loop.create_connection(
            lambda: SansIO(url, frames, done), host, int(port)
        )
        t1, cpu = await done
        transport.close()
        print(json.dumps({"t1": t1, "cpu": cpu}))

    asyncio.run(main())


def split_client(url: str, frames: int) -> None:
    """``python split.py --client URL FRAMES``: one split run, its result as JSON."""
    matcher = Matcher(1000)  # before the child starts: the clock runs from the subscription
    read, write = os.pipe()
    fcntl.fcntl(write, fcntl.F_SETPIPE_SZ, PIPE_SIZE)  # Linux; 64 KiB by default
    pid = os.fork()
    if pid == 0:
        os.close(read)
        try:
            receive(url, frames, write)
        finally:
            os._exit(0)
    os.close(write)
    t1, cpu, alerts = matcher.run(read, frames)
    _, _, usage = os.wait4(pid, 0)
    child_cpu = usage.ru_utime + usage.ru_stime
    print(json.dumps({"t1": t1, "cpu": cpu, "child_cpu": child_cpu, "alerts": alerts}))


async def client_run(mode: str, frames: int) -> dict[str, Any]:
    """One run of ``python split.py MODE URL FRAMES`` against a fresh generator."""
    gen = Generator(frames)
    try:
        out = await anyio.run_process([PY, __file__, mode, gen.url, str(frames)])
        client = json.loads(out.stdout)
        sent = await gen.result()
    finally:
        gen.close()
    result = {
        "events_per_s": frames / (client["t1"] - sent["t0"]),
        "cpu_us_per_event": client["cpu"] / frames * 1e6,
    }
    if mode == "--client":
        result["child_cpu_us_per_event"] = client["child_cpu"] / frames * 1e6
        result["alerts"] = client["alerts"]
    return result


async def main(args: argparse.Namespace) -> None:
    ratios, sansio_ratios = [], []
    for round_ in range(args.rounds):
        low = await floor(args.frames)
        high = await client_run("--client", args.frames)
        sansio = await client_run("--sansio", args.frames)
        ratio = high["events_per_s"] / low["events_per_s"]
        ratios.append(ratio)
        sansio_ratios.append(sansio["events_per_s"] / low["events_per_s"])
        print(
            f"round {round_ + 1}: floor {low['events_per_s']:,.0f} events/s"
            f" ({low['cpu_us_per_event']:.1f} us CPU per event),"
            f" split {high['events_per_s']:,.0f} events/s ({ratio:.0%});"
            f" CPU per event: matching {high['cpu_us_per_event']:.1f} us,"
            f" receiving {high['child_cpu_us_per_event']:.1f} us; {high['alerts']} alerts;"
            f" Sans-I/O floor {sansio['events_per_s']:,.0f} events/s"
            f" ({sansio['cpu_us_per_event']:.1f} us CPU per event)",
            flush=True,
        )
    print(f"median split/floor: {statistics.median(ratios):.0%}")
    print(f"median Sans-I/O floor/floor: {statistics.median(sansio_ratios):.0%}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--client"]:
        split_client(sys.argv[2], int(sys.argv[3]))
    elif sys.argv[1:2] == ["--sansio"]:
        sansio_client(sys.argv[2], int(sys.argv[3]))
    else:
        parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
        parser.add_argument("--rounds", type=int, default=4)
        parser.add_argument("--frames", type=int, default=40_000)
        anyio.run(main, parser.parse_args())
