"""A source in a process of its own (``[daemon] source_processes``): the real test source
and server, a real child process, a real webhook receiver."""

from __future__ import annotations

import io
import logging
import os
import signal
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from test_daemon import TOKEN, config_text, transfer

from support import PushServer, Receiver, make_registry, running, wait_for, write_config
from tocsin.daemon import Daemon, SourceRunner
from tocsin.logs import ScrubbingFormatter
from tocsin.sourceproc import HEADER, MAX_MESSAGE, Unpacker, importable, pack

PROCESSES = 'drain_timeout = "2s"\nsource_processes = true\n'


@pytest.fixture(autouse=True)
def _env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PUSH_TOKEN", TOKEN)
    monkeypatch.setenv("HOOK_SECRET", "hook-secret-123")


def own_process(server: PushServer, hook: str, extra_rules: str = "") -> str:
    return config_text(server, hook, extra_rules).replace('drain_timeout = "2s"\n', PROCESSES)


@asynccontextmanager
async def in_own_process(
    tmp_path: Path, edit: Callable[[str], str] = str
) -> AsyncIterator[tuple[PushServer, Receiver, Daemon]]:
    """The test server, a webhook receiver and a daemon whose source runs in a process of
    its own (config ``tmp_path / "t.toml"``, ``edit`` applied), once the source connected."""
    async with PushServer(token=TOKEN) as server, Receiver() as receiver:
        path = write_config(tmp_path / "t.toml", edit(own_process(server, receiver.url())))
        async with running(path) as daemon:
            await wait_for(lambda: server.clients, what="the child to connect")
            yield server, receiver, daemon


def child_pid(runner: SourceRunner) -> int | None:
    return None if runner.child is None else runner.child.pid


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


@contextmanager
def scrubbed_log() -> Iterator[io.StringIO]:
    """What the daemon logs, as its handler writes it (secrets scrubbed)."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(ScrubbingFormatter("%(levelname)s %(name)s: %(message)s"))
    logger = logging.getLogger("tocsin")
    logger.addHandler(handler)
    try:
        yield stream
    finally:
        logger.removeHandler(handler)


@given(st.lists(st.binary(max_size=300), max_size=8), st.data())
def test_messages_come_out_whole_however_the_pipe_cuts_them(
    bodies: list[bytes], data: st.DataObject
) -> None:
    wire = b"".join(pack(body) for body in bodies)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(wire)), max_size=6)))
    unpacker, out, start = Unpacker(), [], 0
    for cut in [*cuts, len(wire)]:
        out += unpacker.feed(wire[start:cut])
        start = cut
    assert out == bodies


def test_an_oversized_message_is_refused() -> None:
    with pytest.raises(ValueError, match="bytes from the source's process"):
        Unpacker().feed(HEADER.pack(MAX_MESSAGE + 1) + b"x")


def test_a_class_a_child_cannot_import_stays_in_the_daemon() -> None:
    class Local:
        pass

    assert not importable(Local)
    assert importable(PushServer)


async def test_the_child_hands_over_only_what_a_rule_may_fire_on_and_counts_the_rest(
    tmp_path: Path,
) -> None:
    async with in_own_process(tmp_path) as (server, receiver, daemon):
        runner, stats = daemon.sources["feed"], daemon.engine.stats
        pid = child_pid(runner)
        assert pid is not None and pid != os.getpid()
        await wait_for(lambda: daemon.taken == 1, what="source.up taken by the engine")
        for i in range(5):
            await server.push(transfer(f"n{i}", to="nobody"))
        await server.push(transfer("m1"))
        await server.push("not json")
        await server.push(
            {"gap": {"reason": "the feed restarted", "since": "2026-12-07T00:00:00Z"}}
        )
        await wait_for(lambda: len(receiver.ok()) == 1, what="the alert")
        await wait_for(lambda: stats.events == 8, what="every event counted")
        assert runner.types["transfer"] == 6 and runner.types["source.gap"] == 1
        assert runner.events == 6  # the source's own events, as in the daemon's process
        assert daemon.taken == 3  # source.up, m1 and the gap: the five went no further
        assert sum(runner.rejected.values()) == 1
        await server.push(transfer("n0", to="nobody", removed=True))  # may retract
        await wait_for(lambda: daemon.taken == 4, what="the removal taken")
        assert runner.last_event is not None
    assert gone(pid), "the child outlived the daemon"
    (alert,) = receiver.ok()
    assert alert.json()["event"]["id"] == "m1"
    assert alert.json()["event"]["source"] == "feed"
    assert alert.json()["event"]["provider"] == "testpush"


async def test_a_killed_child_is_a_crashed_source_started_again(tmp_path: Path) -> None:
    def backoff_1s(text: str) -> str:
        token = 'token = { env = "PUSH_TOKEN" }'
        return text.replace(token, token + '\nmax_backoff = "1s"')

    async with in_own_process(tmp_path, backoff_1s) as (server, receiver, daemon):
        runner = daemon.sources["feed"]
        first = child_pid(runner)
        assert first is not None
        with scrubbed_log() as log:
            os.kill(first, signal.SIGKILL)
            await wait_for(lambda: runner.state == "down", what="the source down")
            assert runner.down_reason == "crashed: its process exited with code -9"
            await wait_for(lambda: runner.state == "up", within=10, what="a new child")
        second = child_pid(runner)
        assert second not in (None, first)
        await wait_for(lambda: server.clients)
        await server.push(transfer("after"))
        await wait_for(lambda: len(receiver.ok()) == 1, what="an alert from the new child")
    assert "source 'feed': crashed: its process exited with code -9" in log.getvalue()
    assert runner.reconnects == 1


async def test_a_crash_inside_the_child_is_logged_there_with_secrets_scrubbed(
    tmp_path: Path,
) -> None:
    async with in_own_process(tmp_path) as (server, _receiver, daemon):
        runner = daemon.sources["feed"]
        pid = child_pid(runner)
        with scrubbed_log() as log:
            await server.push({"print": f"a stray print with {TOKEN}"})
            await server.push({"crash": f"the token {TOKEN} did it"})
            await wait_for(lambda: runner.state == "down", what="the source down")
            await wait_for(lambda: "stray print" in log.getvalue(), what="the print")
        assert runner.down_reason == "crashed: RuntimeError"
        assert child_pid(runner) == pid  # the source restarts in the same process
    out = log.getvalue()
    assert TOKEN not in out
    crash = next(line for line in out.splitlines() if "crashed" in line)
    assert crash.startswith("ERROR tocsin.source.feed: source 'feed' crashed")
    assert "Traceback" in crash and "RuntimeError: the token *** did it" in crash
    assert "WARNING tocsin.source.feed: source 'feed' (its process): a stray print with ***" in out


async def test_a_reload_sends_the_child_the_new_rules(tmp_path: Path) -> None:
    to_you = """
