"""SIGTERM and SIGHUP on a running daemon (issue 5, faults 7 and 8)."""

from __future__ import annotations

import re
import signal
import time
from collections.abc import Callable

from tocsin_eospark import EOSParkEmulator
from tocsin_eospark.protocol import action_id

from .harness import (
    ME,
    DaemonProcess,
    Hook,
    NotifySocket,
    StateDB,
    Traffic,
    config_text,
    wait_for,
)

PENDING, DONE = 0, 1


async def test_sigterm_stops_intake_and_lets_the_inflight_delivery_finish(
    emulator: EOSParkEmulator,
    hook: Hook,
    notify: NotifySocket,
    state: StateDB,
    daemon: Callable[..., DaemonProcess],
) -> None:
    tocsin = daemon(config_text(emulator, {"hook": hook}, drain="10s"))
    tocsin.start()
    await notify.wait("READY")
    await wait_for(lambda: emulator.subscribed, what="the subscription")
    hook.hold()
    await Traffic(emulator).push()
    (held,) = await wait_for(hook.held, what="the delivery in flight")

    tocsin.signal(signal.SIGTERM)
    sent = time.monotonic()
    await notify.wait("STOPPING")
    stopping = next(m for m in notify.messages if "STOPPING" in m)
    assert stopping["STATUS"] == (
        "stopping: intake closed, 1 deliveries in flight, draining for up to 10s"
    )
    await wait_for(lambda: not emulator.clients, what="the source to disconnect")
    await Traffic(emulator, "late").push()
    assert emulator.pushed == 1  # no client took the late one: intake is closed
    assert tocsin.alive()  # still draining: the delivery is in flight

    hook.release()
    assert await tocsin.wait_exit(15) == 0
    assert time.monotonic() - sent < 10  # it finished: no need to wait out the drain
    assert state.states() == {held.key: DONE}
    assert len(state.alert_ids()) == 1


async def test_sigterm_with_a_hanging_receiver_exits_0_after_the_drain_and_keeps_it_queued(
    emulator: EOSParkEmulator,
    hook: Hook,
    notify: NotifySocket,
    state: StateDB,
    daemon: Callable[..., DaemonProcess],
) -> None:
    tocsin = daemon(config_text(emulator, {"hook": hook}, drain="1s", timeout="30s"))
    tocsin.start()
    await notify.wait("READY")
    await wait_for(lambda: emulator.subscribed, what="the subscription")
    hook.hold()
    traffic = Traffic(emulator)
    for _ in range(3):
        await traffic.push()
    held = await wait_for(lambda: len(hook.held()) == 3 and hook.held(), what="3 in flight")

    tocsin.signal(signal.SIGTERM)
    sent = time.monotonic()
    assert await tocsin.wait_exit(15) == 0
    took = time.monotonic() - sent
    assert 1 <= took < 1 + 3, took  # the drain timeout, and little more
    assert state.states() == {h.key: PENDING for h in held}  # kept for the next start
    assert "Traceback" not in tocsin.output()

    hook.release(503)  # those answers go nowhere
    tocsin.start()
    await wait_for(lambda: len(hook.ok_keys()) == 3, what="the queued deliveries")
    assert set(hook.ok_keys()) == {h.key for h in held}


async def test_sigterm_drains_the_events_already_received(
    emulator: EOSParkEmulator,
    hook: Hook,
    notify: NotifySocket,
    state: StateDB,
    daemon: Callable[..., DaemonProcess],
) -> None:
    tocsin = daemon(config_text(emulator, {"hook": hook}, drain="10s"), watchdog_usec=1_000_000)
    tocsin.start()
    await notify.wait("READY")
    await wait_for(lambda: emulator.subscribed, what="the subscription")
    traffic = Traffic(emulator)
    # Hold the engine on its first commit (the test has the write lock), so that the next
    # events wait in the intake stream: received by the daemon, not yet evaluated. The
    # engine must have taken the first event alone before the others come: pushed
    # together, two of them could reach one batch, and the intake would never hold five.
    state.lock()
    await traffic.push()
    await wait_for(
        lambda: any(re.search(r"intake 0 waiting, lag (?!0\.0s)", s) for s in notify.statuses()),
        what="the engine held on its first commit (a lag of 0.1s or more)",
    )
    for _ in range(5):
        await traffic.push()
    await notify.wait_status("intake 5 waiting")

    tocsin.signal(signal.SIGTERM)
    await notify.wait("STOPPING")
    state.unlock()  # the engine could go on now, well within the 10 s drain
    assert await tocsin.wait_exit(15) == 0
    assert len(state.alert_ids()) == 6, "events received before SIGTERM were dropped"


RULES = f"""
[[rules]]
name = "incoming"
source = "eos"
type = "action"
match = {{ contract = "eosio.token", action = "transfer", "args.to" = "{ME}" }}
actions = ["hook"]
group_by = ["args.from"]
throttle = "1h"
"""

NEW_RULE = f"""
[[rules]]
name = "from carol"
source = "eos"
type = "action"
match = {{ "args.from" = "carol", "args.to" = "{ME}" }}
actions = ["hook"]
"""


