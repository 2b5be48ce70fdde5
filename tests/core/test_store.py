from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path

import anyio
import pytest

from support import until
from tocsin.store import DEAD, DONE, PENDING, Delivery, NewAlert, Store


@pytest.fixture
def store(tmp_path: Path) -> Store:
    s = Store.open(tmp_path / "state")
    yield s  # type: ignore[misc]
    s.close()


def alert(
    id: str, group: str = "g", actions: tuple[str, ...] = ("hook",), event: str = ""
) -> NewAlert:
    return NewAlert(
        id=id,
        rule="r",
        event_id=event or id,
        status="firing",
        group=group,
        payload={
            "id": id,
            "status": "firing",
            "rule": "r",
            "title": id,
            "body": "",
            "fired_at": "",
            "event": {},
        },
        deliveries=tuple((a, "", a) for a in actions),
    )


def ready(store: Store, action: str = "hook") -> list[str]:
    return ids(store.call_sync(Store.fetch_ready, action, time.time() + 1, 100).deliveries)


def ids(deliveries: list[Delivery]) -> list[str]:
    return [d.alert_id for d in deliveries]


def test_state_dir_is_private_and_wal(tmp_path: Path) -> None:
    s = Store.open(tmp_path / "new" / "state")
    s.close()
    assert (tmp_path / "new" / "state").stat().st_mode & 0o777 == 0o700
    assert (s.path.stat().st_mode & 0o077) == 0
    (mode,) = sqlite3.connect(s.path).execute("PRAGMA journal_mode").fetchone()
    assert mode == "wal"


def test_an_alert_id_is_committed_once(store: Store) -> None:
    assert ids(store.call_sync(Store.commit_alerts, [alert("a")])) == ["a"]
    assert store.call_sync(Store.commit_alerts, [alert("a")]) == []
    assert store.call_sync(Store.counts)["pending"] == 1


def test_one_head_per_group_in_order(store: Store) -> None:
    committed = store.call_sync(
        Store.commit_alerts,
        [alert("a1", "A"), alert("b1", "B"), alert("a2", "A"), alert("a3", "A")],
    )
    # the commit hands over exactly what a read of the disk gives: the heads
    fetched = store.call_sync(Store.fetch_ready, "hook", time.time() + 1, 100)
    assert committed == fetched.deliveries and ids(committed) == ["a1", "b1"]
    assert fetched.newest == max(d.seq for d in committed) + 2  # a2 and a3 wait behind a1
    seq = {r.alert_id: r.seq for r in fetched.deliveries}
    assert store.call_sync(Store.finish, seq["a1"], DONE) is True  # a2 is the head now
    assert ready(store) == ["b1", "a2"]
    assert store.call_sync(Store.finish, seq["b1"], DONE) is False  # B has nobody waiting
    # a failing head holds its group back but not the others
    (a2,) = store.call_sync(Store.fetch_ready, "hook", time.time() + 1, 100).deliveries
    store.call_sync(Store.reschedule, a2.seq, time.time() + 3600, "HTTP 500")
    assert ready(store) == []
    next_due = store.call_sync(Store.fetch_ready, "hook", time.time() + 1, 100).next_due
    assert next_due is not None and next_due > time.time() + 3000
    store.call_sync(Store.finish, a2.seq, DEAD, "gave up")
    assert ready(store) == ["a3"]


def test_each_target_of_an_action_keeps_its_own_order(store: Store) -> None:
    def two_urls(id: str) -> NewAlert:
        one = alert(id, "G")
        return dataclasses.replace(one, deliveries=(("ap", "url1", "one"), ("ap", "url2", "two")))

    committed = store.call_sync(Store.commit_alerts, [two_urls("a"), two_urls("b")])
    assert [(d.alert_id, d.target) for d in committed] == [("a", "url1"), ("a", "url2")]
    seq = {(d.alert_id, d.target): d.seq for d in committed}
    # url1 fails and waits an hour; url2 goes on with b in the meantime.
    store.call_sync(Store.reschedule, seq["a", "url1"], time.time() + 3600, "HTTP 503")
    store.call_sync(Store.finish, seq["a", "url2"], DONE)
    later = store.call_sync(Store.fetch_ready, "ap", time.time() + 1, 100).deliveries
    assert [(d.alert_id, d.target) for d in later] == [("b", "url2")]


