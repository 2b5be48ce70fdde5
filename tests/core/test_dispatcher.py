from __future__ import annotations

import asyncio
import functools
import sqlite3
import time
from pathlib import Path
from typing import Any

import anyio
import pytest

from support import PushServer, Receiver, running, wait_for, write_config
from tocsin import RetryPolicy, dispatcher
from tocsin import daemon as daemon_module
from tocsin.dispatcher import backoff_delay, next_step
from tocsin.errors import StateError
from tocsin.store import Delivery, Ready, Store


def test_backoff_doubles_with_jitter_up_to_the_cap() -> None:
    policy = RetryPolicy(backoff=1, max_backoff=30)
    for attempts, ceiling in [(1, 1), (2, 2), (3, 4), (5, 16), (6, 30), (40, 30)]:
        for _ in range(50):
            assert ceiling / 2 <= backoff_delay(policy, attempts) <= ceiling


def test_budget_ends_in_dead_letter() -> None:
    policy = RetryPolicy(attempts=3, backoff=1, max_backoff=10, max_age=100)
    assert next_step(policy, 1, created_at=0, now=10, retry_after=None) is not None
    assert next_step(policy, 3, created_at=0, now=10, retry_after=None) is None  # attempts used up
    assert next_step(policy, 1, created_at=0, now=99.9, retry_after=None) is None  # beyond max_age


def test_retry_after_is_honoured_above_max_backoff_within_max_age() -> None:
    policy = RetryPolicy(attempts=10, backoff=1, max_backoff=5, max_age=3600)
    assert next_step(policy, 1, created_at=0, now=0, retry_after=120) == 120
    assert next_step(policy, 1, created_at=0, now=0, retry_after=7200) is None


@pytest.fixture(autouse=True)
def _env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PUSH_TOKEN", "tok-abcdef")


def preamble(server: PushServer) -> str:
    """The daemon and source tables every test here shares."""
    return f"""
[daemon]
state_dir = "state"
drain_timeout = "100ms"
[sources.feed]
plugin = "testpush"
url = "{server.url}"
token = {{ env = "PUSH_TOKEN" }}
"""


async def test_hanging_action_is_bounded_and_does_not_delay_another(tmp_path: Path) -> None:
    hang = asyncio.Event()
    async with (
        PushServer(token="tok-abcdef") as server,
        Receiver(hang=hang) as stuck,
        Receiver() as fine,
    ):
        text = (
            preamble(server)
            + f"""
[actions.stuck]
plugin = "webhook"
url = "{stuck.url()}"
timeout = "30s"
concurrency = 3
[actions.fine]
plugin = "webhook"
url = "{fine.url()}"
[[rules]]
name = "each"
type = "transfer"
group_by = ["n"]
"""
        )
        path = write_config(tmp_path / "t.toml", text)
        async with running(path) as daemon:
            await wait_for(lambda: server.clients)
            for n in range(50):
                await server.push({"id": f"e{n}", "type": "transfer", "data": {"n": n}})
            await wait_for(
                lambda: len(fine.ok()) == 50, what="the healthy action to get everything"
            )
            # the hanging action holds exactly its concurrency in flight; the rest waits on disk
            await wait_for(
                lambda: daemon.dispatcher.inflight == 3, what="only the stuck deliveries in flight"
            )
            assert stuck.requests == []
            hang.set()
            await wait_for(lambda: len(stuck.ok()) == 50, what="the stuck action to catch up")


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """No timed poll of the outbox; the actions whose outbox the dispatcher read, in order."""
    monkeypatch.setattr(dispatcher, "POLL_INTERVAL", 3600.0)
    seen: list[str] = []
    fetch = Store.fetch_ready

    def counted(conn: sqlite3.Connection, action: str, now: float, limit: int) -> Ready:
        seen.append(action)
        return fetch(conn, action, now, limit)

    monkeypatch.setattr(Store, "fetch_ready", staticmethod(counted))
    return seen


def lane_config(server: PushServer, receiver: Receiver, concurrency: int) -> str:
    return (
        preamble(server)
        + f"""
[actions.hook]
plugin = "webhook"
url = "{receiver.url()}"
concurrency = {concurrency}
retry = {{ attempts = 20, backoff = "10ms", max_backoff = "20ms" }}
[[rules]]
name = "each"
type = "transfer"
group_by = ["g"]
"""
    )


def delivered(receiver: Receiver) -> list[tuple[int, int]]:
    """(group, n) of each alert the receiver took, in arrival order."""
    out = []
    for request in receiver.ok():
        data = request.json()["event"]["data"]
        out.append((data["g"], data["n"]))
    return out


