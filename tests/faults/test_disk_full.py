"""Fault 6: the state database cannot grow (a full disk), then can again.

The daemon runs in this event loop (``tests/support.running``); the full disk is injected
as SQLite itself reports one: ``PRAGMA max_page_count`` set to the database's current
size on both of the daemon's connections (the writer thread's, and the event loop's that
``Store.run`` commits on) makes every transaction that needs a new page fail with
SQLITE_FULL ("database or disk is full"), exactly the error a full filesystem gives. No alert may be dropped: intake pauses (the bounded stream fills and the source
waits), the status line says why, and everything is committed and delivered once space
returns.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from support import PushServer, Receiver, running, wait_for, write_config
from tocsin.store import Store

TOKEN = "disk-full-token"


def config(server: PushServer, hook_url: str) -> str:
    return f"""
[daemon]
state_dir = "state"
drain_timeout = "2s"
queue_size = 10

[sources.feed]
plugin = "testpush"
url = "{server.url}"
token = {{ env = "PUSH_TOKEN" }}

[actions.hook]
plugin = "webhook"
url = "{hook_url}"
retry = {{ attempts = 50, backoff = "20ms", max_backoff = "100ms" }}

[[rules]]
name = "every transfer"
type = "transfer"
actions = ["hook"]
title = "{{{{ args.amount }}}}"
"""


def cap_pages(conn: sqlite3.Connection, pages: int | None) -> int:
    """Set ``max_page_count`` to ``pages`` (None: the current size); returns it."""
    if pages is None:
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
    return int(conn.execute(f"PRAGMA max_page_count = {int(pages)}").fetchone()[0])


async def full_disk(store: Store, pages: int | None) -> None:
    """``cap_pages`` on each connection: the limit is a connection's own, a disk is not."""
    pages = await store.call(cap_pages, pages)
    assert store._here is not None  # used on the event loop's thread only: this one
    cap_pages(store._here, pages)


async def test_a_full_disk_pauses_intake_says_so_and_loses_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PUSH_TOKEN", TOKEN)
    async with PushServer(token=TOKEN) as server, Receiver() as receiver:
        path = write_config(tmp_path / "t.toml", config(server, receiver.url()))
        async with running(path) as daemon:
            await wait_for(lambda: server.clients, what="the source to connect")
            await full_disk(daemon.store, None)  # the disk is full from now on

            body = "x" * 3000  # a few alerts fill a page: the next needs room
            for i in range(40):  # more than the intake stream holds (queue_size = 10)
                await server.push(
                    {
                        "id": f"t{i}",
                        "type": "transfer",
                        "data": {"args": {"amount": i, "memo": body}},
                    }
                )
            await wait_for(lambda: daemon.paused, what="intake to pause on the full disk")
            assert "database or disk is full" in daemon.paused
            assert "intake paused: state database write failed: database or disk is full" in (
                daemon.status_line()
            )
            # Tried again (the daemon backs off and retries) and still full: every
            # connection is, not only the one that failed first.
            await wait_for(lambda: daemon.store.failures >= 3, what="the retries to fail too")
            assert daemon.paused
            delivered_while_full = len(receiver.ok())

            await full_disk(daemon.store, 1_000_000_000)  # space returns
            await wait_for(lambda: len(receiver.ok()) == 40, within=20, what="every alert")
            assert not daemon.paused
        amounts = sorted(r.json()["event"]["data"]["args"]["amount"] for r in receiver.ok())
        assert amounts == list(range(40))  # nothing dropped, nothing twice
        assert delivered_while_full < 40