[[rules]]
name = "to you"
source = "feed"
type = "transfer"
match = { "args.to" = "you" }
actions = ["hook"]
"""
    async with in_own_process(tmp_path) as (server, receiver, daemon):
        runner, stats = daemon.sources["feed"], daemon.engine.stats
        await wait_for(lambda: daemon.taken == 1)
        await server.push(transfer("y1", to="you"))
        await wait_for(lambda: stats.events == 2, what="y1 counted")
        assert daemon.taken == 1  # no rule for "you" yet
        write_config(tmp_path / "t.toml", own_process(server, receiver.url(), to_you))
        assert await daemon.reload()
        child = runner.child
        assert child is not None and child.rules_sent == 1
        await wait_for(lambda: child.rules_applied == 1, what="the child to take the rules")
        await server.push(transfer("y2", to="you"))
        await wait_for(lambda: len(receiver.ok()) == 1, what="the alert under the new rule")
        assert daemon.sources["feed"] is runner  # the source itself did not change
    assert receiver.ok()[0].json()["rule"] == "to you"


def own_children() -> set[int]:
    children: set[int] = set()
    for task in os.listdir("/proc/self/task"):
        children.update(map(int, Path(f"/proc/self/task/{task}/children").read_text().split()))
    return children


def test_a_config_refused_after_its_sources_spawned_leaves_no_process(tmp_path: Path) -> None:
    from test_plugins import FragilePlugin

    from tocsin.errors import ConfigError

    server = PushServer(token=TOKEN)  # not started: nothing connects before the refusal
    refused = '[[rules]]\nname = "refused one"\nkind = "fragile"\n'
    text = own_process(server, "http://127.0.0.1:1/hook", refused)
    path = write_config(tmp_path / "t.toml", text)
    before = own_children()
    with pytest.raises(ConfigError, match="could not take this rule"):
        Daemon(str(path), make_registry(FragilePlugin()))
    assert own_children() == before


async def test_source_processes_changed_by_a_reload_waits_for_a_restart(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with PushServer(token=TOKEN) as server, Receiver() as receiver:
        text = config_text(server, receiver.url())
        path = write_config(tmp_path / "t.toml", text)
        async with running(path) as daemon:
            await wait_for(lambda: server.connections == 1)
            # Turned on, and the source changed: it restarts, still in the daemon's process.
            changed = own_process(server, receiver.url()).replace(
                'url = "ws', 'stale_after = "9s"\nurl = "ws'
            )
            write_config(path, changed)
            assert await daemon.reload()
            await wait_for(lambda: server.connections == 2, what="the source restarted")
            assert daemon.sources["feed"].child is None
    assert "[daemon] source_processes changed: the new value applies after a restart" in (
        caplog.text
    )