def test_retry_and_drop_dead_letters(store: Store) -> None:
    store.call_sync(Store.commit_alerts, [alert("x", "G"), alert("y", "G")])
    (x,) = store.call_sync(Store.fetch_ready, "hook", time.time() + 1, 10).deliveries
    store.call_sync(Store.finish, x.seq, DEAD, "HTTP 400")
    dead = store.call_sync(Store.list_deliveries, [DEAD])
    assert [(d.alert_id, d.last_error, d.state_name) for d in dead] == [("x", "HTTP 400", "dead")]
    assert len(store.call_sync(Store.retry, None)) == 1
    # y is the head now; x waits behind it (a manual retry does not jump the queue)
    assert ready(store) == ["y"]
    assert store.call_sync(Store.counts)["dead"] == 0
    (y,) = store.call_sync(Store.fetch_ready, "hook", time.time() + 1, 10).deliveries
    store.call_sync(Store.finish, y.seq, DONE)
    assert ready(store) == ["x"]
    (x,) = store.call_sync(Store.fetch_ready, "hook", time.time() + 1, 10).deliveries
    store.call_sync(Store.finish, x.seq, DEAD, "again")
    assert store.call_sync(Store.drop, [x.seq]) == [x.seq]
    counts = store.call_sync(Store.counts)
    assert counts == {"pending": 0, "done": 1, "dead": 0, "dropped": 1, "alerts": 2}


def test_a_pending_delivery_can_be_dropped_by_number(store: Store) -> None:
    store.call_sync(Store.commit_alerts, [alert("stuck", "G"), alert("next", "G")])
    (stuck,) = store.call_sync(Store.fetch_ready, "hook", time.time() + 1, 10).deliveries
    store.call_sync(Store.reschedule, stuck.seq, time.time() + 3600, "HTTP 503")
    assert store.call_sync(Store.drop, None) == []  # --all: dead letters only
    assert store.call_sync(Store.drop, [stuck.seq], False) == [stuck.seq]
    assert ready(store) == ["next"]  # the group goes on
    # A daemon that had the dropped one in hand finishing it changes nothing.
    assert store.call_sync(Store.finish, stuck.seq, DONE) is False
    store.call_sync(Store.reschedule, stuck.seq, time.time() + 1, "late")
    counts = store.call_sync(Store.counts)
    assert (counts["dropped"], counts["done"], counts["pending"]) == (1, 0, 1)


def test_purge_forgets_only_finished_alerts_past_the_horizon(store: Store) -> None:
    store.call_sync(Store.commit_alerts, [alert("old-done", "A"), alert("old-pending", "B")])
    rows = store.call_sync(Store.fetch_ready, "hook", time.time() + 1, 10).deliveries
    store.call_sync(Store.finish, next(r.seq for r in rows if r.alert_id == "old-done"), DONE)
    assert store.call_sync(Store.purge, 3600) == 0
    assert store.call_sync(Store.purge, -1) == 1  # a horizon in the future: everything is "old"
    assert store.call_sync(Store.counts)["alerts"] == 1
    # forgotten: the same id is new again
    assert ids(store.call_sync(Store.commit_alerts, [alert("old-done", "A")])) == ["old-done"]


def test_purge_forgets_dropped_deliveries_and_old_memories_not_positions(store: Store) -> None:
    store.call_sync(Store.commit_alerts, [alert("dropped")], [("odds", "~quote|a", "x")])
    store.call_sync(Store.commit_alerts, [], [("vite", "height", "42")])
    (row,) = store.call_sync(Store.fetch_ready, "hook", time.time() + 1, 10).deliveries
    store.call_sync(Store.drop, [row.seq], False)
    assert store.call_sync(Store.purge, 3600) == 0  # within the horizon: all kept
    assert store.call_sync(Store.get_cursor, "odds", "~quote|a") == "x"
    assert store.call_sync(Store.purge, -1) == 1  # past it: the dropped one's alert goes
    assert store.call_sync(Store.get_cursor, "odds", "~quote|a") is None  # a memory
    assert store.call_sync(Store.get_cursor, "vite", "height") == "42"  # a position: kept


