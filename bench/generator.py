"""The load generator of ``make bench``: the EOSPark emulator pushing pre-encoded frames.

    python bench/generator.py --frames 30000 [--rate 0] [--match-every 100] [--rules 1000]

Runs in its own process on 127.0.0.1 (a free port). Prints ``{"port": N}`` once it
listens, waits for a client to subscribe (the daemon's EOSPark source, or the floor
loop: both do the real handshake), pushes ``--frames`` data frames as fast as the client
takes them (``--rate 0``) or at ``--rate`` frames per second, prints ``{"sent": n,
"t0": start, "t1": end, "cpu": seconds}`` (``time.monotonic()``, which is one clock for
every process on Linux; ``cpu`` is the generator's own CPU time from t0 to t1), and keeps
serving until its stdin closes.

Every frame is a distinct EOS transaction of about 500 bytes with one ``eosio.token``
transfer. Every ``--match-every``-th one is to an account a rule watches (``account(i)``,
``i < --rules``) and carries its send time in the memo, so the receiver can measure the
latency; the others go to ``nobody``. The generator must be cheaper than any client it
measures, or the floor measures the generator: frames that match nothing are encoded
before the clock starts, down to the bytes of the WebSocket frame, and written straight
to the connection's transport, 64 to a write when pushing flat out (one by one when
paced, as a feed's frames arrive), under the connection's flow control. Sent through
``websockets``' ``send()``, with permessage-deflate, a frame cost the generator 16-24 us
of CPU, as much as the floor loop took to receive it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import anyio
from tocsin_eospark.emulator import EOSParkEmulator, transaction, transfer
from tocsin_eospark.protocol import data_frame
from websockets.frames import Frame, Opcode

CHUNK = 64
"""Frames per write when pushing flat out."""

MEMO = "invoice 2026-11-22 for hosting, thanks! ref "


def account(i: int) -> str:
    """The EOS name of watched account ``i``: ``acct`` and ``i`` in base 5 over 1-5."""
    digits = ""
    while True:
        i, d = divmod(i, 5)
        digits = "12345"[d] + digits
        if not i:
            return "acct" + digits


def frame(i: int, to: str, memo: str) -> str:
    """One data frame: a transfer of ``i`` units to ``to`` (~500 bytes)."""
    trx = transaction(
        [transfer("benchsender1", to, f"{i % 1000}.{i % 10000:04d} EOS", memo)],
        trx_id=f"{i:064x}",
        block_num=300_000_000 + i // 50,
        timestamp="2026-11-22T10:00:00.000",
    )
    return data_frame(trx)


def wire(text: str) -> bytes:
    """``text`` as one WebSocket text frame from a server: unmasked and uncompressed.

    A connection that negotiated permessage-deflate may still carry a message
    uncompressed (RSV1 clear), and every client measured decodes it the same way.
    """
    return Frame(Opcode.TEXT, text.encode()).serialize(mask=False)


def stamped(i: int, rules: int, match_every: int) -> str:
    """A matching frame, its memo holding the send time (monotonic seconds).

    The n-th matching frame goes to rule ``n % rules``: the matches spread over every rule
    (``i % rules`` would put all of them on one rule whenever ``rules`` divides
    ``match_every``, and deliveries of one rule reach the webhook one after the other).
    """
    return frame(i, account(i // match_every % rules), f"t={time.monotonic():.6f}")


async def pump(emu: EOSParkEmulator, args: argparse.Namespace) -> None:
    plain = [
        None if i % args.match_every == 0 else wire(frame(i, "nobody", MEMO + str(i)))
        for i in range(args.frames)
    ]
    while not emu.subscribed:  # noqa: ASYNC110  # the emulator exposes a count, not an event
        await anyio.sleep(0.01)
    (client,) = [c for c in emu.clients.values() if c.subs]
    ws = client.ws
    per_write = 1 if args.rate else CHUNK
    slot = max(1, args.rate // 100) if args.rate else 0
    pending: list[bytes] = []
    t0 = time.monotonic()
    cpu0 = time.process_time()
    for i, data in enumerate(plain):
        pending.append(data or wire(stamped(i, args.rules, args.match_every)))
        if len(pending) == per_write or i == len(plain) - 1:
            ws.transport.write(b"".join(pending))
            pending.clear()
            await ws.drain()  # waits only while the transport's buffer is over its limit
        if slot and i % slot == slot - 1:
            # Paced: ``slot`` frames per 10 ms, catching up if a slot ran late.
            due = t0 + (i + 1) / args.rate
            delay = due - time.monotonic()
            if delay > 0:
                await anyio.sleep(delay)
    t1 = time.monotonic()
    cpu = time.process_time() - cpu0
    print(json.dumps({"sent": len(plain), "t0": t0, "t1": t1, "cpu": cpu}), flush=True)


async def main(args: argparse.Namespace) -> None:
    emu = EOSParkEmulator(
        api_keys=["bench-key"], heartbeat_interval=10.0, first_heartbeat=10.0, max_accounts=5
    )
    async with emu, anyio.create_task_group() as tg:
        print(json.dumps({"port": emu.port}), flush=True)
        tg.start_soon(pump, emu, args)
        # Serve until the orchestrator closes our stdin.
        await anyio.to_thread.run_sync(sys.stdin.read)
        tg.cancel_scope.cancel()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=30_000)
    parser.add_argument("--rate", type=int, default=0, help="frames per second; 0 = max")
    parser.add_argument("--match-every", type=int, default=100)
    parser.add_argument("--rules", type=int, default=1000)
    anyio.run(main, parser.parse_args())
