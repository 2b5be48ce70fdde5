"""Fixtures of the fault tests (tests/faults/harness.py has the parts)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from tocsin_eospark import EOSParkEmulator

from .harness import DaemonProcess, Hook, NotifySocket, StateDB, emulator_running


@pytest.fixture
async def emulator() -> AsyncIterator[EOSParkEmulator]:
    async with emulator_running() as emu:
        yield emu


@pytest.fixture
async def hook() -> AsyncIterator[Hook]:
    async with Hook() as receiver:
        yield receiver


@pytest.fixture
async def notify() -> AsyncIterator[NotifySocket]:
    sock = NotifySocket()
    sock.start_reading()
    yield sock
    sock.close()


@pytest.fixture
def state(tmp_path: Path) -> Iterator[StateDB]:
    db = StateDB(tmp_path / "state" / "tocsin.sqlite3")
    yield db
    db.close()


@pytest.fixture
def daemon(tmp_path: Path, notify: NotifySocket) -> Iterator[Callable[..., DaemonProcess]]:
    """``daemon(config_text, **options)``: a DaemonProcess on that config (not started)."""
    made: list[DaemonProcess] = []

    def make(text: str, name: str = "tocsin.toml", **options: Any) -> DaemonProcess:
        path = tmp_path / name
        path.write_text(text, encoding="utf-8")
        process = DaemonProcess(path, notify, **options)
        made.append(process)
        return process

    yield make
    for process in made:
        process.stop_now()