def test_cursors_commit_with_alerts(store: Store) -> None:
    store.call_sync(Store.commit_alerts, [alert("c")], [("vite", "height", "42")])
    assert store.call_sync(Store.get_cursor, "vite", "height") == "42"
    store.call_sync(Store.commit_alerts, [], [("vite", "height", "43")])
    assert store.call_sync(Store.get_cursor, "vite", "height") == "43"
    assert store.call_sync(Store.get_cursor, "vite", "nope") is None


def test_a_failing_operation_does_not_take_the_batch_down(store: Store) -> None:
    def bad(conn: sqlite3.Connection) -> None:
        conn.execute("INSERT INTO alerts (id) VALUES ('incomplete')")  # NOT NULL violations

    futures = [
        store.submit(Store.commit_alerts, [alert("ok1")]),
        store.submit(bad),
        store.submit(Store.commit_alerts, [alert("ok2", "g2")]),
    ]
    assert ids(futures[0].result()) == ["ok1"] and ids(futures[2].result()) == ["ok2"]
    with pytest.raises(sqlite3.IntegrityError):
        futures[1].result()
    assert store.call_sync(Store.counts)["alerts"] == 2


def test_a_lone_failing_operation_is_rolled_back(store: Store) -> None:
    """Waited for one by one, each operation is its own batch (no savepoint): what a failing
    one wrote is undone all the same, its caller gets the error, and the next one commits."""

    def half_done(conn: sqlite3.Connection) -> None:
        Store.commit_alerts(conn, [alert("written, then undone")])
        raise ValueError("broke halfway")

    with pytest.raises(ValueError, match="broke halfway"):
        store.call_sync(half_done)
    with pytest.raises(sqlite3.IntegrityError):
        store.call_sync(lambda conn: conn.execute("INSERT INTO alerts (id) VALUES ('x')"))
    assert ids(store.call_sync(Store.commit_alerts, [alert("ok")])) == ["ok"]
    assert store.call_sync(Store.counts)["alerts"] == 1
    assert store.failures == 0  # an operation's own error is not a failed transaction


def test_closed_store_refuses(tmp_path: Path) -> None:
    s = Store.open(tmp_path)
    s.close()
    from tocsin.errors import StateError

    with pytest.raises(StateError):
        s.call_sync(Store.counts)


def test_pending_constant_matches_schema_default() -> None:
    assert PENDING == 0


def _steps(conn: sqlite3.Connection, fn: Callable[[sqlite3.Connection], object]) -> int:
    """SQLite virtual machine steps ``fn`` takes on ``conn`` (work done, not time)."""
    steps = 0

    def count() -> int:
        nonlocal steps
        steps += 1
        return 0

    conn.set_progress_handler(count, 1)
    try:
        fn(conn)
    finally:
        conn.set_progress_handler(None, 1)
    return steps


@pytest.mark.parametrize("op", ["commit", "finish"])
def test_group_bookkeeping_does_not_grow_with_the_groups_waiting(tmp_path: Path, op: str) -> None:
    """A commit and a finished delivery look up their own group only (not every head
    until one of their group turns up, or none does): with 2,000 groups
    waiting (a webhook outage on many rules) they cost what they cost with 20."""
    costs = []
    for groups in (20, 2000):
        store = Store.open(tmp_path / f"s{groups}")
        store.call_sync(Store.commit_alerts, [alert(f"x{i}", f"g{i}") for i in range(groups)])
        store.close()
        conn = sqlite3.connect(store.path, isolation_level=None)
        (seq,) = conn.execute("SELECT seq FROM outbox WHERE alert_id = 'x7'").fetchone()
        if op == "commit":
            costs.append(
                _steps(conn, lambda c: Store.commit_alerts(c, [alert("new", "a new group")]))
            )
        else:
            costs.append(_steps(conn, lambda c, s=seq: Store.finish(c, s, DONE)))
        conn.close()
    assert costs[1] < 2 * costs[0], costs


