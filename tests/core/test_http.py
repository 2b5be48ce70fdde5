"""The ``[daemon] http`` endpoint of a daemon running in the test's event loop: /healthz,
/readyz, /metrics (parsed as Prometheus text) and the status page, on 127.0.0.1 port 0."""

from __future__ import annotations

import socket
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import pytest
from prometheus_client.parser import text_string_to_metric_families
from websockets.asyncio.server import ServerConnection
from websockets.http11 import Request, Response

import tocsin.daemon
from support import PushServer, Receiver, make_registry, running, wait_for, write_config
from tocsin.daemon import Daemon
from tocsin.errors import ServeError

TOKEN = "s3cret-token"
SECRET = "hook-secret-4242"


@pytest.fixture(autouse=True)
def _env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PUSH_TOKEN", TOKEN)
    monkeypatch.setenv("HOOK_SECRET", SECRET)


def config_text(server: PushServer, hook_url: str, http: str = "127.0.0.1:0") -> str:
    return f"""
[daemon]
state_dir = "state"
drain_timeout = "2s"
http = "{http}"

[sources.feed]
plugin = "testpush"
url = "{server.url}"
token = {{ env = "PUSH_TOKEN" }}

[actions.hook]
plugin = "webhook"
url = "{hook_url}"
secret = {{ env = "HOOK_SECRET" }}
timeout = "2s"
retry = {{ attempts = 1 }}

[[rules]]
name = "incoming transfer"
source = "feed"
type = "transfer"
match = {{ "args.to" = "me" }}
actions = ["hook"]
title = "{{{{ args.amount }}}} from {{{{ args.from }}}}"
"""


def transfer(id: str, to: str = "me", frm: str = "alice") -> dict[str, object]:
    return {"id": id, "type": "transfer", "data": {"args": {"to": to, "from": frm, "amount": 5}}}


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(text: str) -> Samples:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


async def metrics_when(
    client: aiohttp.ClientSession, daemon: Daemon, condition: Any, within: float = 15.0
) -> Samples:
    """Scrape /metrics until ``condition(samples)`` holds (the outbox count is cached 2 s)."""
    deadline = anyio.current_time() + within
    while True:
        status, text = await get(client, daemon, "/metrics")
        assert status == 200
        samples = parse(text)
        if condition(samples):
            return samples
        assert anyio.current_time() < deadline, f"timed out; last scrape:\n{text}"
        await anyio.sleep(0.1)


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def get(client: aiohttp.ClientSession, daemon: Daemon, path: str) -> tuple[int, str]:
    assert daemon.http is not None and daemon.http.url.startswith("http://127.0.0.1:")
    async with client.get(daemon.http.url + path) as response:
        return response.status, await response.text()