async def test_sighup_reloads_keeping_connections_and_rule_state_and_refuses_a_bad_file(
    emulator: EOSParkEmulator,
    hook: Hook,
    notify: NotifySocket,
    state: StateDB,
    daemon: Callable[..., DaemonProcess],
) -> None:
    text = config_text(emulator, {"hook": hook}, rules=RULES)
    tocsin = daemon(text)
    tocsin.start()
    await notify.wait("READY")
    await wait_for(lambda: emulator.subscribed, what="the subscription")
    traffic = Traffic(emulator)

    def fired() -> dict[str, list[str]]:
        """The rules that fired, by transaction."""
        out: dict[str, list[str]] = {}
        for rule, event_id in state.conn.execute("SELECT rule, event_id FROM alerts"):
            out.setdefault(trx_of[event_id], []).append(rule)
        return {trx: sorted(rules) for trx, rules in out.items()}

    trx_of: dict[str, str] = {}

    async def push(frm: str) -> str:
        trx = await traffic.push(frm=frm)
        trx_of[action_id(trx, 0)] = trx
        return trx

    async def settled(last: str) -> dict[str, list[str]]:
        # Events are evaluated in order: once the last one's alert is committed, those
        # before it have been evaluated too (and fired or not).
        found: dict[str, list[str]] = await wait_for(
            lambda: last in fired() and fired(), what=f"the alert of {last[:8]}"
        )
        return found

    a1 = await push("alice")
    a2 = await push("alice")  # throttled: one alert per sender per hour
    b1 = await push("bob")
    assert await settled(b1) == {a1: ["incoming"], b1: ["incoming"]}

    tocsin.config.write_text(text + NEW_RULE, encoding="utf-8")
    tocsin.signal(signal.SIGHUP)
    await tocsin.wait_log("config reloaded: 2 rule(s)")
    await notify.wait("READY", n=2)
    reloading = next(m for m in notify.messages if "RELOADING" in m)
    assert abs(int(reloading["MONOTONIC_USEC"]) - time.monotonic_ns() // 1000) < 60_000_000
    assert emulator.accepted == 1 and emulator.connections == 1  # the unchanged source stayed

    a3 = await push("alice")  # still throttled: the rule's state survived the reload
    c1 = await push("carol")  # the new rule fires (and "incoming", for a new sender)
    assert (await settled(c1)).keys() == {a1, b1, c1}
    assert fired()[c1] == ["from carol", "incoming"]
    assert a2 not in fired() and a3 not in fired()

    tocsin.config.write_text(text + NEW_RULE + "\n[[rules]]\nname = 1\n", encoding="utf-8")
    tocsin.signal(signal.SIGHUP)
    await tocsin.wait_log("reload refused, the running config stays")
    await notify.wait("READY", n=3)
    await notify.wait_status("the last reload was refused (see the log)")
    assert "rules[2]" in tocsin.run_output()  # the problem is named
    named = [line for line in tocsin.run_output().splitlines() if "rules[2]" in line]
    assert named and all(" ERROR tocsin.daemon: reload refused: " in line for line in named)

    c2 = await push("carol")  # the running config (with "from carol") goes on
    assert (await settled(c2))[c2] == ["from carol"]  # "incoming": carol is throttled
    assert emulator.accepted == 1 and emulator.connections == 1
    await wait_for(lambda: len(hook.ok_keys()) == 5, what="every alert delivered")

    tocsin.signal(signal.SIGTERM)
    assert await tocsin.wait_exit(15) == 0


async def test_sighup_with_a_file_that_is_not_utf8_is_refused(
    emulator: EOSParkEmulator,
    hook: Hook,
    notify: NotifySocket,
    daemon: Callable[..., DaemonProcess],
) -> None:
    tocsin = daemon(config_text(emulator, {"hook": hook}))
    tocsin.start()
    await notify.wait("READY")
    await wait_for(lambda: emulator.subscribed, what="the subscription")
    tocsin.config.write_bytes(tocsin.config.read_bytes() + b"\n# caf\xe9\n")
    tocsin.signal(signal.SIGHUP)
    await wait_for(
        lambda: "reload refused" in tocsin.run_output() or not tocsin.alive(),
        what="the reload to be refused",
    )
    assert tocsin.alive(), tocsin.run_output()[-2000:]
    await Traffic(emulator).push()  # the old config keeps running
    await wait_for(hook.ok_keys, what="an alert after the refused reload")


async def test_sighup_during_start_up_reloads_once_the_daemon_is_ready(
    emulator: EOSParkEmulator,
    hook: Hook,
    notify: NotifySocket,
    daemon: Callable[..., DaemonProcess],
) -> None:
    # The source cannot connect, so start-up waits for it (5 s) before READY=1.
    text = config_text(emulator, {"hook": hook}).replace(emulator.url, "ws://127.0.0.1:9/ws")
    tocsin = daemon(text)
    tocsin.start()
    await tocsin.wait_log("source 'eos' is down")  # start-up is waiting for the source
    tocsin.signal(signal.SIGHUP)
    await tocsin.wait_log("config reloaded")
    assert tocsin.alive()
    await notify.wait("READY", n=2)  # the reload's READY=1 follows its log line
    kinds = [
        "RELOADING" if "RELOADING" in m else "READY"
        for m in notify.poll()
        if "READY" in m or "RELOADING" in m
    ]
    # READY=1 of the start-up first, then the reload's RELOADING=1 and READY=1.
    assert kinds[:3] == ["READY", "RELOADING", "READY"]
    output = tocsin.run_output()
    assert output.index("tocsin running") < output.index("config reloaded")
    tocsin.signal(signal.SIGTERM)
    assert await tocsin.wait_exit(within=20) == 0