def test_deliveries_of_actions_no_longer_configured_are_dead_lettered(store: Store) -> None:
    store.call_sync(Store.commit_alerts, [alert("a", actions=("hook", "phone")), alert("b")])
    assert store.call_sync(Store.dead_letter_unconfigured, ["hook", "phone"]) == {}
    assert store.call_sync(Store.dead_letter_unconfigured, ["phone"]) == {"hook": 2}
    assert store.call_sync(Store.depth)[:2] == (1, 2)
    # Every action removed: what waited for any of them is dead-lettered too.
    assert store.call_sync(Store.dead_letter_unconfigured, []) == {"phone": 1}
    assert store.call_sync(Store.depth)[:2] == (0, 3)


# -- Store.run: the event path's operations on the event loop's thread -------------------


def _where(log: list[str], name: str) -> Callable[[sqlite3.Connection], str]:
    """An operation that records its name and the thread it ran in, and writes an alert."""

    def op(conn: sqlite3.Connection) -> str:
        log.append(name)
        Store.commit_alerts(conn, [alert(name, group=name)])
        return threading.current_thread().name

    return op


def _alert_ids(path: Path) -> list[str]:
    """What another connection sees committed."""
    with contextlib.closing(sqlite3.connect(path)) as conn:
        return [r[0] for r in conn.execute("SELECT id FROM alerts ORDER BY rowid")]


@pytest.mark.anyio
async def test_run_commits_on_the_event_loops_thread(store: Store) -> None:
    log: list[str] = []
    results = await asyncio.gather(*(store.run(_where(log, f"a{i}")) for i in range(3)))
    assert results == [threading.current_thread().name] * 3
    assert _alert_ids(store.path) == ["a0", "a1", "a2"]


@pytest.mark.anyio
async def test_a_failing_operation_of_a_turn_fails_alone(store: Store) -> None:
    def half_done(conn: sqlite3.Connection) -> None:
        Store.commit_alerts(conn, [alert("written, then undone", group="x")])
        raise ValueError("broke halfway")

    log: list[str] = []
    first, failed, last = await asyncio.gather(
        store.run(_where(log, "before")),
        store.run(half_done),
        store.run(_where(log, "after")),
        return_exceptions=True,
    )
    assert isinstance(failed, ValueError)
    assert first == last == threading.current_thread().name
    assert _alert_ids(store.path) == ["before", "after"]
    assert store.failures == 0


@pytest.mark.anyio
async def test_run_goes_to_the_writer_with_fsync(tmp_path: Path) -> None:
    s = Store.open(tmp_path, fsync=True)  # a commit waits for the disk: not on the loop
    try:
        assert await s.run(_where([], "a")) == "tocsin-store"
    finally:
        s.close()


@pytest.mark.anyio
async def test_run_waits_its_turn_behind_the_writer(store: Store) -> None:
    """An operation given to the writer before is committed before, also when the one
    after it could have gone on the event loop's thread."""
    log: list[str] = []
    release = threading.Event()

    def slow(conn: sqlite3.Connection) -> str:
        assert release.wait(10)
        return _where(log, "slow")(conn)

    async with anyio.create_task_group() as tg:
        tg.start_soon(store.call, slow)
        await anyio.wait_all_tasks_blocked()
        quick = asyncio.ensure_future(store.run(_where(log, "quick")))
        await anyio.wait_all_tasks_blocked()
        release.set()
        assert await quick == "tocsin-store"
    assert log == ["slow", "quick"]
    assert _alert_ids(store.path) == ["slow", "quick"]


@pytest.mark.anyio
async def test_run_never_waits_for_another_writer_on_the_loop(store: Store) -> None:
    """Another connection holds the write lock (tocsin outbox retry in a shell): the
    operation waits in the writer thread, and the event loop goes on meanwhile."""
    assert store._here is not None  # SQLite's own wait for the lock would block the loop
    assert store._here.execute("PRAGMA busy_timeout").fetchone() == (0,)
    with contextlib.closing(sqlite3.connect(store.path, isolation_level=None)) as other:
        other.execute("BEGIN IMMEDIATE")
        other.execute("INSERT INTO meta VALUES ('held', 'by a shell')")
        waiting = asyncio.ensure_future(store.run(_where([], "a")))
        # The loop turns on: a loop blocked in SQLite's wait would get here only once
        # SQLite gave up, with the lock still held, and the operation failed.
        await until(lambda: store._handed > 0)
        assert not waiting.done()
        other.execute("COMMIT")
        with anyio.fail_after(10):
            assert await waiting == "tocsin-store"
    assert _alert_ids(store.path) == ["a"]


