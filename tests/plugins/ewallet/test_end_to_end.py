"""End to end: the emulator -> the eWallet source in a real Daemon -> rules -> a webhook."""

from __future__ import annotations

from pathlib import Path

import pytest
import tocsin_ewallet
from tocsin_ewallet.emulator import DEMO_API_KEY, DEMO_AUTH_TOKEN, DEMO_USER, EWalletEmulator

import tocsin_builtin
from support import Receiver, daemon_toml, running, wait_for, write_config
from tocsin.testing import Registry, build_registry, make_plugin_manager

from .ewallet_helpers import REQUEST_TOPIC

pytestmark = pytest.mark.usefixtures("source_processes")

USER_TOPIC = f"user:{DEMO_USER}"


@pytest.fixture(autouse=True)
def _credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EWALLET_API_KEY", DEMO_API_KEY)
    monkeypatch.setenv("EWALLET_AUTH_TOKEN", DEMO_AUTH_TOKEN)


def registry() -> Registry:
    pm = make_plugin_manager([tocsin_builtin, tocsin_ewallet], load_entry_points=False)
    return build_registry(pm)


def config_text(emulator: EWalletEmulator, hook_url: str) -> str:
    return f"""
{daemon_toml()}
[sources.wallet]
plugin = "ewallet"
url = "{emulator.url}"
api_key = {{ env = "EWALLET_API_KEY" }}
auth_token = {{ env = "EWALLET_AUTH_TOKEN" }}
# Every consumption of the request reaches both topics.
channels = ["{REQUEST_TOPIC}", "{USER_TOPIC}"]
heartbeat = "0.3s"
stale_after = "5s"
max_backoff = "1s"

[actions.hook]
plugin = "webhook"
url = "{hook_url}"
timeout = "2s"
retry = {{ attempts = 20, backoff = "20ms", max_backoff = "100ms" }}

[[rules]]
name = "consumption finalized"
source = "wallet"
type = "transaction_consumption_finalized"
match = {{ status = "confirmed" }}
actions = ["hook"]
title = "{{{{ amount }}}} {{{{ token_id }}}} confirmed"

[[rules]]
name = "consumption failed"
source = "wallet"
type = "transaction_consumption_finalized"
match = {{ success = false }}
actions = ["hook"]
title = "{{{{ id }}}} failed: {{{{ error.code }}}}"
"""


async def test_each_fact_alerts_once_across_topics_duplicates_reconnects_and_restarts(
    tmp_path: Path,
) -> None:
    async with EWalletEmulator() as emulator, Receiver() as receiver:
        path = write_config(tmp_path / "tocsin.toml", config_text(emulator, receiver.url()))
        async with running(path, registry()) as daemon:
            await wait_for(lambda: emulator.joined(USER_TOPIC), what="the source to join")
            first = await emulator.request_consumption(amount=150)
            assert await emulator.finalize(first["id"]) == 2  # on both joined topics
            await emulator.finalize(first["id"])  # a duplicate push
            await wait_for(lambda: receiver.ok(), what="the first alert")

            await emulator.drop_connections()
            await wait_for(
                lambda: emulator.connections == 2 and emulator.joined(USER_TOPIC),
                what="the source to reconnect and rejoin",
            )
            await emulator.finalize(first["id"])  # the same fact again after the reconnect
            failed = await emulator.request_consumption(amount=9)
            await emulator.fail_finalize(failed["id"])
            second = await emulator.request_consumption(amount=70)
            await emulator.finalize(second["id"])
            await wait_for(lambda: len(receiver.ok()) >= 3, what="the later alerts")
            assert daemon.sources["wallet"].reconnects == 1

        async with running(path, registry()):  # a restart on the same state
            await wait_for(lambda: emulator.joined(USER_TOPIC) and emulator.connections == 3)
            await emulator.finalize(first["id"])
            third = await emulator.request_consumption(amount=5)
            await emulator.finalize(third["id"])
            await wait_for(lambda: len(receiver.ok()) >= 4, what="the alert after the restart")

    bodies = [r.json() for r in receiver.requests]
    assert [(b["rule"], b["title"]) for b in bodies] == [
        ("consumption finalized", "150 tok_OMG_01cbffwvj6ma9a9gg1tb24880q confirmed"),
        ("consumption failed", f"{failed['id']} failed: transaction:insufficient_funds"),
        ("consumption finalized", "70 tok_OMG_01cbffwvj6ma9a9gg1tb24880q confirmed"),
        ("consumption finalized", "5 tok_OMG_01cbffwvj6ma9a9gg1tb24880q confirmed"),
    ]
    event = bodies[0]["event"]
    assert event["source"] == "wallet" and event["provider"] == "ewallet"
    assert event["type"] == "transaction_consumption_finalized"
    assert event["data"]["id"] == first["id"] and event["data"]["success"] is True
    assert event["data"]["topic"] in (REQUEST_TOPIC, USER_TOPIC)
    assert bodies[1]["event"]["data"]["error"]["code"] == "transaction:insufficient_funds"
    assert len({b["id"] for b in bodies}) == 4


async def test_demo_source_and_traffic_fire_the_demo_rule(tmp_path: Path) -> None:
    import anyio

    async with EWalletEmulator() as emulator, Receiver() as receiver:
        table = emulator.demo_source()
        lines = [f"{k} = {value_toml(v)}" for k, v in table.items()]
        text = f"""
{daemon_toml()}
[sources.wallet]
{chr(10).join(lines)}

[actions.hook]
plugin = "webhook"
url = "{receiver.url()}"
retry = {{ backoff = "20ms", max_backoff = "100ms" }}

[[rules]]
name = "consumption finalized"
type = "transaction_consumption_finalized"
match = {{ status = "confirmed" }}
actions = ["hook"]
"""
        path = write_config(tmp_path / "demo.toml", text)
        async with running(path, registry()), anyio.create_task_group() as tg:
            tg.start_soon(emulator.demo_traffic)
            await wait_for(lambda: receiver.ok(), within=3, what="the demo's first alert")
            tg.cancel_scope.cancel()
    body = receiver.ok()[0].json()
    assert body["rule"] == "consumption finalized"
    assert body["event"]["data"]["status"] == "confirmed"


def value_toml(value: object) -> str:
    if isinstance(value, list):
        return "[" + ", ".join(value_toml(v) for v in value) + "]"
    return f'"{value}"'
