"""End to end: a WebSocket source -> rules -> outbox -> a real webhook receiver."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import pytest

from support import (
    PushServer,
    PushSource,
    Receiver,
    make_registry,
    running,
    wait_for,
    write_config,
)
from tocsin import Event
from tocsin import daemon as daemon_module
from tocsin.daemon import Checkpoint, Daemon, SourceRunner
from tocsin.store import Store
from tocsin_builtin.webhook import verify

SECRET = "hook-secret-123"
TOKEN = "s3cret-token"


@pytest.fixture(autouse=True)
def _env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PUSH_TOKEN", TOKEN)
    monkeypatch.setenv("HOOK_SECRET", SECRET)


def config_text(server: PushServer, hook_url: str, extra_rules: str = "", retry: str = "") -> str:
    return f"""
[daemon]
state_dir = "state"
drain_timeout = "2s"

[sources.feed]
plugin = "testpush"
url = "{server.url}"
token = {{ env = "PUSH_TOKEN" }}

[actions.hook]
plugin = "webhook"
url = "{hook_url}"
secret = {{ env = "HOOK_SECRET" }}
timeout = "2s"
retry = {{ attempts = 20, backoff = "20ms", max_backoff = "100ms" {retry} }}

[[rules]]
name = "incoming transfer"
source = "feed"
type = "transfer"
match = {{ "args.to" = "me" }}
actions = ["hook"]
title = "{{{{ args.amount }}}} from {{{{ args.from }}}}"
group_by = ["args.from"]
{extra_rules}
"""


# A rule the index finds for every transfer to "nobody" and that fires on none of them:
# those events then go through the intake and the engine (an event no rule can fire on
# stops at its source), which the tests of the intake's bounds need.
TO_NOBODY = """
[[rules]]
name = "large transfer to nobody"
source = "feed"
type = "transfer"
match = { "args.to" = "nobody" }
when = "args.amount > 1000"
actions = ["hook"]
"""


def transfer(
    id: str, to: str = "me", frm: str = "alice", amount: int = 5, removed: bool = False
) -> dict[str, object]:
    return {
        "id": id,
        "type": "transfer",
        "data": {"args": {"to": to, "from": frm, "amount": amount}},
        "removed": removed,
    }


async def test_match_to_signed_webhook(tmp_path: Path) -> None:
    async with PushServer(token=TOKEN) as server, Receiver() as receiver:
        path = write_config(tmp_path / "t.toml", config_text(server, receiver.url()))
        async with running(path) as daemon:
            await wait_for(lambda: server.clients, what="the source to connect")
            await server.push(transfer("t1"))
            await server.push(transfer("t2", to="someone else"))
            await server.push("this is not json")
            await wait_for(lambda: receiver.ok(), what="the webhook")
            await wait_for(
                lambda: daemon.sources["feed"].rejected, what="the malformed frame to be counted"
            )
        (request,) = receiver.requests
        body = request.json()
        assert body["status"] == "firing"
        assert body["rule"] == "incoming transfer"
        assert body["title"] == "5 from alice"
        assert body["event"]["id"] == "t1"
        assert body["event"]["source"] == "feed"
        assert body["event"]["provider"] == "testpush"
        assert body["event"]["data"]["args"]["to"] == "me"
        assert set(body) == {"id", "status", "rule", "title", "body", "fired_at", "event"}
        assert request.headers["Idempotency-Key"] == body["id"]
        assert request.headers["Content-Type"] == "application/json"
        timestamp = request.headers["X-Tocsin-Timestamp"]
        assert timestamp.isdigit()
        assert verify(
            SECRET.encode(), timestamp, request.body, request.headers["X-Tocsin-Signature"]
        )
        assert daemon.sources["feed"].rejected


async def test_a_template_that_would_run_for_ever_costs_its_alert_a_title_only(
    tmp_path: Path,
) -> None:
    # An audit's title froze the daemon at the first matching event: no alert went out,
    # /healthz stopped answering and SIGTERM was ignored.
    bomb = (
        '[[rules]]\nname = "bomb"\ntype = "transfer"\nactions = ["hook"]\n'
        'title = "{% for a in args.many %}{% for b in args.many %}{% for c in args.many %}'
        '{% endfor %}{% endfor %}{% endfor %}done"\n'
    )
    async with PushServer(token=TOKEN) as server, Receiver() as receiver:
        path = write_config(tmp_path / "t.toml", config_text(server, receiver.url(), bomb))
        async with running(path):
            await wait_for(lambda: server.clients, what="the source to connect")
            event = transfer("t1")
            event["data"]["args"]["many"] = list(range(5000))  # type: ignore[index]
            await server.push(event)
            await wait_for(lambda: len(receiver.ok()) == 2, what="both alerts")
    titles = sorted(r.json()["title"] for r in receiver.requests)
    assert titles == ["(title could not be rendered: Overrun)", "5 from alice"]


async def test_an_event_no_rule_can_fire_on_is_counted_and_stops_at_its_source(
    tmp_path: Path,
) -> None:
    async with PushServer(token=TOKEN) as server, Receiver() as receiver:
        path = write_config(tmp_path / "t.toml", config_text(server, receiver.url()))
        async with running(path) as daemon:
            await wait_for(lambda: server.clients)
            await wait_for(lambda: daemon.taken == 1, what="source.up taken by the engine")
            runner, stats = daemon.sources["feed"], daemon.engine.stats
            for i in range(5):  # emit(), one frame at a time
                await server.push(transfer(f"n{i}", to="nobody"))
            await server.push(transfer("m1"))
            await wait_for(lambda: len(receiver.ok()) == 1, what="the alert")
            await wait_for(lambda: stats.events == 7, what="every event evaluated")
            assert runner.types["transfer"] == 6  # received, per source and type (/metrics)
            assert daemon.taken == 2  # source.up and m1: the five went no further
            # emit_many(): a read's events, those a rule may fire on kept in order.
            batch = [
                runner.event("transfer", transfer(i, to=to)["data"], id=i)  # type: ignore[arg-type]
                for i, to in (("n5", "nobody"), ("m2", "me"), ("n6", "nobody"), ("m3", "me"))
            ]
            await runner.emit_many(batch)
            await wait_for(lambda: len(receiver.ok()) == 3, what="two more alerts")
            assert [r.json()["event"]["id"] for r in receiver.ok()] == ["m1", "m2", "m3"]
            assert (daemon.taken, stats.events, runner.types["transfer"]) == (4, 11, 10)
            # sift(): a source asks before it builds the event; what it drops is counted.
            assert not runner.sift("transfer", {"args": {"to": "nobody"}})
            assert runner.sift("transfer", {"args": {"to": "me"}})
            assert (stats.events, runner.types["transfer"], runner.events) == (12, 11, 11)
            # A removal goes to the engine whatever its data: it may retract an alert.
            await server.push(transfer("n0", to="nobody", removed=True))
            await wait_for(lambda: daemon.taken == 5, what="the removal taken")
        assert len(receiver.requests) == 3  # it retracted nothing: nothing had fired on n0


async def test_apprise_json_to_local_server(tmp_path: Path) -> None:
    async with PushServer(token=TOKEN) as server, Receiver() as receiver:
        text = (
            config_text(server, receiver.url()).replace('actions = ["hook"]', 'actions = ["phone"]')
            + f"""
