"""The systemd notify protocol (notify.py) against real ``AF_UNIX`` datagram sockets: the
Notifier alone, the watchdog's idea of progress, an in-process daemon whose engine is
stuck, and a real ``tocsin run`` subprocess on a path and on an abstract socket."""

from __future__ import annotations

import itertools
import logging
import os
import re
import shutil
import signal
import socket
import statistics
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest

from faults.harness import (
    DaemonProcess,
    Hook,
    NotifySocket,
    StateDB,
    config_text,
    emulator_running,
    wait_for,
)
from support import PushServer, Receiver, make_registry, write_config
from tocsin.daemon import Daemon
from tocsin.notify import Notifier, Progress, Watchdog, monotonic_usec


@pytest.fixture
def short_dir() -> Iterator[Path]:
    # A socket path must fit in 108 bytes; pytest's tmp_path may not.
    path = Path(tempfile.mkdtemp(prefix="tocsin-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(params=["path", "abstract"])
async def notify(request: pytest.FixtureRequest, short_dir: Path) -> AsyncIterator[NotifySocket]:
    sock = NotifySocket(str(short_dir / "notify") if request.param == "path" else None)
    sock.start_reading()
    yield sock
    sock.close()


def ticks_since(sock: NotifySocket, seen: int) -> int:
    """STATUS= messages (one per tick of the daemon's notify loop) after the first ``seen``."""
    return sum(1 for m in sock.poll()[seen:] if "STATUS" in m)


# -- Notifier --------------------------------------------------------------------------


async def test_each_message_is_one_datagram(notify: NotifySocket) -> None:
    notifier = Notifier(notify.address)
    assert notifier.enabled
    assert notifier.ready("1/1 sources connected")
    assert notifier.status("busy")
    assert notifier.watchdog()
    assert notifier.stopping("stopping")
    await wait_for(lambda: len(notify.poll()) == 4)
    assert notify.messages == [
        {"READY": "1", "STATUS": "1/1 sources connected"},
        {"STATUS": "busy"},
        {"WATCHDOG": "1"},
        {"STOPPING": "1", "STATUS": "stopping"},
    ]


async def test_reloading_carries_the_monotonic_clock(notify: NotifySocket) -> None:
    before = time.monotonic_ns() // 1000
    assert Notifier(notify.address).reloading()
    after = time.monotonic_ns() // 1000
    (message,) = await wait_for(notify.poll)
    assert message["RELOADING"] == "1"
    assert before <= int(message["MONOTONIC_USEC"]) <= after
    assert before <= monotonic_usec() + 1


async def test_a_line_break_in_a_status_cannot_add_a_field(notify: NotifySocket) -> None:
    Notifier(notify.address).status("bad\nREADY=1")
    (message,) = await wait_for(notify.poll)
    assert message == {"STATUS": "bad READY=1"}


def test_without_notify_socket_nothing_is_sent() -> None:
    notifier = Notifier(environ={"WATCHDOG_USEC": "1000000"})
    assert not notifier.enabled
    assert notifier.watchdog_interval is None
    assert not notifier.send("READY=1")
    assert not Notifier("").ready("x")


def test_an_address_systemd_would_not_give_is_ignored(caplog: pytest.LogCaptureFixture) -> None:
    notifier = Notifier("vsock:2:1234")
    assert not notifier.enabled
    assert "not a path or an @abstract name" in caplog.text


def test_a_missing_socket_is_a_warning_then_debug(
    short_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, "tocsin.notify")
    notifier = Notifier(str(short_dir / "gone"))
    assert not notifier.watchdog()
    assert not notifier.watchdog()
    levels = [r.levelname for r in caplog.records if "systemd notify failed" in r.message]
    assert levels == ["WARNING", "DEBUG"]


def test_a_full_socket_never_blocks(short_dir: Path) -> None:
    # Nobody reads this socket: once its queue is full a send fails at once, not blocks.
    path = str(short_dir / "full")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
        notifier = Notifier(path)
        started = time.monotonic()
        sent = 0
        while notifier.status("x" * 1000):
            sent += 1
            assert sent < 100_000
        assert time.monotonic() - started < 5
        assert sent > 0


@pytest.mark.parametrize(
    ("env", "interval"),
    [
        ({"WATCHDOG_USEC": "30000000"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}, None),  # for another process
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({}, None),
    ],
)
def test_watchdog_interval_is_half_of_watchdog_usec(
    env: dict[str, str], interval: float | None
) -> None:
    notifier = Notifier(environ={"NOTIFY_SOCKET": "@x", **env})
    assert notifier.watchdog_interval == interval


# -- Watchdog: what progress means -----------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def progress(
    taken: int = 0,
    waiting: int = 0,
    paused: bool = False,
    probe: float | None = None,
    busy: bool = False,
) -> Progress:
    return Progress(taken=taken, waiting=waiting, paused=paused, probe_age=probe, busy=busy)


def test_an_idle_daemon_makes_progress() -> None:
    clock = Clock()
    dog = Watchdog(10.0, clock)
    for _ in range(5):
        clock.now += 60
        assert dog.stalled(progress(taken=3)) == ""


def test_an_engine_taking_nothing_while_events_wait_stalls_after_the_timeout() -> None:
    clock = Clock()
    dog = Watchdog(10.0, clock)
    assert dog.stalled(progress(taken=1, waiting=5)) == ""
    clock.now += 9
    assert dog.stalled(progress(taken=1, waiting=50)) == ""
    clock.now += 1
    assert dog.stalled(progress(taken=1, waiting=80)) == (
        "the engine has taken no event for 10.0s with 80 waiting"
    )
    clock.now += 1
    assert dog.stalled(progress(taken=2, waiting=80)) == ""  # it took one: progress


def test_an_engine_stuck_on_the_last_batch_stalls_with_nothing_waiting() -> None:
    # Every event was taken in one batch and the engine never finished it.
    clock = Clock()
    dog = Watchdog(10.0, clock)
    assert dog.stalled(progress(taken=3, busy=True)) == ""
    clock.now += 10
    assert dog.stalled(progress(taken=3, busy=True)) == (
        "the engine has taken no event for 10.0s with 0 waiting, a batch in hand"
    )
    assert dog.stalled(progress(taken=3, busy=False)) == ""  # it finished: idle again


def test_a_paused_engine_is_not_stalled() -> None:
    # Intake pauses on a failing commit (a full disk) by design; it says so in STATUS=.
    clock = Clock()
    dog = Watchdog(10.0, clock)
    dog.stalled(progress(taken=1, waiting=5))
    clock.now += 30
    assert dog.stalled(progress(taken=1, waiting=500, paused=True)) == ""


def test_a_store_that_does_not_answer_stalls() -> None:
    dog = Watchdog(10.0, Clock())
    assert dog.stalled(progress(probe=9.9)) == ""
    assert dog.stalled(progress(probe=12.0)) == ("the state database has not answered for 12.0s")
    assert dog.stalled(progress(probe=None)) == ""


# -- an in-process daemon with a stuck engine ------------------------------------------


@asynccontextmanager
async def daemon_with_notify(
    config: Path, address: str, watchdog_usec: int
) -> AsyncIterator[Daemon]:
    notifier = Notifier(address, environ={"WATCHDOG_USEC": str(watchdog_usec)})
    daemon = Daemon(str(config), make_registry(), notifier=notifier)
    async with anyio.create_task_group() as tg:
        await tg.start(daemon.run)
        try:
            yield daemon
        finally:
            daemon.stop()


async def test_pings_stop_while_the_engine_is_stuck_and_resume_after(
    tmp_path: Path,
    notify: NotifySocket,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setenv("PUSH_TOKEN", "s3cret-token")
    async with PushServer() as server, Receiver() as receiver:
        config = write_config(
            tmp_path / "t.toml",
            f"""
[daemon]
state_dir = "state"
drain_timeout = "1s"
[sources.feed]
plugin = "testpush"
url = "{server.url}"
token = {{ env = "PUSH_TOKEN" }}
[actions.hook]
plugin = "webhook"
url = "{receiver.url()}"
[[rules]]
name = "any"
type = "transfer"
actions = ["hook"]
""",
        )
        async with daemon_with_notify(config, notify.address, 200_000) as daemon:
            await wait_for(lambda: notify.count("WATCHDOG") >= 3, what="pings")
            gate = anyio.Event()
            process = daemon._process

            async def stuck(batch: list[Any]) -> None:
                await gate.wait()  # an await that does not return: a wedged engine
                await process(batch)

            monkeypatch.setattr(daemon, "_process", stuck)
            await wait_for(lambda: server.clients)
            for i in range(3):
                await server.push({"id": f"e{i}", "type": "transfer", "data": {}})
            await wait_for(
                lambda: (
                    "not pinging the systemd watchdog: the engine has taken no event" in caplog.text
                ),
                what="the stall to be noticed",
            )
            seen = len(notify.poll())
            await wait_for(lambda: ticks_since(notify, seen) >= 3, what="three more ticks")
            assert not [m for m in notify.messages[seen:] if "WATCHDOG" in m]
            # The three events wait in the stream or in the batch the engine holds.
            lag = re.search(r"intake \d+ waiting, lag ([0-9.]+)s", notify.statuses()[-1])
            assert lag and float(lag[1]) > 0

            gate.set()
            await wait_for(
                lambda: any("WATCHDOG" in m for m in notify.poll()[seen:]), what="pings again"
            )
            await wait_for(lambda: len(receiver.ok()) == 3, what="the alerts")
            assert "pinging the systemd watchdog again" in caplog.text


# -- a real `tocsin run` ---------------------------------------------------------------


async def test_tocsin_run_speaks_the_protocol(tmp_path: Path, notify: NotifySocket) -> None:
    async with emulator_running() as emulator, Hook() as hook:
        config = tmp_path / "tocsin.toml"
        config.write_text(config_text(emulator, {"hook": hook}), encoding="utf-8")
        tocsin = DaemonProcess(config, notify, watchdog_usec=400_000)
        state = StateDB(tmp_path / "state" / "tocsin.sqlite3")
        try:
            tocsin.start()
            await notify.wait("READY")
            # READY=1 comes once the state is open and the source is connected and subscribed.
            assert state.path.exists()
            assert emulator.subscribed == 1
            ready = next(m for m in notify.messages if "READY" in m)
            assert ready["STATUS"] == (
                "1/1 sources connected; outbox 0 pending, 0 dead;"
                " intake 0 waiting, lag 0.0s; 0 frames rejected, 0 reconnects"
            )

            # WATCHDOG=1 at half of WATCHDOG_USEC, with a STATUS= each time.
            await notify.wait("WATCHDOG", n=6)
            pings = [
                t for t, m in zip(notify.times, notify.messages, strict=True) if "WATCHDOG" in m
            ]
            gaps = [b - a for a, b in itertools.pairwise(pings)]
            assert min(gaps) > 0.1 and statistics.median(gaps) < 0.35, gaps

            # The state database stops answering (the test holds its write lock):
            # no pings until it answers again.
            state.lock()
            try:
                await tocsin.wait_log("not pinging the systemd watchdog: the state database")
                seen = len(notify.poll())
                await wait_for(lambda: ticks_since(notify, seen) >= 3, what="three more ticks")
                assert not [m for m in notify.messages[seen:] if "WATCHDOG" in m]
            finally:
                state.unlock()
            await tocsin.wait_log("pinging the systemd watchdog again")
            resumed = len(notify.messages)
            await wait_for(lambda: any("WATCHDOG" in m for m in notify.messages[resumed:]))

            # Reload: RELOADING=1 with MONOTONIC_USEC, then READY=1.
            tocsin.signal(signal.SIGHUP)
            await notify.wait("READY", n=2)
            kinds = [next(iter(m)) for m in notify.messages if {"RELOADING", "READY"} & set(m)]
            assert kinds == ["READY", "RELOADING", "READY"]
            reloading = next(m for m in notify.messages if "RELOADING" in m)
            assert int(reloading["MONOTONIC_USEC"]) <= time.monotonic_ns() // 1000

            tocsin.signal(signal.SIGTERM)
            await notify.wait("STOPPING")
            assert await tocsin.wait_exit(15) == 0
            assert "Traceback" not in tocsin.output()
        finally:
            tocsin.stop_now()
            state.close()
