"""``tocsin demo`` on rules.example.toml, as a new user runs it (ports moved to free ones)."""

from __future__ import annotations

import contextlib
import os
import re
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FIXED_PORTS = re.compile(r"127\.0\.0\.1:(91\d\d)")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def cli_env(**extra: str) -> dict[str, str]:
    """The environment of a user's shell: every installed plugin loads."""
    env = {k: v for k, v in os.environ.items() if k != "TOCSIN_LOAD_PLUGINS"}
    return {**env, **extra}


def read_until(
    proc: subprocess.Popen[str], done: Callable[[list[str]], bool], deadline: float, what: str
) -> list[str]:
    """Lines of ``proc``'s stdout until ``done(lines)``; fails at ``deadline`` (monotonic).

    Reads the pipe's file descriptor itself: ``readline()`` on the text wrapper buffers
    lines that ``select()`` then no longer sees as ready.
    """
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    lines: list[str] = []
    pending = b""
    while not done(lines):
        assert time.monotonic() < deadline, f"{what}:\n" + "".join(lines)
        ready, _, _ = select.select([fd], [], [], 0.5)
        if ready:
            chunk = os.read(fd, 65536)
            assert chunk, f"{what}: the process closed its output:\n" + "".join(lines)
            pending += chunk
            *complete, pending = pending.split(b"\n")
            lines += [line.decode() + "\n" for line in complete]
    return lines


def test_demo_shows_alerts_within_ten_seconds_and_stops_on_ctrl_c(tmp_path: Path) -> None:
    text = (ROOT / "rules.example.toml").read_text()
    ports = {port: str(free_port()) for port in set(FIXED_PORTS.findall(text))}
    assert ports, "rules.example.toml points its sources at fixed loopback ports"
    config = tmp_path / "rules.toml"
    config.write_text(FIXED_PORTS.sub(lambda m: "127.0.0.1:" + ports[m.group(1)], text))
    started = time.monotonic()
    with subprocess.Popen(
        [sys.executable, "-m", "tocsin.cli", "demo", "-c", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=cli_env(TOCSIN_HOOK_SECRET="demo-secret"),
    ) as proc:
        assert proc.stdout is not None
        try:
            seen = read_until(
                proc,
                lambda lines: any("signature ok" in line for line in lines),
                started + 10,
                "no alert within 10 s",
            )
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=30)
            rest = proc.stdout.read()  # not communicate(): it skips what readline() buffered
        finally:
            if proc.poll() is None:
                proc.kill()
        assert proc.returncode == 0, rest
    output = "".join(seen) + rest
    assert "Traceback" not in output
    assert "emulator on ws://127.0.0.1:" in output
    assert "ALERT [firing]" in output


@contextlib.contextmanager
def emulate(provider: str, port: int, *settings: str) -> Iterator[list[str]]:
    """``tocsin emulate PROVIDER --port PORT ARGS``, running, with the lines it printed up
    to its source table; stopped with SIGINT at the end (and the rest of its lines added)."""
    command = [sys.executable, "-m", "tocsin.cli", "emulate", provider, "--port", str(port)]
    with subprocess.Popen(
        [*command, *settings],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=cli_env(),
    ) as proc:
        assert proc.stdout is not None
        try:
            lines = read_until(
                proc,
                lambda lines: any(line.startswith(f"[sources.{provider}]") for line in lines),
                time.monotonic() + 20,
                "no source table within 20 s",
            )
            yield lines
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=30)
            lines += proc.stdout.read().splitlines(keepends=True)
        finally:
            if proc.poll() is None:
                proc.kill()
        assert proc.returncode == 0


def test_emulate_runs_one_emulator_and_prints_its_source_table() -> None:
    port = free_port()
    with emulate("eospark", port) as lines, socket.create_connection(("127.0.0.1", port), 5):
        pass  # it listens where it said
    assert lines[0].startswith(f"eospark emulator on ws://127.0.0.1:{port}/")
    assert f'url = "ws://127.0.0.1:{port}/v1/ws"\n' in lines


def test_emulate_refuses_unknown_providers_and_other_addresses() -> None:
    env = cli_env()
    run = subprocess.run(
        [sys.executable, "-m", "tocsin.cli", "emulate", "eosprak"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert run.returncode == 2 and 'no emulator "eosprak" (did you mean "eospark"?)' in run.stderr
    run = subprocess.run(
        [sys.executable, "-m", "tocsin.cli", "emulate", "ckex", "--host", "0.0.0.0"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert run.returncode == 2 and "loopback only" in run.stderr and "Traceback" not in run.stderr


def test_emulate_takes_settings_for_the_other_readings_of_a_protocol() -> None:
    # PROTOCOLS.md: what is only inferred has a switch; --set reaches it from the shell.
    port = free_port()
    settings = ("--set", "refusal=403", "--set", "snapshot=false")
    with emulate("ckex", port, *settings), socket.create_connection(("127.0.0.1", port), 5) as conn:
        conn.sendall(
            b"GET /dev-f/quote/do-not-look-back HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
        )
        answer = conn.recv(200)
    assert answer.startswith(b"HTTP/1.1 403 "), answer  # no token: refused as set (not 401)
    command = [sys.executable, "-m", "tocsin.cli", "emulate", "ckex", "--set", "refusel=403"]
    wrong = subprocess.run(command, capture_output=True, text=True, env=cli_env(), timeout=60)
    assert wrong.returncode == 2 and wrong.stderr.strip() == (
        "tocsin: --set 'refusel=403': the ckex emulator has no setting \"refusel\""
        ' (did you mean "refusal"?) (NAME=VALUE; it takes alive_interval, fancy_eid,'
        " fancy_type, market_ttl, quote_interval, refusal, require_start, secret, snapshot)"
    )


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("refusal=402", "--set refusal: '402' is not one of 401, 403, close"),
        ("snapshot=maybe", "--set snapshot: 'maybe' is not true or false"),
        ("quote_interval=soon", "--set quote_interval: 'soon' is not a number"),
        ("quote_interval=-1", "--set quote_interval: '-1' is not a number from 0"),
        ("quote_interval=nan", "--set quote_interval: 'nan' is not a finite number"),
        ("refusal", "NAME=VALUE"),
    ],
)
def test_emulate_refuses_a_setting_it_cannot_read(setting: str, message: str) -> None:
    from tocsin_ckex.emulator import CkexEmulator

    from tocsin.demo import emulator_settings
    from tocsin.errors import UsageError

    with pytest.raises(UsageError, match=re.escape(message)):
        emulator_settings(CkexEmulator, "ckex", [setting])
    assert emulator_settings(
        CkexEmulator, "ckex", ["refusal=close", "snapshot=off", "quote-interval=0.5"]
    ) == {"refusal": "close", "snapshot": False, "quote_interval": 0.5}
    assert emulator_settings(CkexEmulator, "ckex", ["refusal=403"]) == {"refusal": 403}
