"""``tocsin demo`` and ``tocsin emulate`` with the tests' own emulator."""

from __future__ import annotations

import socket
from pathlib import Path

import anyio
import pytest

from support import make_registry, wait_for, write_config
from tocsin.demo import loopback, run_demo
from tocsin.errors import UsageError


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def demo_config(tmp_path: Path, feed: int, hook: int, feed_host: str = "127.0.0.1") -> Path:
    return write_config(
        tmp_path / "demo.toml",
        f"""
[daemon]
state_dir = "state"
drain_timeout = "1s"
[sources.feed]
plugin = "testpush"
url = "ws://{feed_host}:{feed}/feed"
token = "s3cret-token"
[actions.hook]
plugin = "webhook"
url = "http://127.0.0.1:{hook}/tocsin"
secret = "demo-hook-secret"
[[rules]]
name = "to me"
type = "transfer"
match = {{ "args.to" = "me" }}
title = "transfer {{{{ args.n }}}}"
""",
    )


async def test_demo_runs_emulator_daemon_and_receiver(tmp_path: Path) -> None:
    lines: list[str] = []
    path = demo_config(tmp_path, free_port(), free_port())
    async with anyio.create_task_group() as tg:
        tg.start_soon(lambda: run_demo(str(path), make_registry(), lines.append, signals=False))
        await wait_for(
            lambda: any("signature ok" in line for line in lines), within=15, what="an alert"
        )
        tg.cancel_scope.cancel()
    assert any(line.startswith("testpush emulator on ws://127.0.0.1:") for line in lines)
    assert any(line.startswith("webhook hook <- [firing] to me: transfer ") for line in lines)
    assert not any("BAD SIGNATURE" in line for line in lines)


async def test_demo_refuses_non_loopback_sources(tmp_path: Path) -> None:
    path = demo_config(tmp_path, 9, free_port(), feed_host="192.0.2.7")
    with pytest.raises(UsageError, match="loopback only"):
        await run_demo(str(path), make_registry(), print, signals=False)


@pytest.mark.parametrize(
    "host, ok",
    [
        ("127.0.0.1", True),
        ("127.3.2.1", True),
        ("localhost", True),
        ("::1", True),
        ("10.0.0.1", False),
        ("example.com", False),
    ],
)
def test_loopback(host: str, ok: bool) -> None:
    assert loopback(host) is ok
