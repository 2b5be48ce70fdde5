"""Many ``kill -9``s during a stream of matches (issue 5, fault 3).

After every kill the database passes ``PRAGMA integrity_check``; the receiver checks, for
every request, that the state database has not already marked that delivery done (a key
delivered again after it was recorded as delivered would break the promise); at the end
every committed alert has reached the receiver.

``make test`` runs 12 kills (a few seconds); ``TOCSIN_FAULT_KILLS=50`` (or more) runs the
long version (about 0.6 s per kill).
"""

from __future__ import annotations

import os
import random
import signal
from collections.abc import Callable

import anyio
import pytest
from tocsin_eospark import EOSParkEmulator

from .harness import DaemonProcess, Hit, Hook, NotifySocket, StateDB, Traffic, config_text, wait_for

KILLS = int(os.environ.get("TOCSIN_FAULT_KILLS", "12"))
SEED = int(os.environ.get("TOCSIN_FAULT_SEED", "5"))
DONE = 1


@pytest.mark.timeout(40 + KILLS)
async def test_random_kill9s_during_a_stream_of_matches(
    emulator: EOSParkEmulator,
    hook: Hook,
    notify: NotifySocket,
    state: StateDB,
    daemon: Callable[..., DaemonProcess],
) -> None:
    rng = random.Random(SEED)  # the stream and the receiver's pace
    kill_at = random.Random(SEED)  # when to kill: after this many more requests
    delivered_after_done: list[str] = []
    checker = StateDB(state.path)

    async def check_then_answer(hit: Hit) -> None:
        row = checker.conn.execute(
            "SELECT state FROM outbox WHERE alert_id = ?", (hit.key,)
        ).fetchone()
        if row is not None and row[0] == DONE:
            delivered_after_done.append(hit.key)
        await anyio.sleep(rng.uniform(0, 0.01))  # a receiver of varying speed

    hook.before_answer = check_then_answer
    tocsin = daemon(config_text(emulator, {"hook": hook}, concurrency=8))
    traffic = Traffic(emulator)
    streaming = True

    async def stream() -> None:
        while streaming:
            if emulator.subscribed:
                await traffic.push(frm=rng.choice(["alice", "bob", "carol"]))
            await anyio.sleep(0.004)  # the pace of the stream, not a wait

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(stream)
            for _ in range(KILLS):
                await wait_for(lambda: not emulator.clients, what="the old connection to go")
                tocsin.start()
                await wait_for(lambda: emulator.subscribed, what="the subscription")
                hits = len(hook.hits) + kill_at.randrange(0, 25)
                await wait_for(lambda h=hits: len(hook.hits) >= h, what="more deliveries")
                await tocsin.kill9()
                assert state.integrity() == "ok"
            streaming = False

        # A last run without kills delivers whatever is left, then stops cleanly.
        await wait_for(lambda: not emulator.clients, what="the old connection to go")
        readies = notify.count("READY")
        tocsin.start()
        # Every delivery may already be done by the killed runs: without waiting for READY
        # the SIGTERM below could come before the daemon handles it (and kill it, -15).
        await notify.wait("READY", n=readies + 1)
        await wait_for(
            lambda: state.alert_ids() and state.count(0) == 0,
            within=30,
            what="every delivery done",
        )
        tocsin.signal(signal.SIGTERM)
        assert await tocsin.wait_exit(15) == 0
    finally:
        checker.close()

    alerts = state.alert_ids()
    received = set(hook.ok_keys())
    assert state.integrity() == "ok"
    assert delivered_after_done == []
    assert received == alerts, f"committed alerts lost: {len(alerts - received)}"
    assert set(state.states().values()) == {DONE}
    assert len(alerts) >= KILLS * 5, "the stream was too thin to mean much"
    repeats = len(hook.ok_keys()) - len(received)
    print(f"{KILLS} kills, {len(alerts)} alerts, {repeats} repeated after a crash")
