"""The state database: alerts (the dedup log), the outbox, cursors, rule state.

One SQLite file in WAL mode. Writes go through one writer thread that commits whatever
has queued up in a single transaction (group commit); each operation of a batch runs in its
own savepoint (a lone one in the transaction alone), so one failing operation never takes
the others down with it. Event-loop callers (``call``) of one batch are woken together,
with one callback.

The short operations of the event path (``run``: committing a batch's alerts, recording a
delivery, reading due deliveries) are committed on the event loop's own thread instead,
the ones of a turn of the loop together, when that cannot wait for the disk: ``fsync`` off
(a commit is a write to the WAL, no flush), the writer idle, and the write lock free (else
they go to the writer, in order). A thread hand-off costs the event loop more than the SQL:
every statement lets go of the GIL and takes it back, and the writer's Python then holds
the loop up (about 700 us of the loop's time per alert, against 150-220 us of SQL). That
connection never checkpoints: after a second or 100 turns of its commits (and every 100
batches of its own), the writer checkpoints, with the loop's operations handed to it
meanwhile, and then writes first, so that starting the WAL over (which flushes its header,
``fsync`` or not) is the writer's to wait for, not the loop's.

Outbox ordering: deliveries of one action and one group (rule + ``group_by`` key) go
out in order. Exactly one pending delivery per (action, group) is the ``head``; only
heads are fetched, and finishing a head promotes the next one. So a failing group
waits on its own while the others flow, and a fetch is one indexed range scan.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import orjson

from .errors import StateError
from .events import to_json

log = logging.getLogger(__name__)

T = TypeVar("T")

PENDING, DONE, DEAD, DROPPED = 0, 1, 2, 3
FORGET = "forget"
"""A rule state write ``(rule, "forget\x1f<fingerprint>", None)`` deletes every row of that
version of the rule (its kind's groups and throttles)."""
STATE_NAMES = {PENDING: "pending", DONE: "done", DEAD: "dead", DROPPED: "dropped"}

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS alerts (
    id TEXT PRIMARY KEY,
    rule TEXT NOT NULL,
    event_id TEXT NOT NULL,
    status TEXT NOT NULL,
    grp TEXT NOT NULL,
    created_at REAL NOT NULL,
    payload BLOB NOT NULL,
    retracted INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS alerts_event ON alerts (event_id);
CREATE INDEX IF NOT EXISTS alerts_created ON alerts (created_at);
CREATE TABLE IF NOT EXISTS outbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    alert_id TEXT NOT NULL,
    action TEXT NOT NULL,
    target TEXT NOT NULL,
    label TEXT NOT NULL,
    grp TEXT NOT NULL,
    state INTEGER NOT NULL DEFAULT 0,
    head INTEGER NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    due_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    last_error TEXT NOT NULL DEFAULT '',
    UNIQUE (alert_id, action, target)
);
CREATE INDEX IF NOT EXISTS outbox_ready ON outbox (action, head, state, due_at);
CREATE INDEX IF NOT EXISTS outbox_group ON outbox (action, grp, state, seq);
CREATE INDEX IF NOT EXISTS outbox_state ON outbox (state, action);
CREATE TABLE IF NOT EXISTS cursors (
    source TEXT NOT NULL, key TEXT NOT NULL, value TEXT NOT NULL, updated_at REAL NOT NULL,
    PRIMARY KEY (source, key)
);
CREATE TABLE IF NOT EXISTS rule_state (
    rule TEXT NOT NULL, key TEXT NOT NULL, value BLOB NOT NULL, updated_at REAL NOT NULL,
    PRIMARY KEY (rule, key)
);
CREATE TABLE IF NOT EXISTS generations (
    rule TEXT NOT NULL, event_id TEXT NOT NULL, gen INTEGER NOT NULL, updated_at REAL NOT NULL,
    PRIMARY KEY (rule, event_id)
);
"""
SCHEMA_VERSION = "1"

# Is a delivery of this (action, group) already at the head? Pinned to outbox_group: left
# to itself SQLite picks outbox_ready (action, head, state) and walks every pending head of
# the action, so each commit and each finished delivery cost O(groups waiting) (measured
# in-process on one connection: 75 -> 230 us per enqueued alert between 400 and 4,000
# waiting groups; about 50 us at both once pinned).
_GROUP_BUSY = (
    "SELECT 1 FROM outbox INDEXED BY outbox_group"
    " WHERE action = ? AND grp = ? AND state = 0 AND head = 1 LIMIT 1"
)


def outbox_group(group: str, target: str) -> str:
    """The outbox's ordering group of a delivery: the alert's (rule and group key), per
    target. An action with several targets (an Apprise URL each) keeps each in order on its
    own, so a failing channel holds up only its own later deliveries."""
    return f"{group}\x1f{target}" if target else group


@dataclass(frozen=True, slots=True)
class NewAlert:
    """An alert to commit, with the (action, target, label) deliveries it fans out to."""

    id: str
    rule: str
    event_id: str
    status: str
    group: str
    payload: dict[str, Any]
    deliveries: tuple[tuple[str, str, str], ...]
    retracts: str | None = None


@dataclass(frozen=True, slots=True)
class Delivery:
    """One (alert, action, target) entry of the outbox."""

    seq: int
    alert_id: str
    action: str
    target: str
    label: str
    group: str
    state: int
    attempts: int
    created_at: float
    due_at: float
    last_error: str
    payload: bytes

    @property
    def state_name(self) -> str:
        return STATE_NAMES[self.state]


class Ready(NamedTuple):
    """What ``fetch_ready`` read: due heads, when the next retry falls due, and the
    newest outbox entry it could see."""

    deliveries: list[Delivery]
    next_due: float | None
    newest: int


@dataclass(frozen=True, slots=True)
class RecentAlert:
    """An alert as the status page lists it, with how its deliveries stand."""

    id: str
    rule: str
    status: str
    created_at: float
    title: str
    retracted: bool
    pending: int
    delivered: int
    dead: int


_DELIVERY_COLUMNS = (
    "o.seq, o.alert_id, o.action, o.target, o.label, o.grp, o.state, o.attempts,"
    " o.created_at, o.due_at, o.last_error, a.payload"
)


def _delivery(row: tuple[Any, ...]) -> Delivery:
    return Delivery(*row)


Waiter = concurrent.futures.Future[Any] | asyncio.Future[Any]
"""Who waits for an operation: a thread (``submit``) or a task of an event loop (``call``)."""
Op = tuple[Callable[..., Any], tuple[Any, ...], Waiter]
_CHECKPOINT = object()  # queued for the writer: checkpoint the WAL


def _settle(future: Waiter, value: Any, error: BaseException | None) -> None:
    # A caller cancelled while waiting has cancelled its future; the operation ran all
    # the same, there is just nobody to tell.
    if future.cancelled():
        return
    try:
        if error is None:
            future.set_result(value)
        else:
            future.set_exception(error)
    except (concurrent.futures.InvalidStateError, asyncio.InvalidStateError):
        pass


def _settle_all(items: list[tuple[Waiter, Any, BaseException | None]]) -> None:
    for future, value, error in items:
        _settle(future, value, error)


class Store:
    """The state database; open with ``Store.open(state_dir)``, close with ``close()``."""

    FILE = "tocsin.sqlite3"

    CHECKPOINT_EVERY = 1.0
    """Seconds between the writer's checkpoints of what ``run`` committed."""
    CHECKPOINT_TURNS = 100
    """...or after this many turns of ``run``, whichever comes first (about the writer's
    own autocheckpoint of 1,000 pages: a turn writes ~10 pages)."""
    SLOW_TURN = 0.02
    SLOW_PAUSE = 10.0
    """A turn of ``run`` that held the event loop longer than ``SLOW_TURN`` seconds (a disk
    that makes even WAL writes wait) sends ``run`` to the writer for ``SLOW_PAUSE``."""

    def __init__(self, path: Path, *, fsync: bool = False, batch: int = 512) -> None:
        self.path = path
        self._batch = batch
        self._queue: queue.SimpleQueue[Op | object | None] = queue.SimpleQueue()
        self._conn = self._connect(fsync)
        # The event loop's connection (``run``): none with fsync, whose commits wait for
        # the disk. It never waits for the write lock, and leaves checkpoints to the writer.
        self._here: sqlite3.Connection | None = None
        if not fsync:
            self._here = self._connect(fsync, busy_timeout=0)
            self._here.execute("PRAGMA wal_autocheckpoint=0")
            # Nor the writer on its own: the write after a checkpoint starts the WAL over
            # and syncs its header, and the next write may be the loop's (see _checkpoint).
            self._conn.execute("PRAGMA wal_autocheckpoint=0")
        self._written = 0  # the writer's commits since its last checkpoint
        self._turn: list[Op] = []
        self._handed = 0  # operations given to the writer and not yet done
        self._handed_lock = threading.Lock()
        self._checkpoint_at = 0.0
        self._turns = 0  # turns of run() since the last checkpoint
        self._here_again = 0.0  # after a slow turn, run() uses the writer until then
        self.failures = 0
        self.last_error = ""
        self._thread = threading.Thread(target=self._writer, name="tocsin-store", daemon=True)
        self._thread.start()

    @classmethod
    def open(cls, state_dir: Path, *, fsync: bool = False) -> Store:
        """Create the state dir (mode 0700) if needed and open the database in it."""
        try:
            state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            return cls(state_dir / cls.FILE, fsync=fsync)
        except (OSError, sqlite3.Error) as err:
            raise StateError(f"cannot open the state database in {state_dir}: {err}") from err

    def _connect(self, fsync: bool, busy_timeout: int = 5000) -> sqlite3.Connection:
        old_umask = os.umask(0o077)
        try:
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        finally:
            os.umask(old_umask)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(f"PRAGMA synchronous={'FULL' if fsync else 'NORMAL'}")
        conn.execute(f"PRAGMA busy_timeout={busy_timeout}")
        conn.executescript(SCHEMA)
        conn.execute("INSERT OR IGNORE INTO meta VALUES ('schema', ?)", (SCHEMA_VERSION,))
        return conn

    # -- running operations ------------------------------------------------------------

    def _writer(self) -> None:
        conn = self._conn
        stop = False
        while not stop:
            batch: list[Op] = []
            checkpoint = False
            item = self._queue.get()
            while True:
                if item is None:
                    stop = True
                elif item is _CHECKPOINT:
                    checkpoint = True
                else:
                    batch.append(item)  # type: ignore[arg-type]
                if stop or checkpoint or len(batch) >= self._batch:
                    break
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
            if batch:
                self._run_batch(conn, batch)
            if checkpoint:
                self._checkpoint(conn)
                self._done(1)
        conn.close()

    def _checkpoint(self, conn: sqlite3.Connection) -> None:
        # Outside a transaction (SQLite refuses one inside). While it is queued and runs,
        # ``run`` hands its operations to the writer, after it: with no write meanwhile it
        # copies the whole WAL, and the next write starts the WAL over. (Checkpoints that
        # race the loop's writes could each leave a few frames behind, and the WAL would
        # then grow for as long as the writes go on.)
        self._written = 0
        try:
            busy, frames, copied = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
            if not busy and frames == copied:
                # The next write starts the WAL over and syncs its header (also with
                # synchronous=NORMAL): let it be this thread's, not the event loop's.
                conn.execute("PRAGMA user_version = 0")
        except sqlite3.Error as err:
            log.warning("state database checkpoint failed: %s", err)

    def _run_batch(self, conn: sqlite3.Connection, batch: list[Op], *, here: bool = False) -> None:
        results: list[tuple[Waiter, Any, BaseException | None]] = []
        # A lone operation needs no savepoint: the transaction is its own. Each statement
        # lets go of the GIL and takes it back, while the event loop holds it most of the
        # time: two fewer per batch (half the batches in make bench are one operation).
        alone = len(batch) == 1
        try:
            try:
                conn.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError as err:
                busy = err.sqlite_errorcode & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)
                if not (here and busy):
                    raise
                # Another connection (tocsin outbox in a shell) writes: the writer waits
                # for it (its busy timeout), not the event loop.
                self._hand_over(batch)
                return
            for fn, args, future in batch:
                if not alone:
                    conn.execute("SAVEPOINT op")
                try:
                    results.append((future, fn(conn, *args), None))
                    if not alone:
                        conn.execute("RELEASE op")
                except Exception as err:
                    if isinstance(err, sqlite3.Error) and not conn.in_transaction:
                        raise  # SQLite ended the transaction itself (disk full, I/O error)
                    if alone:
                        conn.execute("ROLLBACK")
                    else:
                        conn.execute("ROLLBACK TO op")
                        conn.execute("RELEASE op")
                    results.append((future, None, err))
            if conn.in_transaction:
                conn.execute("COMMIT")
        except sqlite3.Error as err:
            # The whole transaction is lost (disk full, I/O error): every caller is told.
            self.failures += 1
            self.last_error = str(err)
            log.error("state database write failed: %s", err)
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            failure = StateError(f"state database write failed: {err}")
            results = [(future, None, failure) for _, _, future in batch]
        if here:
            _settle_all(results)
            return
        self._written += 1
        if self._here is not None and self._written >= self.CHECKPOINT_TURNS:
            self._checkpoint(conn)  # still counted in _handed: the loop does not write
        self._done(len(batch))  # before its callers hear of it: their next run() may go here
        # The event loop's waiters are told in one callback per loop and batch: one wake-up
        # of the loop (a write to its self-pipe) instead of one per operation.
        settle: dict[asyncio.AbstractEventLoop, list[Any]] = {}
        for future, value, error in results:
            if isinstance(future, asyncio.Future):
                settle.setdefault(future.get_loop(), []).append((future, value, error))
            else:
                _settle(future, value, error)
        for loop, items in settle.items():
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
                loop.call_soon_threadsafe(_settle_all, items)

    def _done(self, handed: int) -> None:
        with self._handed_lock:
            self._handed -= handed

    def _hand_over(self, ops: list[Any]) -> None:
        with self._handed_lock:
            self._handed += len(ops)
        for op in ops:
            self._queue.put(op)

    def submit(self, fn: Callable[..., T], *args: Any) -> concurrent.futures.Future[T]:
        """Queue ``fn(conn, *args)`` for the writer; the future resolves after the commit."""
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        if not self._thread.is_alive():
            future.set_exception(StateError("the state database is closed"))
        else:
            self._hand_over([(fn, args, future)])
        return future

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(conn, *args)`` in the writer thread and wait for its commit."""
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        if not self._thread.is_alive():
            raise StateError("the state database is closed")
        # run()'s operations of this turn came first: they go first, not after this one.
        batch, self._turn = self._turn, []
        self._hand_over([*batch, (fn, args, future)])
        return await future

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a short ``fn(conn, *args)`` on the event loop's thread, committed with the
        others of this turn of the loop; in the writer thread, as ``call``, when the commit
        could wait for the disk or another writer (see the module's docstring)."""
        if self._here_again and time.monotonic() >= self._here_again:
            self._here_again = 0.0  # the pause after a slow turn is over
        if self._here is None or self._handed or self._here_again:
            return await self.call(fn, *args)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        if not self._thread.is_alive():
            raise StateError("the state database is closed")
        self._turn.append((fn, args, future))
        if len(self._turn) == 1:
            loop.call_soon(self._run_turn)
        return await future

    def _run_turn(self) -> None:
        batch, self._turn = self._turn, []
        if not batch:  # close() took them
            return
        if self._handed or self._here is None:
            self._hand_over(batch)  # the writer got work meanwhile: after it, in order
            return
        started = time.monotonic()
        self._run_batch(self._here, batch, here=True)
        now = time.monotonic()
        if now - started > self.SLOW_TURN:
            self._here_again = now + self.SLOW_PAUSE
            log.info(
                "state database: a commit held the event loop for %.0f ms; committing in"
                " the writer thread for %.0f s",
                (now - started) * 1000,
                self.SLOW_PAUSE,
            )
        self._turns += 1
        if now >= self._checkpoint_at or self._turns >= self.CHECKPOINT_TURNS:
            self._checkpoint_at, self._turns = now + self.CHECKPOINT_EVERY, 0
            self._hand_over([_CHECKPOINT])

    def call_sync(self, fn: Callable[..., T], *args: Any) -> T:
        """The same, for code that has no event loop (the CLI)."""
        return self.submit(fn, *args).result()

    def close(self) -> None:
        """Finish what is queued, then close the database. Call it on the event loop's
        thread if ``run`` was used there (its turn and connection are that thread's)."""
        if self._thread.is_alive():
            batch, self._turn = self._turn, []
            self._hand_over(batch)  # a turn the loop did not run: the writer commits it
            self._queue.put(None)
            self._thread.join()
        if self._here is not None:
            self._here.close()
            self._here = None

    # -- operations (run in the writer thread, take the connection first) ---------------

    @staticmethod
    def commit_alerts(
        conn: sqlite3.Connection,
        alerts: Iterable[NewAlert],
        cursors: Iterable[tuple[str, str, str]] = (),
        rule_state: Iterable[tuple[str, str, str | None]] = (),
        skipped: list[str] | None = None,
    ) -> list[Delivery]:
        """Insert new alerts and their deliveries; an alert id seen before is skipped (and
        added to ``skipped``, when given).

        Returns the new deliveries that are due at once (the head of their group), for
        the dispatcher. ``cursors`` (source, key, value) are saved in the same
        transaction, after the alerts.
        """
        now = time.time()
        ready: list[Delivery] = []
        for alert in alerts:
            payload = to_json(alert.payload)  # provider data: huge integers, deep nesting
            inserted = conn.execute(
                "INSERT OR IGNORE INTO alerts (id, rule, event_id, status, grp, created_at, payload)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (alert.id, alert.rule, alert.event_id, alert.status, alert.group, now, payload),
            ).rowcount
            if not inserted:
                if skipped is not None:
                    skipped.append(alert.id)
                continue
            if alert.retracts:
                # Every firing of the rule and group that carried the fact: a firing and
                # its repeats are retracted once, together.
                conn.execute(
                    "UPDATE alerts SET retracted = 1 WHERE event_id = ? AND rule = ? AND grp = ?"
                    " AND status = 'firing'",
                    (alert.event_id, alert.rule, alert.group),
                )
                conn.execute(
                    "INSERT INTO generations VALUES (?, ?, 1, ?) ON CONFLICT (rule, event_id)"
                    " DO UPDATE SET gen = gen + 1, updated_at = excluded.updated_at",
                    (alert.rule, alert.event_id, now),
                )
            for action, target, label in alert.deliveries:
                group = outbox_group(alert.group, target)
                head = conn.execute(_GROUP_BUSY, (action, group)).fetchone() is None
                cursor = conn.execute(
                    "INSERT OR IGNORE INTO outbox (alert_id, action, target, label, grp, head,"
                    " created_at, due_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (alert.id, action, target, label, group, head, now, now, now),
                )
                if head and cursor.rowcount:
                    ready.append(
                        Delivery(
                            cursor.lastrowid or 0,
                            alert.id,
                            action,
                            target,
                            label,
                            group,
                            PENDING,
                            0,
                            now,
                            now,
                            "",
                            payload,
                        )
                    )
        for rule, key, value in rule_state:
            what, _, fingerprint = key.partition("\x1f")
            if value is None and what == FORGET:  # every row of that version of the rule
                conn.execute(
                    "DELETE FROM rule_state WHERE rule = ? AND (key LIKE ? OR key LIKE ?)",
                    (rule, f"kind\x1f{fingerprint}\x1f%", f"throttle\x1f{fingerprint}\x1f%"),
                )
                continue
            if value is None:
                conn.execute("DELETE FROM rule_state WHERE rule = ? AND key = ?", (rule, key))
                continue
            conn.execute(
                "INSERT INTO rule_state VALUES (?, ?, ?, ?) ON CONFLICT (rule, key)"
                " DO UPDATE SET value = excluded.value, updated_at = excluded.updated_at",
                (rule, key, value, now),
            )
        for source, key, value in cursors:
            conn.execute(
                "INSERT INTO cursors VALUES (?, ?, ?, ?) ON CONFLICT (source, key)"
                " DO UPDATE SET value = excluded.value, updated_at = excluded.updated_at",
                (source, key, value, now),
            )
        return ready

    @staticmethod
    def fetch_ready(conn: sqlite3.Connection, action: str, now: float, limit: int) -> Ready:
        """Due heads of ``action`` (at most ``limit``), when the next one falls due, and
        the newest outbox entry (of any action) at the time."""
        rows = conn.execute(
            f"SELECT {_DELIVERY_COLUMNS} FROM outbox o JOIN alerts a ON a.id = o.alert_id"
            " WHERE o.action = ? AND o.head = 1 AND o.state = 0 AND o.due_at <= ?"
            " ORDER BY o.due_at, o.seq LIMIT ?",
            (action, now, limit),
        ).fetchall()
        (next_due,) = conn.execute(
            "SELECT MIN(due_at) FROM outbox WHERE action = ? AND head = 1 AND state = 0 AND due_at > ?",
            (action, now),
        ).fetchone()
        (newest,) = conn.execute("SELECT MAX(seq) FROM outbox").fetchone()
        return Ready([_delivery(r) for r in rows], next_due, newest or 0)

    @staticmethod
    def finish(conn: sqlite3.Connection, seq: int, state: int, error: str = "") -> bool:
        """Mark a delivery done or dead, and promote the next of its group to head.

        Returns whether one was promoted."""
        row = conn.execute(
            "SELECT action, grp FROM outbox WHERE seq = ? AND state = 0", (seq,)
        ).fetchone()
        if row is None:  # gone, or dropped by hand (tocsin outbox drop) meanwhile
            return False
        conn.execute(
            "UPDATE outbox SET state = ?, head = 0, attempts = attempts + 1, updated_at = ?,"
            " last_error = ? WHERE seq = ?",
            (state, time.time(), error[:1000], seq),
        )
        return Store._promote(conn, row[0], row[1])

    @staticmethod
    def _promote(conn: sqlite3.Connection, action: str, group: str) -> bool:
        if conn.execute(_GROUP_BUSY, (action, group)).fetchone():
            return False
        return (
            conn.execute(
                "UPDATE outbox SET head = 1 WHERE seq = (SELECT seq FROM outbox"
                " WHERE action = ? AND grp = ? AND state = 0 ORDER BY seq LIMIT 1)",
                (action, group),
            ).rowcount
            > 0
        )

    @staticmethod
    def reschedule(conn: sqlite3.Connection, seq: int, due_at: float, error: str) -> None:
        """A failed try that will be retried at ``due_at``."""
        conn.execute(
            "UPDATE outbox SET attempts = attempts + 1, due_at = ?, updated_at = ?, last_error = ?"
            " WHERE seq = ? AND state = 0",
            (due_at, time.time(), error[:1000], seq),
        )

    @staticmethod
    def list_deliveries(
        conn: sqlite3.Connection, states: Iterable[int], limit: int = 1000
    ) -> list[Delivery]:
        marks = ",".join("?" * len(list(states)))
        return [
            _delivery(r)
            for r in conn.execute(
                f"SELECT {_DELIVERY_COLUMNS} FROM outbox o JOIN alerts a ON a.id = o.alert_id"
                f" WHERE o.state IN ({marks}) ORDER BY o.seq LIMIT ?",
                (*states, limit),
            )
        ]

    @staticmethod
    def counts(conn: sqlite3.Connection) -> dict[str, int]:
        """Deliveries per state name, and alerts."""
        out = {name: 0 for name in STATE_NAMES.values()}
        for state, n in conn.execute("SELECT state, COUNT(*) FROM outbox GROUP BY state"):
            out[STATE_NAMES[state]] = n
        (out["alerts"],) = conn.execute("SELECT COUNT(*) FROM alerts").fetchone()
        return out

    @staticmethod
    def recent_alerts(conn: sqlite3.Connection, limit: int = 50) -> list[RecentAlert]:
        """The latest ``limit`` alerts, newest first, with their deliveries per state."""
        out = []
        for row in conn.execute(
            "SELECT a.id, a.rule, a.status, a.created_at, a.payload, a.retracted,"
            " (SELECT COUNT(*) FROM outbox o WHERE o.alert_id = a.id AND o.state = ?),"
            " (SELECT COUNT(*) FROM outbox o WHERE o.alert_id = a.id AND o.state = ?),"
            " (SELECT COUNT(*) FROM outbox o WHERE o.alert_id = a.id AND o.state = ?)"
            " FROM alerts a ORDER BY a.created_at DESC LIMIT ?",
            (PENDING, DONE, DEAD, limit),
        ):
            alert_id, rule, status, created_at, payload, retracted, *counts = row
            try:
                title = str(orjson.loads(payload).get("title", ""))
            except (orjson.JSONDecodeError, AttributeError):
                title = ""
            out.append(
                RecentAlert(alert_id, rule, status, created_at, title, bool(retracted), *counts)
            )
        return out

    @staticmethod
    def depth(conn: sqlite3.Connection) -> tuple[int, int, float | None]:
        """(pending, dead, created_at of the oldest pending) deliveries: for ``STATUS=``."""
        pending, oldest = conn.execute(
            "SELECT COUNT(*), MIN(created_at) FROM outbox WHERE state = ?", (PENDING,)
        ).fetchone()
        (dead,) = conn.execute("SELECT COUNT(*) FROM outbox WHERE state = ?", (DEAD,)).fetchone()
        return int(pending), int(dead), oldest

    @staticmethod
    def retry(conn: sqlite3.Connection, seqs: Iterable[int] | None) -> list[int]:
        """Send dead-lettered deliveries again (all when ``seqs`` is None); their numbers."""
        now = time.time()
        where = (
            "state = 2"
            if seqs is None
            else f"state = 2 AND seq IN ({','.join(str(int(s)) for s in seqs) or 'NULL'})"
        )
        rows = conn.execute(
            f"SELECT seq, action, grp FROM outbox WHERE {where} ORDER BY seq"
        ).fetchall()
        for seq, action, group in rows:
            conn.execute(
                "UPDATE outbox SET state = 0, head = 0, attempts = 0, created_at = ?, due_at = ?,"
                " updated_at = ? WHERE seq = ?",
                (now, now, now, seq),
            )
            Store._promote(conn, action, group)
        return [seq for seq, _, _ in rows]

    @staticmethod
    def drop(
        conn: sqlite3.Connection, seqs: Iterable[int] | None, dead_only: bool = True
    ) -> list[int]:
        """Give up deliveries for good (dead-lettered ones, or pending ones too with
        ``dead_only=False``): they stay listed as dropped, and the next of their group goes.
        Returns their numbers."""
        clauses = ["state = 2"] if dead_only else ["state IN (0, 2)"]
        if seqs is not None:
            clauses.append(f"seq IN ({','.join(str(int(s)) for s in seqs) or 'NULL'})")
        rows = conn.execute(
            f"SELECT seq, action, grp FROM outbox WHERE {' AND '.join(clauses)}"
        ).fetchall()
        for seq, action, group in rows:
            conn.execute(
                "UPDATE outbox SET state = ?, head = 0, last_error = 'dropped' WHERE seq = ?",
                (DROPPED, seq),
            )
            Store._promote(conn, action, group)
        return [seq for seq, _, _ in rows]

    @staticmethod
    def dead_letter_unconfigured(
        conn: sqlite3.Connection, actions: Iterable[str]
    ) -> dict[str, int]:
        """Dead-letter the pending deliveries of actions not in ``actions`` (removed from
        the config): no worker would ever try them. Returns how many, per action; they
        stay listed and re-sendable (``tocsin outbox retry``) once the action is back."""
        known = list(actions)
        # "NOT IN ()" is not SQL, and "NOT IN (NULL)" is never true: no action, no clause.
        unknown = f" AND action NOT IN ({','.join('?' * len(known))})" if known else ""
        found = conn.execute(
            f"SELECT action, COUNT(*) FROM outbox WHERE state = 0{unknown} GROUP BY action",
            known,
        ).fetchall()
        now = time.time()
        for action, _ in found:
            conn.execute(
                "UPDATE outbox SET state = ?, head = 0, updated_at = ?, last_error = ?"
                " WHERE state = 0 AND action = ?",
                (DEAD, now, f"action {action!r} is no longer configured", action),
            )
        return dict(found)

    @staticmethod
    def firing_alerts_for(conn: sqlite3.Connection, event_id: str) -> list[tuple[str, str, str]]:
        """(alert id, rule, group) of the unretracted firing alerts of ``event_id``: the
        latest of each rule and group (a repeat of a still-firing alert is the same alert)."""
        latest: dict[tuple[str, str], str] = {}
        for alert_id, rule, group in conn.execute(
            "SELECT id, rule, grp FROM alerts WHERE event_id = ? AND status = 'firing'"
            " AND retracted = 0 ORDER BY rowid",
            (event_id,),
        ):
            latest[(rule, group)] = alert_id
        return [(alert_id, rule, group) for (rule, group), alert_id in latest.items()]

    @staticmethod
    def fact_data(conn: sqlite3.Connection, event_id: str) -> dict[str, Any] | None:
        """The data of the event ``event_id`` as its latest firing alert carried it."""
        row = conn.execute(
            "SELECT payload FROM alerts WHERE event_id = ? AND status = 'firing'"
            " ORDER BY rowid DESC LIMIT 1",
            (event_id,),
        ).fetchone()
        if row is None:
            return None
        try:
            data = orjson.loads(row[0])["event"]["data"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            return None
        return data if isinstance(data, dict) else None

    @staticmethod
    def load_rule_state(conn: sqlite3.Connection) -> list[tuple[str, str, str]]:
        return conn.execute("SELECT rule, key, value FROM rule_state").fetchall()

    @staticmethod
    def load_generations(conn: sqlite3.Connection) -> dict[tuple[str, str], int]:
        return {
            (r, e): g for r, e, g in conn.execute("SELECT rule, event_id, gen FROM generations")
        }

    @staticmethod
    def get_cursor(conn: sqlite3.Connection, source: str, key: str) -> str | None:
        row = conn.execute(
            "SELECT value FROM cursors WHERE source = ? AND key = ?", (source, key)
        ).fetchone()
        return None if row is None else str(row[0])

    @staticmethod
    def purge(conn: sqlite3.Connection, horizon: float) -> int:
        """Forget alerts older than the dedup horizon whose deliveries are all done or
        dropped, and ``~`` cursors (a source's memories) not saved within it."""
        cutoff = time.time() - horizon
        old = "SELECT id FROM alerts a WHERE created_at < ? AND NOT EXISTS (SELECT 1 FROM outbox o WHERE o.alert_id = a.id AND o.state NOT IN (1, 3))"
        conn.execute(f"DELETE FROM outbox WHERE alert_id IN ({old})", (cutoff,))
        removed = conn.execute(f"DELETE FROM alerts WHERE id IN ({old})", (cutoff,)).rowcount
        conn.execute("DELETE FROM generations WHERE updated_at < ?", (cutoff,))
        conn.execute(
            "DELETE FROM rule_state WHERE key LIKE 'throttle%' AND updated_at < ?", (cutoff,)
        )
        conn.execute("DELETE FROM cursors WHERE key LIKE '~%' AND updated_at < ?", (cutoff,))
        return removed
