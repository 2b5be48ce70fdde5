"""Provider faults (issue 5, fault 5): a reset connection, a half-open one (TCP open, no
frames), an oversized frame, malformed JSON and a 10x burst are detected, counted and
reconnected, and the daemon stays up and keeps alerting."""

from __future__ import annotations

import signal
import socket
from collections.abc import Callable

from tocsin_eospark import EOSParkEmulator
from tocsin_eospark.protocol import MAX_FRAME

from .harness import (
    ME,
    DaemonProcess,
    Hook,
    NotifySocket,
    Traffic,
    config_text,
    wait_for,
)

RULES = f"""
[[rules]]
name = "incoming"
source = "eos"
type = "action"
match = {{ contract = "eosio.token", action = "transfer", "args.to" = "{ME}" }}
actions = ["hook"]
group_by = ["trx_id"]

[[rules]]
name = "source trouble"
type = ["source.down", "source.stale"]
actions = ["hook"]
title = "{{{{ source }}}}: {{{{ reason }}}}"
"""


async def test_provider_faults_are_detected_counted_and_survived(
    emulator: EOSParkEmulator,
    hook: Hook,
    notify: NotifySocket,
    daemon: Callable[..., DaemonProcess],
) -> None:
    text = config_text(emulator, {"hook": hook}, stale_after="1s", rules=RULES)
    tocsin = daemon(text, watchdog_usec=1_000_000)
    tocsin.start()
    await notify.wait("READY")
    await wait_for(lambda: emulator.subscribed, what="the subscription")
    traffic = Traffic(emulator)

    async def still_alerting() -> None:
        trx = await traffic.push()
        await wait_for(
            lambda: any(h.body["event"]["data"].get("trx_id") == trx for h in hook.hits),
            what=f"the alert of {trx[:8]}",
        )

    async def reconnected(n: int) -> None:
        await wait_for(lambda: emulator.accepted == n and emulator.subscribed, what="a reconnect")

    # Malformed JSON: counted and skipped; the connection stays.
    await emulator.push_raw("{not json")
    await tocsin.wait_log("frame rejected: malformed frame")
    await still_alerting()
    assert emulator.accepted == 1

    # Connection reset (TCP cut, no close frame).
    await emulator.drop_connections(abort=True)
    await tocsin.wait_log("source 'eos' is down: connection lost")
    await reconnected(2)
    await still_alerting()

    # Half-open: the TCP connection stays, no frame comes (no heartbeat either).
    emulator.stop_heartbeats()
    await tocsin.wait_log("source 'eos' is stale: nothing received for 1s")
    await reconnected(3)
    await still_alerting()

    # A frame over the 1 MiB limit: counted, and the connection is reopened.
    await emulator.push_raw("x" * (MAX_FRAME + 1))
    await tocsin.wait_log("frame rejected: oversized frame")
    await tocsin.wait_log("a frame over the size limit closed the connection")
    await reconnected(4)
    await still_alerting()

    # A 10x burst: 500 transactions at once (the stream above is one at a time).
    sent = len(traffic.sent)
    for _ in range(500):
        await traffic.push(frm="burster")
    assert len(traffic.sent) == sent + 500
    await wait_for(
        lambda: len(set(hook.ok_keys())) >= len(traffic.sent) + 3,
        within=30,
        what="every alert of the burst",
    )
    assert emulator.accepted == 4  # the burst cost no reconnect

    status = await notify.wait_status("2 frames rejected, 3 reconnects")
    assert status.startswith("1/1 sources connected")
    titles = sorted(h.body["title"] for h in hook.hits if h.body["rule"] == "source trouble")
    assert titles == [
        "eos: a frame over the size limit closed the connection",
        "eos: connection lost",
        "eos: nothing received for 1s",
    ]
    assert tocsin.alive()
    tocsin.signal(signal.SIGTERM)
    assert await tocsin.wait_exit(15) == 0


async def test_a_source_that_cannot_connect_does_not_hold_up_the_others(
    emulator: EOSParkEmulator,
    hook: Hook,
    notify: NotifySocket,
    daemon: Callable[..., DaemonProcess],
) -> None:
    text = config_text(emulator, {"hook": hook})
    # A first source whose provider refuses connections (nothing listens on its port).
    away = f"""
[sources.away]
plugin = "eospark"
url = "ws://127.0.0.1:{closed_port()}/v1/ws"
api_key = {{ env = "EOSPARK_KEY" }}
subscriptions = [{{ account = "{ME}", contract = "eosio.token", action = "transfer" }}]
"""
    tocsin = daemon(text.replace("[sources.eos]", away + "\n[sources.eos]"))
    tocsin.start()
    await tocsin.wait_log("source 'away' is down: cannot connect")
    # Once the first source has failed, the second should be connecting, not waiting 5 s.
    await wait_for(lambda: emulator.subscribed, within=2.5, what="the other source")


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