async def test_a_commit_hands_fresh_alerts_to_the_workers(tmp_path: Path, reads: list[str]) -> None:
    async with PushServer(token="tok-abcdef") as server, Receiver() as receiver:
        path = write_config(tmp_path / "t.toml", lane_config(server, receiver, 4))
        async with running(path):
            await wait_for(lambda: server.clients and reads == ["hook"], what="the read at start")
            for n in range(30):
                await server.push({"id": f"e{n}", "type": "transfer", "data": {"g": n, "n": n}})
            await wait_for(lambda: len(receiver.ok()) == 30, what="all 30 alerts")
            # one group each, so every alert was the head of its group when committed
            assert reads == ["hook"], "a fresh alert was read back from the outbox"
            # a failed try is read back from the disk when its retry falls due
            receiver.script = [500]
            await server.push({"id": "e30", "type": "transfer", "data": {"g": 30, "n": 30}})
            await wait_for(lambda: len(receiver.ok()) == 31, what="the retried alert")
            assert [r.status for r in receiver.requests[30:]] == [500, 200]
            assert len(reads) > 1


async def test_a_backlog_beyond_the_queue_waits_on_disk(
    tmp_path: Path, reads: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(dispatcher, "QUEUE_LIMIT", 3)
    hang = asyncio.Event()
    async with PushServer(token="tok-abcdef") as server, Receiver(hang=hang) as receiver:
        path = write_config(tmp_path / "t.toml", lane_config(server, receiver, 2))
        async with running(path) as daemon:
            await wait_for(lambda: server.clients)
            for n in range(40):
                await server.push({"id": f"e{n}", "type": "transfer", "data": {"g": n, "n": n}})
            with anyio.fail_after(10):
                while (await daemon.store.call(Store.counts))["pending"] < 40:  # noqa: ASYNC110
                    await anyio.sleep(0.02)
            await wait_for(lambda: daemon.dispatcher.inflight == 2, what="2 in flight")
            assert len(daemon.dispatcher.lanes["hook"].queued) == 3  # the other 35: on disk
            hang.set()
            # read again each time the queue runs low
            await wait_for(lambda: len(receiver.ok()) == 40, what="all 40 alerts")
        assert sorted(n for _, n in delivered(receiver)) == list(range(40))


async def test_overflow_retries_and_groups_go_through_the_disk(
    tmp_path: Path, reads: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """With no timed poll and a queue of 3, a stuck receiver's backlog waits on disk; once
    it answers, the lane reads the disk as retries fall due and as a finished delivery
    lets the next of its group go: each alert arrives once, in order within its group."""
    monkeypatch.setattr(dispatcher, "QUEUE_LIMIT", 3)
    hang = asyncio.Event()
    async with (
        PushServer(token="tok-abcdef") as server,
        Receiver(script=[500, 503, 500, 500, 503], hang=hang) as receiver,
    ):
        path = write_config(tmp_path / "t.toml", lane_config(server, receiver, 2))
        async with running(path) as daemon:
            await wait_for(lambda: server.clients)
            for n in range(80):
                await server.push({"id": f"e{n}", "type": "transfer", "data": {"g": n % 8, "n": n}})
            await wait_for(lambda: daemon.engine.stats.alerts == 80, what="80 alerts made")
            await wait_for(lambda: daemon.dispatcher.inflight == 2, what="2 in flight")
            hang.set()
            await wait_for(lambda: len(receiver.ok()) >= 80, what="all 80 alerts")
            with anyio.fail_after(10):  # the last outcomes may still be on their way to disk
                while (await daemon.store.call(Store.counts))["done"] < 80:  # noqa: ASYNC110
                    await anyio.sleep(0.02)
        got = delivered(receiver)
        assert sorted(n for _, n in got) == list(range(80)), "an alert went out twice or never"
        for group in range(8):
            assert [n for g, n in got if g == group] == list(range(group, 80, 8))
        assert [r.status for r in receiver.requests[:5]] == [500, 503, 500, 500, 503]


async def test_reads_of_the_disk_racing_the_commits_send_each_alert_once(
    tmp_path: Path, reads: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A task keeps asking for reads of the disk while commits hand alerts over and
    workers take them: every read replaces the queue, and nothing goes out twice."""
    monkeypatch.setattr(dispatcher, "QUEUE_LIMIT", 5)
    async with PushServer(token="tok-abcdef") as server, Receiver() as receiver:
        path = write_config(tmp_path / "t.toml", lane_config(server, receiver, 3))
        async with running(path) as daemon, anyio.create_task_group() as tg:
            await wait_for(lambda: server.clients)

            async def nudge() -> None:
                while True:
                    daemon.dispatcher.wake(["hook"])
                    await anyio.sleep(0.002)

            tg.start_soon(nudge)
            for n in range(60):
                await server.push({"id": f"e{n}", "type": "transfer", "data": {"g": n, "n": n}})
            await wait_for(lambda: len(receiver.ok()) >= 60, what="all 60 alerts")
            with anyio.fail_after(10):
                while (await daemon.store.call(Store.counts))["done"] < 60:  # noqa: ASYNC110
                    await anyio.sleep(0.02)
            tg.cancel_scope.cancel()
        assert sorted(n for _, n in delivered(receiver)) == list(range(60))
        assert len(reads) > 10


async def test_a_lane_queues_what_no_read_of_the_disk_saw_and_no_more() -> None:
    def delivery(seq: int) -> Delivery:
        return Delivery(seq, f"a{seq}", "hook", "", "hook", f"g{seq}", 0, 0, 0.0, 0.0, "", b"{}")

    lane = dispatcher.Lane(limit=2)
    lane.offer(delivery(1))
    lane.offer(delivery(2))
    taken = await lane.take()  # 1 is in flight from here on
    # A read that saw up to seq 3 (1 in flight, 2 and 3 due), taken before 4 was committed.
    lane.offer(delivery(4))
    lane.refill(Ready([delivery(1), delivery(2), delivery(3)], None, newest=3), limit=10)
    assert taken.seq == 1 and [d.seq for d in lane.queued] == [2, 3, 4]
    assert not lane.on_disk  # the read got fewer than it asked for
    lane.offer(delivery(3))  # a late hand-over of what the read gave already
    lane.offer(delivery(1))
    assert [d.seq for d in lane.queued] == [2, 3, 4]
    for seq in range(5, 5 + dispatcher.QUEUE_LIMIT):
        lane.offer(delivery(seq))
    assert len(lane.queued) == dispatcher.QUEUE_LIMIT and lane.on_disk  # the rest: on disk
    lane.refill(Ready([delivery(2)], None, newest=2), limit=1)
    assert lane.on_disk  # a full read: more may wait


async def test_a_changed_action_takes_over_its_queue_from_the_disk(
    tmp_path: Path, reads: list[str]
) -> None:
    """A reload that changes an action drops its lane (queued and in-flight deliveries
    included); the new lane reads them back from the outbox and sends each once."""
    hang = asyncio.Event()
    async with (
        PushServer(token="tok-abcdef") as server,
        Receiver(hang=hang) as stuck,
        Receiver() as fine,
    ):
        path = write_config(tmp_path / "t.toml", lane_config(server, stuck, 2))
        async with running(path) as daemon:
            await wait_for(lambda: server.clients)
            for n in range(12):
                await server.push({"id": f"e{n}", "type": "transfer", "data": {"g": n, "n": n}})
            await wait_for(lambda: daemon.dispatcher.inflight == 2, what="2 stuck in flight")
            with anyio.fail_after(10):
                while (await daemon.store.call(Store.counts))["pending"] < 12:  # noqa: ASYNC110
                    await anyio.sleep(0.02)
            old = daemon.dispatcher.lanes["hook"]
            path.write_text(lane_config(server, fine, 2))
            assert await daemon.reload()
            await wait_for(lambda: len(fine.ok()) == 12, what="all 12 at the new address")
            assert daemon.dispatcher.lanes["hook"] is not old
        assert sorted(n for _, n in delivered(fine)) == list(range(12))
        assert stuck.requests == []  # the two it held were never answered


async def test_a_delivery_older_than_max_age_is_dead_lettered_unsent(tmp_path: Path) -> None:
    # The second alert of a group waits behind the first; by the time its turn comes, it
    # is older than max_age (here: the clock moves on two hours): never sent.
    hang = asyncio.Event()
    async with PushServer(token="tok-abcdef") as server, Receiver(hang=hang) as receiver:
        text = preamble(server) + (
            f'[actions.hook]\nplugin = "webhook"\nurl = "{receiver.url()}"\ntimeout = "30s"\n'
            'retry = { attempts = 5, backoff = "10ms", max_age = "1h" }\n'
            '[[rules]]\nname = "each"\ntype = "transfer"\n'
        )
        path = write_config(tmp_path / "t.toml", text)
        async with running(path) as daemon:
            await wait_for(lambda: server.clients)
            for n in range(2):
                await server.push({"id": f"e{n}", "type": "transfer", "data": {"n": n}})
            await wait_for(lambda: daemon.dispatcher.inflight == 1, what="the first in flight")
            with anyio.fail_after(10):
                while (await daemon.store.call(Store.counts))["pending"] < 2:  # noqa: ASYNC110
                    await anyio.sleep(0.02)
            daemon.dispatcher.wall = lambda: time.time() + 7200
            hang.set()
            with anyio.fail_after(10):
                while (await daemon.store.call(Store.counts))["dead"] < 1:  # noqa: ASYNC110
                    await anyio.sleep(0.02)
            (error,) = await daemon.store.call(
                lambda conn: conn.execute(
                    "SELECT last_error FROM outbox WHERE state = 2"
                ).fetchone()
            )
        assert [r.json()["event"]["data"]["n"] for r in receiver.requests] == [0]
        assert error.startswith("not sent within max_age (1h): 2h")


async def test_a_reload_lets_a_changed_action_finish_what_it_has_in_flight(
    tmp_path: Path,
) -> None:
    # Before, the reload cancelled the old action's POST (the receiver had it whole) and
    # the new one sent the same alert at once: the receiver got it twice, concurrently.
    hang = asyncio.Event()
    async with PushServer(token="tok-abcdef") as server, Receiver(hang=hang) as receiver:

        def text(timeout: str) -> str:
            return preamble(server).replace('drain_timeout = "100ms"', 'drain_timeout = "20s"') + (
                f'[actions.hook]\nplugin = "webhook"\nurl = "{receiver.url()}"\n'
                f'timeout = "{timeout}"\n[[rules]]\nname = "each"\ntype = "transfer"\n'
            )

        path = write_config(tmp_path / "t.toml", text("15s"))
        async with running(path) as daemon:
            await wait_for(lambda: server.clients)
            await server.push({"id": "e0", "type": "transfer", "data": {"n": 0}})
            await wait_for(lambda: daemon.dispatcher.inflight == 1, what="the POST in flight")
            old = daemon.dispatcher.lanes["hook"]
            path.write_text(text("16s"))
            assert await daemon.reload()
            await wait_for(lambda: daemon.dispatcher.lanes.get("hook") not in (None, old))
            await server.push({"id": "e1", "type": "transfer", "data": {"n": 1}})
            # the new action takes the next alert of the group only once the first is done
            assert daemon.dispatcher.inflight == 1
            hang.set()
            with anyio.fail_after(10):
                while (await daemon.store.call(Store.counts))["done"] < 2:  # noqa: ASYNC110
                    await anyio.sleep(0.02)
        assert [r.json()["event"]["data"]["n"] for r in receiver.requests] == [0, 1]


async def test_a_commit_that_must_retry_is_not_overtaken(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The ticker and the engine commit on their own. One that waited for the disk (a
    # retry) used to be overtaken by the other's, then wrote its older rule state over
    # the newer one.
    async with PushServer(token="tok-abcdef") as server:
        path = write_config(tmp_path / "t.toml", preamble(server))
        async with running(path) as daemon:
            states = iter([[("r", "k", "old")], [("r", "k", "new")]])
            monkeypatch.setattr(daemon.engine, "take_state", lambda: next(states))
            commit, failed = Store.commit_alerts, anyio.Event()

            def first_fails(conn: sqlite3.Connection, *args: object) -> object:
                if not failed.is_set():
                    raise StateError("disk full")
                return commit(conn, *args)

            monkeypatch.setattr(Store, "commit_alerts", staticmethod(first_fails))
            async with anyio.create_task_group() as tg:
                tg.start_soon(daemon._commit, [], [])
                await wait_for(lambda: daemon.paused, what="the first commit to wait")
                failed.set()
                await daemon._commit([], [])
            (value,) = await daemon.store.call(
                lambda conn: conn.execute("SELECT value FROM rule_state").fetchone()
            )
        assert value == "new"


async def test_a_small_commit_goes_on_the_event_loop_and_a_large_one_to_the_writer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Store.run for a few alerts and a little rule state; a large state (a window of
    thousands of points) goes to the writer thread (Store.call), not to hold the event
    loop up."""
    async with PushServer(token="tok-abcdef") as server:
        path = write_config(tmp_path / "t.toml", preamble(server))
        async with running(path) as daemon:
            big = "x" * (daemon_module.INLINE_STATE + 1)
            many = [("r", f"k{i}", "v") for i in range(daemon_module.INLINE_ALERTS + 1)]
            states = iter([[("r", "k", "small")], [("r", "k", big)], many, []])
            monkeypatch.setattr(daemon.engine, "take_state", lambda: next(states))
            store, used = daemon.store, []

            def recorded(name: str, method: Any) -> Any:
                async def op(fn: Any, *args: Any) -> Any:
                    if fn is Store.commit_alerts:
                        used.append(name)  # the daemon's choice (run may then call)
                        fn = functools.partial(fn)  # recorded once
                    return await method(fn, *args)

                return op

            monkeypatch.setattr(store, "run", recorded("run", store.run))
            monkeypatch.setattr(store, "call", recorded("call", store.call))
            for _ in range(3):
                await daemon._commit([], [])
            await daemon._commit([], [("s", "k", "1")])  # a cursor alone
            (value,) = await store.call(
                lambda conn: conn.execute("SELECT value FROM rule_state WHERE key = 'k'").fetchone()
            )
        assert used == ["run", "call", "call", "run"]
        assert value == big