@pytest.mark.anyio
async def test_what_run_commits_is_checkpointed(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The loop's connection never checkpoints: the writer copies its commits into the
    database file, and the WAL does not keep growing."""
    monkeypatch.setattr(store, "CHECKPOINT_EVERY", 0.0)
    size = store.path.stat().st_size
    for i in range(100):  # 2 MB, a commit each
        await store.run(_big(i))
    await until(lambda: store.path.stat().st_size > size + 1_000_000, within=10)
    wal = store.path.with_name(store.path.name + "-wal")
    assert wal.stat().st_size < 1_000_000


def _big(i: int) -> Callable[[sqlite3.Connection], None]:
    """An operation that writes 20 kB."""

    def op(conn: sqlite3.Connection) -> None:
        conn.execute("INSERT INTO meta VALUES (?, ?)", (f"k{i}", "x" * 20_000))

    return op


@pytest.mark.anyio
async def test_the_wal_stays_small_between_timed_checkpoints(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A burst of commits within CHECKPOINT_EVERY is checkpointed all the same, every
    CHECKPOINT_TURNS turns (flat out, a second of commits made a WAL of 280 MB)."""
    monkeypatch.setattr(store, "CHECKPOINT_EVERY", 3600.0)  # only the first turn's
    for i in range(400):  # 8 MB, a commit each
        await store.run(_big(i))
    wal = store.path.with_name(store.path.name + "-wal")
    assert wal.stat().st_size < 4_000_000


@pytest.mark.anyio
async def test_the_writer_starts_the_wal_over_after_its_checkpoint(store: Store) -> None:
    """The first write after a full checkpoint starts the WAL over and syncs its header
    (with synchronous=NORMAL too): the writer's, never the event loop's."""
    await store.run(_big(0))  # the first turn queues a checkpoint
    await store.call(lambda conn: None)  # queued after the checkpoint
    with contextlib.closing(sqlite3.connect(store.path)) as other:
        _, frames, _ = other.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
    assert frames == 1  # the writer's one-page write started it over


@pytest.mark.anyio
async def test_a_call_does_not_overtake_a_run_of_the_same_turn(store: Store) -> None:
    """A delivery's outcome (run) before the dead-lettering of its action (call), in one
    turn of the loop: committed in that order, or the delivered alert reads as dead."""
    log: list[str] = []
    await asyncio.gather(store.run(_where(log, "first")), store.call(_where(log, "second")))
    assert log == ["first", "second"]
    assert _alert_ids(store.path) == ["first", "second"]


@pytest.mark.anyio
async def test_close_commits_a_turn_the_loop_did_not_run(store: Store) -> None:
    pending = store.run(_where([], "late"))
    pending.send(None)  # queued for this turn of the loop, which never comes
    store.close()
    pending.close()
    assert _alert_ids(store.path) == ["late"]


@pytest.mark.anyio
async def test_a_slow_turn_sends_run_to_the_writer_for_a_while(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A disk that makes even a WAL write wait would hold the event loop: after a turn
    slower than SLOW_TURN, run() commits in the writer until SLOW_PAUSE has passed."""
    monkeypatch.setattr(store, "SLOW_TURN", 0.0)  # every turn is slow
    monkeypatch.setattr(store, "SLOW_PAUSE", 3600.0)
    here = threading.current_thread().name
    assert await store.run(_where([], "a")) == here
    assert await store.run(_where([], "b")) == "tocsin-store"
    monkeypatch.setattr(store, "_here_again", time.monotonic())  # the pause is over
    monkeypatch.setattr(store, "SLOW_TURN", 60.0)
    assert await store.run(_where([], "c")) == here
    assert await store.run(_where([], "d")) == here
    assert _alert_ids(store.path) == ["a", "b", "c", "d"]
