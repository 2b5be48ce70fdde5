"""End to end: the emulator -> the EOSPark source in a real daemon -> rules -> a real webhook."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import anyio
import pytest
import tocsin_eospark
import tomli_w
from tocsin_eospark import EOSParkEmulator
from tocsin_eospark.emulator import transaction, transfer
from tocsin_eospark.protocol import action_id

import tocsin_builtin
from support import Receiver, daemon_table, running, wait_for
from tocsin.daemon import Daemon
from tocsin.testing import build_registry, make_plugin_manager

from .conftest import KEY, ME

pytestmark = pytest.mark.usefixtures("source_processes")

# The rule of rules.example.toml (less its throttle, which would hide a duplicate alert).
RULE = {
    "name": "incoming transfer",
    "type": "action",
    "match": {"contract": "eosio.token", "action": "transfer", "args.to": ME},
    "when": "args.quantity | asset_amount >= 100",
    "actions": ["hook"],
    "title": "{{ args.quantity }} from {{ args.from }}",
    "body": "memo: {{ args.memo }} (trx {{ trx_id }})",
    "group_by": ["args.from"],
}
GAP_RULE = {
    "name": "gap",
    "type": "source.gap",
    "actions": ["hook"],
    "title": "{{ source }}: {{ reason }}",
}


def registry() -> Any:
    plugins = [tocsin_builtin, tocsin_eospark]
    return build_registry(make_plugin_manager(plugins, load_entry_points=False))


def write(tmp_path: Path, source: dict[str, Any], hook: str, *rules: dict[str, Any]) -> Path:
    config = {
        "daemon": daemon_table(),
        "sources": {"eos": source},
        "actions": {
            "hook": {
                "plugin": "webhook",
                "url": hook,
                "timeout": "2s",
                "retry": {"backoff": "20ms", "max_backoff": "100ms"},
            }
        },
        "rules": list(rules),
    }
    path = tmp_path / "tocsin.toml"
    path.write_text(tomli_w.dumps(config), encoding="utf-8")
    return path


def source_table(emulator: EOSParkEmulator, contracts: list[str]) -> dict[str, Any]:
    return {
        "plugin": "eospark",
        "url": emulator.url,
        "api_key": KEY,
        "subscriptions": [{"account": ME, "contract": contracts}],
        "max_backoff": "1s",
    }


def alerted(receiver: Receiver, rule: str = "incoming transfer") -> list[dict[str, Any]]:
    return [r.json() for r in receiver.ok() if r.json()["rule"] == rule]


async def processed(daemon: Daemon, events: int) -> None:
    await wait_for(lambda: daemon.engine.stats.events >= events, what=f"{events} events")


async def test_duplicates_and_non_matching_actions_alert_exactly_once(
    tmp_path: Path, emulator: EOSParkEmulator
) -> None:
    async with Receiver() as receiver:
        source = source_table(emulator, ["eosio.token", "eosiotoken12"])
        path = write(tmp_path, source, receiver.url(), RULE)
        big = transaction([transfer("alice", ME, "250.0000 EOS", "invoice 7")])
        async with running(path, registry()) as daemon:
            await wait_for(lambda: emulator.subscribed, what="the source to subscribe")
            await emulator.push_transaction(big, times=3)  # EOSPark sends it three times
            await emulator.push_transaction(
                transaction([transfer("carol", ME, "99.9999 EOS")])  # below the threshold
            )
            await emulator.push_transaction(  # a look-alike token contract
                transaction([transfer("scammer1", ME, "5000.0000 EOS", contract="eosiotoken12")])
            )
            await emulator.push_transaction(transaction([transfer(ME, "bob", "300.0000 EOS")]))
            marker = transaction([transfer("bob", ME, "100.0000 EOS", "last")])
            await emulator.push_transaction(marker)
            await wait_for(lambda: len(alerted(receiver)) == 2, what="two alerts")
            await processed(daemon, 5)  # source.up + the five distinct actions
            assert daemon.engine.stats.per_rule["incoming transfer"] == 2
    first, second = alerted(receiver)
    assert first["title"] == "250.0000 EOS from alice"
    assert first["body"] == f"memo: invoice 7 (trx {big['trx_id']})"
    assert first["event"]["id"] == action_id(big["trx_id"], 0)
    assert first["event"]["provider"] == "eospark" and first["event"]["source"] == "eos"
    assert first["event"]["time"].endswith("Z")
    assert second["title"] == "100.0000 EOS from bob"
    assert len(receiver.requests) == 2


async def test_a_dropped_connection_and_a_restart_never_alert_twice(
    tmp_path: Path, emulator: EOSParkEmulator
) -> None:
    async with Receiver() as receiver:
        path = write(
            tmp_path, source_table(emulator, ["eosio.token"]), receiver.url(), RULE, GAP_RULE
        )
        first = transaction([transfer("alice", ME, "150.0000 EOS")])
        async with running(path, registry()):
            await wait_for(lambda: emulator.subscribed)
            await emulator.push_transaction(first)
            await wait_for(lambda: len(alerted(receiver)) == 1)
            await emulator.drop_connections()
            await wait_for(lambda: alerted(receiver, "gap"), what="the gap alert")
            assert emulator.accepted == 2 and emulator.subscribed == 1
            await emulator.push_transaction(first)  # re-sent after the reconnect
            await emulator.push_transaction(transaction([transfer("bob", ME, "200.0000 EOS")]))
            await wait_for(lambda: len(alerted(receiver)) == 2)
        async with running(path, registry()) as daemon:  # a restart: the source starts afresh
            await wait_for(lambda: emulator.accepted == 3 and emulator.subscribed)
            await emulator.push_transaction(first)
            await emulator.push_transaction(transaction([transfer("carol", ME, "300.0000 EOS")]))
            await wait_for(lambda: len(alerted(receiver)) == 3)
            await processed(daemon, 3)
    senders = [a["event"]["data"]["args"]["from"] for a in alerted(receiver)]
    assert senders == ["alice", "bob", "carol"]
    (gap,) = alerted(receiver, "gap")
    assert gap["title"] == "eos: reconnected; events while disconnected may be missed"
    assert gap["event"]["data"]["since"] <= gap["event"]["data"]["until"]


async def test_demo_traffic_alerts_within_3_seconds(tmp_path: Path) -> None:
    async with EOSParkEmulator() as emulator, Receiver() as receiver:
        path = write(tmp_path, emulator.demo_source(), receiver.url(), RULE)
        async with anyio.create_task_group() as tg:
            tg.start_soon(emulator.demo_traffic)
            async with running(path, registry()):
                await wait_for(lambda: emulator.subscribed)
                subscribed_at = time.monotonic()
                await wait_for(lambda: alerted(receiver), within=5, what="a demo alert")
                assert time.monotonic() - subscribed_at < 3
            tg.cancel_scope.cancel()
    data = alerted(receiver)[0]["event"]["data"]
    assert data["contract"] == "eosio.token" and data["args"]["to"] == ME
    assert float(data["args"]["quantity"].split()[0]) >= 100