[actions.phone]
plugin = "apprise"
urls = ["json://127.0.0.1:{receiver.port}/notify", "json://127.0.0.1:{receiver.port}/second"]
"""
        )
        path = write_config(tmp_path / "t.toml", text)
        async with running(path):
            await wait_for(lambda: server.clients)
            await server.push(transfer("a1", amount=42))
            await wait_for(lambda: len(receiver.ok()) == 2, what="both Apprise URLs")
        paths = sorted(r.path for r in receiver.requests)
        assert paths == ["/notify", "/second"]
        for request in receiver.requests:
            message = request.json()
            assert message["title"] == "42 from alice"
            assert "transfer from feed" in message["message"]


async def test_duplicates_alert_once_also_across_restart(tmp_path: Path) -> None:
    async with PushServer(token=TOKEN) as server, Receiver() as receiver:
        path = write_config(tmp_path / "t.toml", config_text(server, receiver.url()))
        async with running(path):
            await wait_for(lambda: server.clients)
            for _ in range(3):
                await server.push(transfer("dup"))
            await server.push(transfer("marker", frm="zed"))
            await wait_for(lambda: len(receiver.ok()) == 2)
        assert sorted(r.json()["event"]["id"] for r in receiver.ok()) == ["dup", "marker"]
        async with running(path) as daemon:  # a restart on the same state
            await wait_for(lambda: server.clients)
            await server.push(transfer("dup"))
            await server.push(transfer("after", frm="yan"))
            await wait_for(lambda: len(receiver.ok()) == 3)
            await wait_for(lambda: daemon.engine.stats.events >= 3)
            # The re-sent fact is counted a duplicate, not an alert made (/metrics).
            stats = daemon.engine.stats
            assert (stats.alerts, stats.duplicates) == (1, 1)
            assert stats.alerts_per_rule["incoming transfer"] == 1
        assert [r.json()["event"]["id"] for r in receiver.ok()][2] == "after"
        assert len(receiver.requests) == 3


async def test_failing_webhook_gets_everything_in_order_per_group(tmp_path: Path) -> None:
    async with PushServer(token=TOKEN) as server, Receiver(script=[500, 503, 500, 429]) as receiver:
        path = write_config(tmp_path / "t.toml", config_text(server, receiver.url()))
        async with running(path) as daemon:
            await wait_for(lambda: server.clients)
            for i in range(5):
                await server.push(transfer(f"a{i}", frm="alice", amount=i))
            for i in range(3):
                await server.push(transfer(f"b{i}", frm="bob", amount=i))
            await wait_for(lambda: len(receiver.ok()) == 8, what="all 8 alerts")
            with anyio.fail_after(10):  # the last answer may still be on its way to the outbox
                while (counts := await daemon.store.call(Store.counts))["done"] < 8:  # noqa: ASYNC110
                    await anyio.sleep(0.02)
        delivered = [r.json()["event"]["id"] for r in receiver.ok()]
        assert [i for i in delivered if i.startswith("a")] == [f"a{i}" for i in range(5)]
        assert [i for i in delivered if i.startswith("b")] == [f"b{i}" for i in range(3)]
        assert [r.status for r in receiver.requests[:4]] == [500, 503, 500, 429]
        assert counts["done"] == 8 and counts["pending"] == 0 and counts["dead"] == 0


async def test_rejected_delivery_is_dead_lettered_listed_and_resent(tmp_path: Path) -> None:
    async with PushServer(token=TOKEN) as server, Receiver(script=[400]) as receiver:
        path = write_config(tmp_path / "t.toml", config_text(server, receiver.url()))
        # The CLI reads the same state; it needs no source plugin of the tests.
        cli_config = write_config(
            tmp_path / "cli.toml",
            f'[daemon]\nstate_dir = "state"\n[actions.hook]\nplugin = "webhook"\nurl = "{receiver.url()}"\n',
        )
        async with running(path) as daemon:
            await wait_for(lambda: server.clients)
            await server.push(transfer("bad-one"))

            async def dead() -> int:
                return (await daemon.store.call(Store.counts))["dead"]

            deadline = anyio.current_time() + 10
            while await dead() != 1:
                assert anyio.current_time() < deadline, "the 400 was not dead-lettered"
                await anyio.sleep(0.02)
            assert len(receiver.requests) == 1  # a 400 is not retried

            listing = await anyio.to_thread.run_sync(cli, "outbox", "-c", str(cli_config))
            assert listing.returncode == 0, listing.stderr
            assert "0 pending, 1 dead-lettered, 0 delivered" in listing.stdout
            assert "incoming transfer" in listing.stdout
            assert "HTTP 400" in listing.stdout
            seq = listing.stdout.splitlines()[2].split()[0]

            again = await anyio.to_thread.run_sync(
                cli, "outbox", "-c", str(cli_config), "retry", seq
            )
            assert again.returncode == 0 and "1 dead-lettered delivery queued again" in again.stdout
            daemon.dispatcher.wake(["hook"])  # a running daemon would find it within 5 s anyway
            await wait_for(lambda: receiver.ok(), what="the re-sent delivery")
        assert receiver.ok()[0].json()["event"]["id"] == "bad-one"


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "TOCSIN_LOAD_PLUGINS": "builtin"}
    return subprocess.run(
        [sys.executable, "-m", "tocsin.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )


async def test_retraction_and_re_add(tmp_path: Path) -> None:
    async with PushServer(token=TOKEN) as server, Receiver() as receiver:
        path = write_config(tmp_path / "t.toml", config_text(server, receiver.url()))
        async with running(path):
            await wait_for(lambda: server.clients)
            await server.push(transfer("fact"))
            await wait_for(lambda: len(receiver.ok()) == 1)
            await server.push(transfer("fact", removed=True))
            await wait_for(lambda: len(receiver.ok()) == 2)
            await server.push(transfer("fact"))  # the chain switched back
            await wait_for(lambda: len(receiver.ok()) == 3)
            await server.push(transfer("fact"))  # pushed again, no retraction: nothing
            await server.push(
                transfer("never-fired", to="other", removed=True)
            )  # fired nothing: nothing
            await server.push(transfer("marker", frm="zed"))
            await wait_for(lambda: len(receiver.ok()) == 4)
        bodies = [r.json() for r in receiver.ok()]
        assert [(b["status"], b["event"]["id"], b["event"]["removed"]) for b in bodies] == [
            ("firing", "fact", False),
            ("retracted", "fact", True),
            ("firing", "fact", False),
            ("firing", "marker", False),
        ]
        assert len({b["id"] for b in bodies}) == 4
        assert bodies[1]["title"].startswith("[retracted]")


async def test_source_down_and_reconnect(tmp_path: Path) -> None:
    async with PushServer(token=TOKEN) as server, Receiver() as receiver:
        rules = '[[rules]]\nname = "feed down"\ntype = "source.down"\nactions = ["hook"]\ntitle = "{{ source }}: {{ reason }}"\n'
        path = write_config(tmp_path / "t.toml", config_text(server, receiver.url(), rules))
        async with running(path) as daemon:
            await wait_for(lambda: server.clients)
            await server.drop_all()
            await wait_for(lambda: server.connections == 2, what="the reconnect")
            await wait_for(lambda: server.clients)
            await server.push(transfer("after-reconnect"))
            await wait_for(lambda: len(receiver.ok()) == 2)
            assert daemon.sources["feed"].reconnects == 1
            assert daemon.sources["feed"].state == "up"
        kinds = sorted(r.json()["event"]["type"] for r in receiver.ok())
        assert kinds == ["source.down", "transfer"]
        down = next(r.json() for r in receiver.ok() if r.json()["event"]["type"] == "source.down")
        assert down["title"].startswith("feed: connection lost")


async def test_gap_detail_reaches_rules_and_the_webhook(tmp_path: Path) -> None:
    async with PushServer(token=TOKEN) as server, Receiver() as receiver:
        rules = (
            '[[rules]]\nname = "missed blocks"\ntype = "source.gap"\n'
            'match = { topic = "snapshot_block" }\nactions = ["hook"]\n'
            'title = "{{ source }} missed {{ from_height }}..{{ to_height }}"\n'
        )
        path = write_config(tmp_path / "t.toml", config_text(server, receiver.url(), rules))
        async with running(path):
            await wait_for(lambda: server.clients)
            detail = {"topic": "snapshot_block", "from_height": 120, "to_height": 1300}
            await server.push({"gap": {"reason": "over the backfill limit", "since": "x"}})
            await server.push(
                {"gap": {"reason": "over the backfill limit", "since": "x", "detail": detail}}
            )
            await wait_for(lambda: receiver.ok(), what="the gap alert")
        (request,) = receiver.ok()
        body = request.json()
        assert body["title"] == "feed missed 120..1300"
        data = body["event"]["data"]
        assert data["source"] == "feed"
        assert data["reason"] == "over the backfill limit"
        assert (data["since"], data["from_height"], data["to_height"]) == ("x", 120, 1300)
        assert data["until"]  # now, when the source gives no end time


async def test_reload_keeps_unchanged_source_and_refuses_bad_file(tmp_path: Path) -> None:
    async with PushServer(token=TOKEN) as server, Receiver() as receiver:
        path = write_config(tmp_path / "t.toml", config_text(server, receiver.url()))
        async with running(path) as daemon:
            await wait_for(lambda: server.clients)
            path.write_text(
                config_text(server, receiver.url()).replace('"args.to" = "me"', '"args.to" = "you"')
            )
            assert await daemon.reload()
            await server.push(transfer("to-me"))
            await server.push(transfer("to-you", to="you"))
            await wait_for(lambda: len(receiver.ok()) == 1)
            assert server.connections == 1, "an unchanged source keeps its connection"
            path.write_text("[[rules]]\nname = 1\n")
            assert not await daemon.reload()
            await server.push(transfer("to-you-2", to="you", frm="bo"))
            await wait_for(lambda: len(receiver.ok()) == 2)
        assert [r.json()["event"]["id"] for r in receiver.ok()] == ["to-you", "to-you-2"]
        assert server.connections == 1


async def test_a_reload_names_what_waits_for_a_restart_and_none_runs_while_stopping(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    async with PushServer(token=TOKEN) as server, Receiver() as receiver:
        text = config_text(server, receiver.url())
        path = write_config(tmp_path / "t.toml", text)
        async with running(path) as daemon:
            await wait_for(lambda: server.clients)
            path.write_text(text.replace("[daemon]", "[daemon]\nfsync = true\nqueue_size = 500"))
            assert await daemon.reload()
            for key in ("fsync", "queue_size"):
                assert f"[daemon] {key} changed: the new value applies after a restart" in (
                    caplog.text
                )
            assert "state_dir changed" not in caplog.text
            daemon.stop()
            # A SIGHUP while draining: no source restarts, no READY=1 after STOPPING=1.
            path.write_text(text.replace('url = "ws', 'stale_after = "9s"\nurl = "ws'))
            assert not await daemon.reload()
            assert "reload ignored: the daemon is stopping" in caplog.text
            assert "config reloaded: 1 rule(s)" in caplog.text  # the first one only
            assert caplog.text.count("config reloaded") == 1
        assert server.connections == 1


async def test_deliveries_of_a_removed_action_are_dead_lettered_not_pending_for_ever(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with PushServer(token=TOKEN) as server, Receiver(script=[500] * 1000) as receiver:
        text = config_text(server, receiver.url())
        path = write_config(tmp_path / "t.toml", text)
        async with running(path) as daemon:
            await wait_for(lambda: server.clients)
            await server.push(transfer("t1"))
            await server.push(transfer("t2", frm="bo"))
            await wait_for(lambda: len(receiver.requests) >= 2, what="two failing tries")
            head, rules = text.split("[actions.hook]")[0], text.split("[[rules]]")[1]
            rules = rules.replace('actions = ["hook"]', 'actions = ["console"]')
            path.write_text(f'{head}[actions.console]\nplugin = "log"\n\n[[rules]]{rules}')
            assert await daemon.reload()
            pending, dead, _ = await daemon.store.call(Store.depth)
        assert (pending, dead) == (0, 2)
        assert "action 'hook' is no longer configured: its 2 pending deliveries are" in caplog.text
        listed = cli("outbox", "-c", str(path), "--json")
        assert listed.returncode == 0, listed.stderr
        deliveries = json.loads(listed.stdout)["deliveries"]
        assert [(d["state"], d["action"]) for d in deliveries] == [("dead", "hook")] * 2
        assert {d["last_error"] for d in deliveries} == {"action 'hook' is no longer configured"}


async def test_a_reload_that_stop_overtakes_is_abandoned(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # SIGHUP, then SIGTERM while the reload starts a changed action: the reload must not
    # go on to restart sources during the drain, nor say READY=1 after STOPPING=1.
    caplog.set_level(logging.INFO)
    entered, gate = anyio.Event(), anyio.Event()
    make_action = Daemon._make_action

    async def slow_make_action(self: Daemon, name: str, config: Any) -> Any:
        entered.set()
        await gate.wait()
        return await make_action(self, name, config)

    async with PushServer(token=TOKEN) as server, Receiver() as receiver:
        text = config_text(server, receiver.url())
        path = write_config(tmp_path / "t.toml", text)
        async with running(path) as daemon:
            await wait_for(lambda: server.clients)
            monkeypatch.setattr(Daemon, "_make_action", slow_make_action)
            readies: list[bool] = []
            monkeypatch.setattr(daemon.notifier, "ready", lambda _: readies.append(True))
            changed = text.replace('timeout = "2s"', 'timeout = "3s"')
            path.write_text(changed.replace('url = "ws', 'stale_after = "9s"\nurl = "ws'))
            result: list[bool] = []
            async with anyio.create_task_group() as tg:

                async def reload() -> None:
                    result.append(await daemon.reload())

                tg.start_soon(reload)
                with anyio.fail_after(5):
                    await entered.wait()
                daemon.stop()
                gate.set()
        assert result == [False] and readies == []
        assert "reload abandoned: the daemon is stopping" in caplog.text
        assert "config reloaded" not in caplog.text
        assert server.connections == 1  # the changed source was not restarted


async def test_throttle_survives_a_restart_unless_the_rule_changed(tmp_path: Path) -> None:
    async with PushServer(token=TOKEN) as server, Receiver() as receiver:
        text = config_text(server, receiver.url()).replace(
            'group_by = ["args.from"]', 'group_by = ["args.from"]\nthrottle = "1h"'
        )
        path = write_config(tmp_path / "t.toml", text)
        async with running(path):
            await wait_for(lambda: server.clients)
            await server.push(transfer("first", frm="alice"))
            await wait_for(lambda: len(receiver.ok()) == 1)
        async with running(path) as daemon:
            await wait_for(lambda: server.clients)
            await server.push(transfer("second", frm="alice"))  # within the hour: throttled
            await server.push(transfer("other", frm="bob"))
            await wait_for(lambda: len(receiver.ok()) == 2)
            await wait_for(lambda: daemon.engine.stats.throttled == 1)
        path.write_text(text.replace('throttle = "1h"', 'throttle = "2h"'))
        async with running(path):
            await wait_for(lambda: server.clients)
            await server.push(transfer("third", frm="alice"))  # a changed rule starts fresh
            await wait_for(lambda: len(receiver.ok()) == 3)
        assert [r.json()["event"]["id"] for r in receiver.ok()] == ["first", "other", "third"]


async def test_auth_refusal_waits_max_backoff_and_says_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PUSH_TOKEN", "wrong-token")
    async with PushServer(token=TOKEN) as server, Receiver() as receiver:
        rules = '[[rules]]\nname = "feed down"\ntype = "source.down"\nactions = ["hook"]\ntitle = "{{ reason }}"\n'
        text = config_text(server, receiver.url(), rules).replace(
            'token = { env = "PUSH_TOKEN" }', 'token = { env = "PUSH_TOKEN" }\nmax_backoff = "1h"'
        )
        path = write_config(tmp_path / "t.toml", text)
        async with running(path) as daemon:
            await wait_for(lambda: receiver.ok(), what="the source.down alert")
            runner = daemon.sources["feed"]
            assert runner.state == "down"
        assert server.refused == 1, "a refused key is not retried in a loop"
        assert receiver.ok()[0].json()["title"] == "refused: the server refused the token"


async def test_a_crashing_rule_kind_costs_only_its_own_rule(tmp_path: Path) -> None:
    from collections.abc import Callable

    from tocsin import Firing, RuleKind, hookimpl

    class Explodes(RuleKind):
        name = "explodes"

        def on_event(self, event: Event, group_key: str, now: float) -> list[Firing]:
            raise ZeroDivisionError("plugin bug")

    class Plugin:
        @staticmethod
        @hookimpl
        def register_rule_kinds(register: Callable[[type[RuleKind]], None]) -> None:
            register(Explodes)

    async with PushServer(token=TOKEN) as server, Receiver() as receiver:
        rules = (
            '[[rules]]\nname = "buggy"\nkind = "explodes"\ntype = "transfer"\nactions = ["hook"]\n'
        )
        path = write_config(tmp_path / "t.toml", config_text(server, receiver.url(), rules))
        async with running(path, make_registry(Plugin())) as daemon:
            await wait_for(lambda: server.clients)
            await server.push(transfer("one"))
            await server.push(transfer("two", frm="bob"))
            await wait_for(lambda: len(receiver.ok()) == 2)
            assert daemon.engine.stats.kind_errors == 2
        assert {r.json()["rule"] for r in receiver.ok()} == {"incoming transfer"}


def small_intake(server: PushServer, receiver: Receiver) -> str:
    """The config with an intake of 10 events."""
    return config_text(server, receiver.url()).replace(
        'drain_timeout = "2s"', 'drain_timeout = "2s"\nqueue_size = 10'
    )


@asynccontextmanager
async def full_intake(tmp_path: Path) -> AsyncIterator[tuple[Daemon, Receiver, anyio.Event]]:
    """A daemon with an intake of 10 events (``small_intake``), its source connected, and
    its engine held (``hold_the_engine``); the receiver stays readable after it stops."""
    async with PushServer(token=TOKEN) as server, Receiver() as receiver:
        path = write_config(tmp_path / "t.toml", small_intake(server, receiver))
        async with running(path) as daemon:
            await wait_for(lambda: server.clients, what="the source to connect")
            yield daemon, receiver, hold_the_engine(daemon)


def hold_the_engine(daemon: Daemon) -> anyio.Event:
    """Make the engine wait, holding the first batch it takes, until the event is set."""
    gate = anyio.Event()
    process = daemon._process

    async def held(batch: list[object]) -> None:
        await gate.wait()
        await process(batch)  # type: ignore[arg-type]

    daemon._process = held  # type: ignore[method-assign]
    return gate


async def test_a_full_intake_keeps_what_a_timed_out_source_handed_over(tmp_path: Path) -> None:
    # A source's own deadline (stale, ack) may pass while it waits on a full intake: the
    # event it handed over must still be evaluated, not dropped with the cancelled wait.
    async with full_intake(tmp_path) as (daemon, receiver, gate):
        runner = daemon.sources["feed"]
        ids = [f"full{i}" for i in range(30)]
        deadline = anyio.CancelScope()

        async def emit_all() -> None:
            with deadline:
                for i in ids:
                    data = {"args": {"to": "me", "from": "alice", "amount": 1}}
                    await runner.emit(runner.event("transfer", data, id=i))

        async with anyio.create_task_group() as tg:
            tg.start_soon(emit_all)
            await wait_for(lambda: daemon._full_waits, what="a wait on the full intake")
            deadline.cancel()  # the source's deadline passes while it waits
            gate.set()
        sent = runner.events
        assert sent >= 11  # the stream's 10, the batch in hand, and the one that waited
        await wait_for(lambda: len(receiver.requests) >= sent, what="every handed-over event")
    assert [r.json()["event"]["id"] for r in receiver.requests] == ids[:sent]


async def test_emit_many_is_bounded_by_events_and_keeps_their_order(tmp_path: Path) -> None:
    # emit_many hands a list over as one item of the intake stream: the bound must still
    # be queue_size events (not lists), a list larger than that goes in slices, and the
    # events reach the rules in the order they were emitted, mixed with single emits.
    async with full_intake(tmp_path) as (daemon, receiver, gate):
        hand_over = daemon._hand_over
        waiting: list[int] = []

        async def counted(item: Any, count: int) -> bool:
            handed = await hand_over(item, count)
            waiting.append(daemon.intake_waiting)
            return handed

        daemon._hand_over = counted  # type: ignore[method-assign]
        runner = daemon.sources["feed"]
        ids = [f"b{i}" for i in range(40)]
        events = [
            runner.event("transfer", transfer(i)["data"], id=i)  # type: ignore[arg-type]
            for i in ids
        ]

        async def emit_all() -> None:
            await runner.emit_many(events[:4])
            await runner.emit(events[4])
            await runner.emit_many(iter(events[5:12]))  # 12 > 10: waits for the engine
            await runner.emit_many([])
            await runner.emit_many(events[12:])  # 28 > queue_size: in slices

        async with anyio.create_task_group() as tg:
            tg.start_soon(emit_all)
            await wait_for(lambda: daemon._full_waits, what="a wait on the full intake")
            # The engine holds the first 5; the 7 came in after them, the first slice
            # of 10 waits: 17 would be over the bound.
            assert daemon.intake_waiting == 7
            gate.set()
        await wait_for(lambda: len(receiver.requests) == 40, what="every event's alert")
        assert runner.events == 40 and runner.types["transfer"] == 40
        assert daemon.intake_waiting == 0
    assert max(waiting) <= 10 and 10 in waiting
    assert [r.json()["event"]["id"] for r in receiver.requests] == ids


async def test_a_stop_evaluates_what_a_source_waiting_for_room_held(tmp_path: Path) -> None:
    # Stopping cancels the sources; one that was waiting for room in the intake had
    # received its events already: they are evaluated, as what waited in the intake is
    # (they were dropped before, the one event waiting with each such source).
    async with PushServer(token=TOKEN) as server, Receiver() as receiver:
        path = write_config(tmp_path / "t.toml", small_intake(server, receiver))
        daemon = Daemon(str(path), make_registry())
        async with anyio.create_task_group() as tg:
            await tg.start(daemon.run)
            await wait_for(lambda: server.clients, what="the source to connect")
            gate = hold_the_engine(daemon)
            process = daemon._process
            evaluated: list[str] = []

            async def recorded(batch: list[Any]) -> None:
                evaluated.extend(e.id for e in batch if e.type == "transfer")
                await process(batch)

            daemon._process = recorded  # type: ignore[method-assign]
            runner = daemon.sources["feed"]
            data = {"args": {"to": "me", "from": "alice", "amount": 1}}
            scope = anyio.CancelScope()

            async def source() -> None:
                with scope:  # as a source's task, which the daemon cancels to stop it
                    for i in range(25):
                        await runner.emit(runner.event("transfer", data, id=f"w{i}"))
                    await runner.emit_many(
                        [runner.event("transfer", data, id=f"w{i}") for i in range(25, 40)]
                    )

            assert daemon._tg is not None
            daemon._tg.start_soon(source)
            await wait_for(lambda: daemon._full_waits, what="the source waiting for room")
            received = runner.events  # the engine's batch, the intake's 10, the one waiting
            daemon.stop()
            scope.cancel()
            gate.set()
            with anyio.fail_after(10):
                await daemon.stopped.wait()
        # Everything the source emitted was evaluated, the event it waited with included
        # (a source that never yields may hand over more meanwhile, within drain_timeout).
        assert len(evaluated) >= received
        assert evaluated == [f"w{i}" for i in range(runner.events)]


async def test_a_stop_past_the_drain_timeout_ends_a_source_mid_emit_many(tmp_path: Path) -> None:
    # Review of a91a1b5: the engine is stuck (a disk refusing commits), the drain times
    # out, and a source is in the middle of handing over a list in slices: the stop must
    # still end (it hung: the next slice waited for room nobody would ever make).
    async with PushServer(token=TOKEN) as server, Receiver() as receiver:
        text = small_intake(server, receiver).replace(
            'drain_timeout = "2s"', 'drain_timeout = "1s"'
        )
        path = write_config(tmp_path / "t.toml", text)
        daemon = Daemon(str(path), make_registry())
        async with anyio.create_task_group() as tg:
            await tg.start(daemon.run)
            await wait_for(lambda: server.clients, what="the source to connect")
            hold_the_engine(daemon)  # never released
            runner = daemon.sources["feed"]
            data = {"args": {"to": "me", "from": "alice", "amount": 1}}
            events = [runner.event("transfer", data, id=f"m{i}") for i in range(50)]
            scope = anyio.CancelScope()

            async def source() -> None:
                with scope:  # as a source's task, which the daemon cancels to stop it
                    await runner.emit_many(events)  # 50 > queue_size 10: in slices

            assert daemon._tg is not None
            daemon._tg.start_soon(source)
            await wait_for(lambda: daemon._full_waits, what="a slice waiting for room")
            daemon.stop()
            scope.cancel()
            with anyio.fail_after(10):
                await daemon.stopped.wait()


async def test_a_large_hand_over_is_not_overtaken_for_ever_by_a_busy_neighbour(
    tmp_path: Path,
) -> None:
    # Review of a91a1b5: sources wait for room first come first served. A list that
    # needs more room than one engine batch frees got in only if no other source
    # refilled the intake meanwhile: never, next to a source emitting without pause.
    async with PushServer(token=TOKEN) as server, Receiver() as receiver:
        path = write_config(tmp_path / "t.toml", config_text(server, receiver.url(), TO_NOBODY))
        async with running(path) as daemon:
            await wait_for(lambda: server.clients, what="the source to connect")
            process = daemon._process

            async def behind(batch: list[object]) -> None:
                await anyio.sleep(0.01)  # the work of an engine that is behind
                await process(batch)  # type: ignore[arg-type]

            daemon._process = behind  # type: ignore[method-assign]
            runner = daemon.sources["feed"]
            data = {"args": {"to": "nobody", "from": "alice", "amount": 1}}
            large = [runner.event("transfer", data, id=f"a{i}") for i in range(600)]
            done = anyio.Event()

            async def flood() -> None:
                n = 0
                while not done.is_set():
                    for _ in range(50):  # a read's worth of frames, then a yield
                        n += 1
                        await runner.emit(runner.event("transfer", data, id=f"b{n}"))
                    await anyio.lowlevel.checkpoint()

            async with anyio.create_task_group() as tg:
                tg.start_soon(flood)
                await wait_for(lambda: daemon._full_waits, what="the intake to be full")
                with anyio.fail_after(10):
                    await runner.emit_many(large)
                done.set()


async def test_events_in_memory_stay_within_queue_size_and_a_batch(tmp_path: Path) -> None:
    # Review of a91a1b5: the engine took a whole list into its batch, freeing its room
    # for more: queue_size events in the intake and up to queue_size more in hand.
    async with PushServer(token=TOKEN) as server, Receiver() as receiver:
        text = config_text(server, receiver.url(), TO_NOBODY).replace(
            'drain_timeout = "2s"', 'drain_timeout = "2s"\nqueue_size = 1000'
        )
        path = write_config(tmp_path / "t.toml", text)
        async with running(path) as daemon:
            await wait_for(lambda: server.clients, what="the source to connect")
            gate = hold_the_engine(daemon)
            held: list[int] = []
            process = daemon._process

            async def measured(batch: list[object]) -> None:
                held.append(len(batch))
                await process(batch)  # type: ignore[arg-type]

            daemon._process = measured  # type: ignore[method-assign]
            runner = daemon.sources["feed"]
            data = {"args": {"to": "nobody", "from": "alice", "amount": 1}}

            async def produce() -> None:
                for r in range(3):
                    await runner.emit_many(
                        [runner.event("transfer", data, id=f"{r}-{i}") for i in range(1000)]
                    )

            async with anyio.create_task_group() as tg:
                tg.start_soon(produce)
                await wait_for(lambda: held and daemon._full_waits, what="a full intake")
                assert held == [daemon_module.BATCH]
                assert daemon.intake_waiting + held[0] <= 1000 + daemon_module.BATCH
                gate.set()
            await wait_for(lambda: sum(held) == 3000, what="every event taken")
            assert max(held) == daemon_module.BATCH and daemon.intake_waiting == 0


async def test_an_outage_logs_a_warning_when_it_starts_or_changes_then_debug(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    class Intake:
        def __init__(self) -> None:
            self.items: list[Event | Checkpoint] = []

        async def intake(self, item: Event | Checkpoint) -> None:
            self.items.append(item)

    intake = Intake()
    config = PushSource.Config(plugin="testpush", url="ws://127.0.0.1:9/", token="t-123")
    runner = SourceRunner(intake, "odds", config, PushSource)  # type: ignore[arg-type]
    caplog.set_level(logging.DEBUG, logger="tocsin.source.odds")
    monkeypatch.setattr(daemon_module, "HEALTHY", 3600.0)  # no connection lasts that long

    for _ in range(10):  # a server that accepts, then says nothing: stale, reconnect, gap
        await runner.up()
        await runner.stale("nothing received for 3s")
        await runner.gap("reconnected; events may be missed", since="2026-12-07T00:00:00.000Z")
    await runner.down("connection refused")  # the reason changes: a warning
    await runner.down("connection refused")
    await runner.up()
    monkeypatch.setattr(daemon_module, "HEALTHY", 0.0)  # up long enough: the outage is over
    await runner.stale("nothing received for 3s")  # a new outage: a warning again
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [
        "source 'odds' is stale: nothing received for 3s",
        "source 'odds': events may be missing: reconnected; events may be missed",
        "source 'odds' is down: connection refused",
        "source 'odds' is stale: nothing received for 3s",
    ]
    debug = [r for r in caplog.records if r.levelno == logging.DEBUG]
    assert len(debug) == 9 + 9 + 1  # the other stale and gap lines, the repeated down
    # The rules still get every event: each stale, up and gap is a real change of state.
    types = [e.type for e in intake.items if isinstance(e, Event)]
    assert types.count("source.gap") == 10 and types.count("source.stale") == 11


async def test_provider_values_orjson_cannot_write_never_stop_the_daemon(tmp_path: Path) -> None:
    deep: object = "bottom"
    for _ in range(300):  # orjson reads 1,024 levels but writes 254
        deep = [deep]
    hostile = transfer("hostile", frm="mallory")
    hostile["data"]["args"].update(  # type: ignore[index]
        {"huge": 10**4000, "wide": -(2**70), "nan": float("nan"), "deep": deep}
    )
    async with PushServer(token=TOKEN) as server, Receiver() as receiver:
        path = write_config(tmp_path / "t.toml", config_text(server, receiver.url()))
        async with running(path) as daemon:
            await wait_for(lambda: server.clients)
            await server.push(transfer("before"))
            await server.push(hostile)
            await server.push(transfer("after", frm="bob"))
            await wait_for(lambda: len(receiver.ok()) == 3, what="the three alerts")
            assert daemon.engine.stats.event_errors == 0
    sent = {r.json()["event"]["id"]: r.json() for r in receiver.ok()}
    args = sent["hostile"]["event"]["data"]["args"]
    assert args["huge"] == str(10**4000) and args["wide"] == str(-(2**70))
    assert args["nan"] is None
    level = args["deep"]
    for _ in range(60):
        level = level[0]
    assert "(nested too deep)" in json.dumps(level)
    assert sent["hostile"]["body"].startswith("transfer from feed: ")


async def test_a_batch_commits_its_alerts_a_bounded_number_at_a_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(daemon_module, "ALERTS_PER_COMMIT", 6)
    rules = "".join(
        f'\n[[rules]]\nname = "also {n}"\nsource = "feed"\nmatch = {{ "args.to" = "me" }}\n'
        for n in range(3)
    )
    async with PushServer(token=TOKEN) as server:
        path = write_config(tmp_path / "t.toml", config_text(server, "http://127.0.0.1:9/", rules))
        async with running(path) as daemon:
            sizes: list[int] = []
            commit = daemon._commit

            async def counted(alerts: list[Any], cursors: list[Any]) -> None:
                sizes.append(len(alerts))
                await commit(alerts, cursors)

            monkeypatch.setattr(daemon, "_commit", counted)
            batch = [
                daemon.sources["feed"].event(
                    "transfer", transfer(f"e{i}", frm=f"f{i}")["data"], id=f"e{i}"
                )  # type: ignore[arg-type]
                for i in range(5)
            ]
            await daemon._process(list(batch))
    # 5 events x 4 rules: committed after every event that brings the batch to 6 or more.
    assert sizes == [8, 8, 4]