async def test_endpoints_count_and_show_what_happened(
    tmp_path: Path, client: aiohttp.ClientSession
) -> None:
    async with PushServer(token=TOKEN) as server, Receiver() as receiver:
        receiver.script = [200, 400]  # the second alert is dead-lettered at once
        path = write_config(tmp_path / "t.toml", config_text(server, receiver.url()))
        async with running(path) as daemon:
            assert await get(client, daemon, "/healthz") == (200, "ok\n")
            assert await get(client, daemon, "/readyz") == (200, "ready\n")
            await wait_for(lambda: server.clients, what="the source to connect")
            await server.push(transfer("t1", frm="<script>alert(1)</script>"))
            await server.push(transfer("t2", to="someone else"))
            await server.push(transfer("t3", frm=SECRET))
            await server.push("this is not json")
            await wait_for(lambda: len(receiver.requests) == 2, what="two deliveries")
            await wait_for(lambda: daemon.dispatcher.outcomes[("hook", "dead")], what="dead")
            await wait_for(lambda: daemon.sources["feed"].rejected, what="the bad frame")

            samples = await metrics_when(
                client, daemon, lambda s: value(s, "tocsin_outbox_dead") == 1
            )
            assert value(samples, "tocsin_events_total", source="feed", type="transfer") == 3
            assert value(samples, "tocsin_events_total", source="feed", type="source.up") == 1
            assert value(samples, "tocsin_source_up", source="feed") == 1
            assert value(samples, "tocsin_source_state", source="feed", state="up") == 1
            assert value(samples, "tocsin_source_state", source="feed", state="down") == 0
            reasons = [k for k in samples if k[0] == "tocsin_frames_rejected_total"]
            assert len(reasons) == 1 and samples[reasons[0]] == 1
            assert value(samples, "tocsin_rule_matches_total", rule="incoming transfer") == 2
            # The index never offers the rule the transfer to someone else.
            assert value(samples, "tocsin_rule_evaluations_total", rule="incoming transfer") == 2
            assert value(samples, "tocsin_alerts_total", status="firing") == 2
            assert (
                value(samples, "tocsin_deliveries_total", action="hook", outcome="delivered") == 1
            )
            assert value(samples, "tocsin_deliveries_total", action="hook", outcome="dead") == 1
            assert value(samples, "tocsin_outbox_pending") == 0
            assert value(samples, "tocsin_state_paused") == 0
            assert value(samples, "tocsin_ready") == 1
            assert value(samples, "tocsin_event_loop_lag_seconds") is not None
            assert all(name.startswith("tocsin_") for name, _ in samples)

            status, page = await get(client, daemon, "/")
            assert status == 200
            assert 'data-source="feed" data-state="up"' in page
            assert 'data-rule="incoming transfer"' in page
            assert "5 from &lt;script&gt;alert(1)&lt;/script&gt;" in page
            assert "<script>" not in page
            assert SECRET not in page and "5 from ***" in page
            assert 'id="dead"' in page and "400" in page  # the dead letter and its error
            assert page.count("<tr data-alert=") == 2
            assert '<meta http-equiv="refresh" content="5">' in page
            assert (
                '<meta http-equiv="refresh" content="1">'
                in (await get(client, daemon, "/?refresh=1"))[1]
            )
            assert (await get(client, daemon, "/nothing-here"))[0] == 404


