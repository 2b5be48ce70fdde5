"""A failing webhook receiver (issue 5, fault 4): 500s, 429 with ``Retry-After``, hanging.

Meanwhile another action gets its alerts (a slow action only slows itself), the backlog
waits on disk (the daemon's memory does not grow with it), and once the receiver is
back every alert arrives.
"""

from __future__ import annotations

from collections.abc import Callable

from tocsin_eospark import EOSParkEmulator

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

BACKLOG = 1000  # alerts per round; two rounds wait for the failing receiver
CHUNK = 100
MEMO = "x" * 4096  # a fat alert (~12 KB of JSON with its hex_data): memory would show it

RULES = f"""
[[rules]]
name = "bulk"
source = "eos"
type = "action"
match = {{ contract = "eosio.token", action = "transfer", "args.to" = "{ME}", "args.from" = "bulker" }}
actions = ["slow"]
group_by = ["trx_id"]

[[rules]]
name = "probe"
source = "eos"
type = "action"
match = {{ contract = "eosio.token", action = "transfer", "args.to" = "{ME}", "args.from" = "prober" }}
actions = ["slow", "fast"]
group_by = ["trx_id"]
"""


async def test_a_failing_receiver_delays_only_itself_and_gets_everything_later(
    emulator: EOSParkEmulator,
    notify: NotifySocket,
    state: StateDB,
    daemon: Callable[..., DaemonProcess],
) -> None:
    async with Hook() as slow, Hook() as fast:
        tocsin = daemon(
            config_text(emulator, {"slow": slow, "fast": fast}, rules=RULES, timeout="1s")
        )
        tocsin.start()
        await notify.wait("READY")
        await wait_for(lambda: emulator.subscribed, what="the subscription")
        traffic = Traffic(emulator)
        probes: list[str] = []

        async def probe_reaches_fast() -> None:
            probes.append(await traffic.push(frm="prober"))
            await wait_for(lambda: len(fast.ok_keys()) == len(probes), what="the probe at fast")

        # 500s: the slow receiver refuses, the fast one gets its probe meanwhile.
        slow.mode = 500
        await probe_reaches_fast()
        await wait_for(lambda: len(slow.hits) >= 3, what="a few 500s")
        # A backlog: two rounds of fat alerts the slow receiver refuses; memory stays flat.
        rss = []
        for _ in range(2):
            for _ in range(BACKLOG // CHUNK):
                # In chunks, each committed before the next: what the daemon holds for a
                # moment (a batch in the intake stream) stays small next to the backlog.
                for _ in range(CHUNK):
                    await traffic.push(frm="bulker", memo=MEMO)
                await wait_for(
                    lambda: state.count(0) >= len(traffic.sent), what="the backlog on disk"
                )
            rss.append(tocsin.rss_kib())
        print(f"RSS with a backlog of {BACKLOG}: {rss[0]} KiB; of {2 * BACKLOG}: {rss[1]} KiB")
        (size,) = state.conn.execute("SELECT AVG(LENGTH(payload)) FROM alerts").fetchone()
        assert size > 12_000
        # Holding the second round in memory would take more than 12 MB (1000 x 12 KB).
        assert rss[1] - rss[0] < 6 * 1024, rss

        # 429 with Retry-After: 1, then hanging (the action's timeout is 1 s).
        slow.mode = 429
        await probe_reaches_fast()
        await wait_for(lambda: any(h.status == 429 for h in slow.hits), what="a 429")
        slow.hold()
        await probe_reaches_fast()
        await wait_for(slow.held, what="a held request")
        assert slow.ok_keys() == []  # the slow receiver has taken nothing so far

        slow.release(503)  # the daemon gave up on the held requests after its 1 s timeout
        expected = set(state.alert_ids())
        assert len(expected) == 2 * BACKLOG + len(probes)
        await wait_for(
            lambda: set(slow.ok_keys()) == expected, within=40, what="every alert at slow"
        )
        assert set(fast.ok_keys()) <= expected
        assert len(fast.ok_keys()) == len(probes) == 3
        await wait_for(lambda: state.count(0) == 0, what="an empty outbox")
        assert state.count(2) == 0  # nothing dead-lettered
        # Retry-After: 1 was honoured, above the action's max_backoff of 200 ms.
        for i, hit in enumerate(slow.hits):
            if hit.status == 429:
                again = next(h for h in slow.hits[i + 1 :] if h.key == hit.key)
                assert again.at - hit.at >= 0.9