class GatedServer(PushServer):
    """Holds every WebSocket handshake until ``gate`` is set."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.gate = anyio.Event()
        self.waiting = 0

    async def _hold(self, ws: ServerConnection, request: Request) -> Response | None:
        self.waiting += 1
        await self.gate.wait()
        return None

    def serve_options(self) -> dict[str, Any]:
        return {"process_request": self._hold}


async def test_readyz_is_503_while_starting_and_stopping(
    tmp_path: Path, client: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tocsin.daemon, "SOURCE_START_WAIT", 50.0)  # READY waits for the gate
    async with GatedServer(token=TOKEN) as server, Receiver() as receiver:
        path = write_config(tmp_path / "t.toml", config_text(server, receiver.url()))
        daemon = Daemon(str(path), make_registry())
        async with anyio.create_task_group() as tg:
            tg.start_soon(daemon.run)
            await wait_for(lambda: server.waiting, what="the source's handshake")
            assert await get(client, daemon, "/readyz") == (503, "starting\n")
            assert await get(client, daemon, "/healthz") == (200, "ok\n")
            samples = parse((await get(client, daemon, "/metrics"))[1])
            assert value(samples, "tocsin_ready") == 0
            assert value(samples, "tocsin_source_state", source="feed", state="starting") == 1
            server.gate.set()
            await daemon.ready.wait()
            assert await get(client, daemon, "/readyz") == (200, "ready\n")
            daemon.stop()
            assert daemon.http is not None
            assert await daemon.http.readiness() == "stopping"


async def test_readyz_and_metrics_say_when_intake_is_paused(
    tmp_path: Path, client: aiohttp.ClientSession
) -> None:
    async with PushServer(token=TOKEN) as server, Receiver() as receiver:
        path = write_config(tmp_path / "t.toml", config_text(server, receiver.url()))
        async with running(path) as daemon:
            await wait_for(lambda: server.clients, what="the source to connect")
            # Another process holds the write lock: commits fail (as on a full disk).
            lock = sqlite3.connect(tmp_path / "state" / "tocsin.sqlite3", isolation_level=None)
            try:
                lock.execute("BEGIN IMMEDIATE")
                await server.push(transfer("t1"))
                await wait_for(lambda: daemon.paused, within=30, what="intake to pause")
                status, reason = await get(client, daemon, "/readyz")
                assert status == 503 and reason.startswith("intake paused: ")
                samples = parse((await get(client, daemon, "/metrics"))[1])
                assert value(samples, "tocsin_state_paused") == 1
                assert (value(samples, "tocsin_state_write_failures_total") or 0) >= 1
                lock.execute("ROLLBACK")
            finally:
                lock.close()
            await wait_for(lambda: receiver.ok(), within=30, what="the alert after the pause")
            await wait_for(lambda: not daemon.paused, what="intake to resume")
            assert (await get(client, daemon, "/readyz"))[0] == 200


async def test_counters_survive_a_reload(tmp_path: Path, client: aiohttp.ClientSession) -> None:
    async with PushServer(token=TOKEN) as server, Receiver() as receiver:
        text = config_text(server, receiver.url())
        path = write_config(tmp_path / "t.toml", text)
        async with running(path) as daemon:
            await wait_for(lambda: server.clients, what="the source to connect")
            await server.push(transfer("t1"))
            await wait_for(lambda: receiver.ok(), what="the first alert")
            # The rule and the source both change: a new engine, a new source runner.
            path.write_text(
                text.replace("{{ args.amount }} from", "{{ args.amount }} by").replace(
                    'token = { env = "PUSH_TOKEN" }',
                    'token = { env = "PUSH_TOKEN" }\nstale_after = "1h"',
                )
            )
            assert await daemon.reload()
            await wait_for(lambda: daemon.sources["feed"].state == "up", what="the reconnect")
            await server.push(transfer("t2"))
            await wait_for(lambda: len(receiver.ok()) == 2, what="the second alert")
            samples = parse((await get(client, daemon, "/metrics"))[1])
            assert value(samples, "tocsin_rule_matches_total", rule="incoming transfer") == 2
            assert value(samples, "tocsin_events_total", source="feed", type="transfer") == 2
            assert (
                value(samples, "tocsin_deliveries_total", action="hook", outcome="delivered") == 2
            )


def _taken_port() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    return sock


def _config_on(tmp_path: Path, port: int) -> Path:
    return write_config(
        tmp_path / "t.toml",
        f'[daemon]\nstate_dir = "state"\nhttp = "127.0.0.1:{port}"\n'
        '[actions.console]\nplugin = "log"\n',
    )


async def test_an_address_in_use_stops_start_up(tmp_path: Path) -> None:
    with _taken_port() as taken:
        daemon = Daemon(str(_config_on(tmp_path, taken.getsockname()[1])), make_registry())
        with pytest.raises(BaseExceptionGroup) as caught:
            await daemon.run()
    assert caught.group_contains(ServeError, match="address already in use")
    assert not daemon.ready.is_set()


def test_run_says_the_address_is_in_use_in_one_sentence(tmp_path: Path) -> None:
    with _taken_port() as taken:
        port = taken.getsockname()[1]
        run = subprocess.run(
            [sys.executable, "-m", "tocsin.cli", "run", "-c", str(_config_on(tmp_path, port))],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert run.returncode == 2
    assert "Traceback" not in run.stderr
    assert run.stderr.strip().splitlines()[-1] == (
        f"tocsin: cannot serve [daemon] http on 127.0.0.1:{port}: address already in use"
    )


def test_a_daemon_with_no_endpoint_never_imports_aiohttp(tmp_path: Path) -> None:
    # aiohttp's web server took 0.18 s of a 1.4 s start-up with 10,000 rules (make bench):
    # it is imported only when [daemon] http is set.
    def imported(head: str) -> str:
        config = write_config(tmp_path / "tocsin.toml", f'[daemon]\nstate_dir = "state"\n{head}')
        script = (
            "import sys\n"
            "from tocsin.daemon import Daemon\n"
            "from tocsin.plugins import build_registry, make_plugin_manager\n"
            f"Daemon({str(config)!r}, build_registry(make_plugin_manager()))\n"
            "print('aiohttp.web' in sys.modules)\n"
        )
        out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        return out.stdout.strip()

    assert imported("") == "False"
    assert imported('http = "127.0.0.1:0"\n') == "True"
