"""End to end: the emulator -> the Vite source in a real daemon -> rules -> a real webhook."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import anyio
import pytest
import tocsin_vite
import tomli_w
from tocsin_vite import ViteEmulator
from tocsin_vite.protocol import vmlog_id

import tocsin_builtin
from support import Receiver, daemon_table, running, wait_for
from tocsin.daemon import Daemon
from tocsin.store import Store
from tocsin.testing import build_registry, make_plugin_manager

from .conftest import CONTRACT, TRANSFER

pytestmark = pytest.mark.usefixtures("source_processes")

KEY = f"vmlog:{CONTRACT}"
RULE = {
    "name": "transfer on my contract",
    "type": "vmlog",
    "match": {"address": CONTRACT, "topics.0": TRANSFER},
    "actions": ["hook"],
    "title": "Transfer at height {{ account_block_height }}",
    "body": "data {{ log_data }} in {{ account_block_hash }}",
}
GAP_RULE = {
    "name": "gap",
    "type": "source.gap",
    "actions": ["hook"],
    "title": "{{ source }}: {{ topic }} {{ from_height }}-{{ to_height }} missed",
}


def registry() -> Any:
    plugins = [tocsin_builtin, tocsin_vite]
    return build_registry(make_plugin_manager(plugins, load_entry_points=False))


def write(tmp_path: Path, emulator: ViteEmulator, hook: str, **source: Any) -> Path:
    config = {
        "daemon": daemon_table(),
        "sources": {
            "chain": {
                "plugin": "vite",
                "url": emulator.url,
                "subscriptions": [{"topic": "vmlog", "address": CONTRACT}],
                "max_backoff": "1s",
                **source,
            }
        },
        "actions": {
            "hook": {
                "plugin": "webhook",
                "url": hook,
                "timeout": "2s",
                "retry": {"backoff": "20ms", "max_backoff": "100ms"},
            }
        },
        "rules": [RULE, GAP_RULE],
    }
    path = tmp_path / "tocsin.toml"
    path.write_text(tomli_w.dumps(config), encoding="utf-8")
    return path


def alerts(receiver: Receiver, rule: str = RULE["name"]) -> list[dict[str, Any]]:
    return [r.json() for r in receiver.ok() if r.json()["rule"] == rule]


async def cursor(daemon: Daemon, expected: str) -> None:
    """Wait until the source's vmlog cursor is committed as ``expected``."""
    with anyio.fail_after(5):
        while True:  # the store has no change notification: ask it until it says so
            if await daemon.store.call(Store.get_cursor, "chain", KEY) == expected:
                return
            await anyio.sleep(0.02)


async def test_a_vmlog_rule_fires_once_and_a_rollback_retracts_it(
    tmp_path: Path, emulator: ViteEmulator
) -> None:
    async with Receiver() as receiver:
        path = write(tmp_path, emulator, receiver.url())
        async with running(path, registry()) as daemon:
            await wait_for(lambda: emulator.subscriptions == 1, what="the subscription")
            await cursor(daemon, "0")
            block = await emulator.produce_vmlog(CONTRACT, [TRANSFER, "00" * 32], b"\x2a")
            await emulator.produce_vmlog(CONTRACT, [TRANSFER.replace("a", "b")], b"other event")
            await wait_for(lambda: len(alerts(receiver)) == 1, what="the alert")
            (sub_id,) = [s for c in emulator.clients for s in c.subs]
            item = {
                "vmlog": {"topics": [TRANSFER, "00" * 32], "data": "Kg=="},
                "accountBlockHash": block.hash,
                "accountBlockHeight": "1",
                "address": CONTRACT,
                "removed": False,
            }
            frame = {
                "jsonrpc": "2.0",
                "method": "subscribe_subscription",
                "params": {"subscription": sub_id, "result": [item]},
            }
            await emulator.push_raw(json.dumps(frame))  # the node says it again
            await emulator.rollback_account(CONTRACT, count=2)  # both blocks: one alert to undo
            await wait_for(lambda: len(alerts(receiver)) == 2, what="the retraction")
            await emulator.produce_vmlog(CONTRACT, [TRANSFER], b"marker")
            await wait_for(lambda: len(alerts(receiver)) == 3, what="the marker's alert")
    fired, retracted, marker = alerts(receiver)
    assert fired["status"] == "firing" and retracted["status"] == "retracted"
    assert fired["title"] == "Transfer at height 1"
    assert fired["body"] == f"data Kg== in {block.hash}"
    event_id = vmlog_id(block.hash, [TRANSFER, "00" * 32], "Kg==")
    assert fired["event"]["id"] == retracted["event"]["id"] == event_id
    assert retracted["event"]["removed"] is True and fired["event"]["removed"] is False
    assert retracted["event"]["data"] == fired["event"]["data"]
    assert fired["event"]["provider"] == "vite" and fired["event"]["source"] == "chain"
    assert marker["status"] == "firing" and marker["event"]["data"]["account_block_height"] == 1
    assert len({a["id"] for a in alerts(receiver)}) == 3


async def test_a_re_added_fact_fires_again(tmp_path: Path, emulator: ViteEmulator) -> None:
    async with Receiver() as receiver:
        path = write(tmp_path, emulator, receiver.url())
        async with running(path, registry()) as daemon:
            await wait_for(lambda: emulator.subscriptions == 1)
            await cursor(daemon, "0")
            await emulator.produce_vmlog(CONTRACT, [TRANSFER], b"\x01")
            await wait_for(lambda: len(alerts(receiver)) == 1)
            await emulator.rollback_account(CONTRACT, readd=True)  # the chain switches back
            await wait_for(lambda: len(alerts(receiver)) == 3, what="retracted, then fired again")
    statuses = [a["status"] for a in alerts(receiver)]
    assert statuses == ["firing", "retracted", "firing"]
    assert len({a["id"] for a in alerts(receiver)}) == 3
    assert len({a["event"]["id"] for a in alerts(receiver)}) == 1


async def test_missed_while_stopped_is_backfilled_and_alerted_exactly_once(
    tmp_path: Path, emulator: ViteEmulator
) -> None:
    async with Receiver() as receiver:
        path = write(tmp_path, emulator, receiver.url())
        async with running(path, registry()) as daemon:
            await wait_for(lambda: emulator.subscriptions == 1)
            await emulator.produce_vmlog(CONTRACT, [TRANSFER], b"before")
            await wait_for(lambda: len(alerts(receiver)) == 1)
            await cursor(daemon, "1")
        await wait_for(lambda: emulator.subscriptions == 0)
        await emulator.produce_vmlog(CONTRACT, [TRANSFER], b"while stopped 1")
        await emulator.produce_vmlog(CONTRACT, [TRANSFER], b"while stopped 2")
        # Forget that the first log was processed: the backfill reads it again, and the
        # daemon must not alert twice on it.
        with sqlite3.connect(tmp_path / "state" / Store.FILE) as db:
            db.execute("UPDATE cursors SET value = '0' WHERE source = 'chain' AND key = ?", (KEY,))
        db.close()
        async with running(path, registry()) as daemon:
            await wait_for(lambda: len(alerts(receiver)) == 3, what="the two missed alerts")
            await cursor(daemon, "3")
            await emulator.produce_vmlog(CONTRACT, [TRANSFER], b"after")
            await wait_for(lambda: len(alerts(receiver)) == 4)
    heights = [a["event"]["data"]["account_block_height"] for a in alerts(receiver)]
    assert heights == [1, 2, 3, 4]
    assert len({a["event"]["id"] for a in alerts(receiver)}) == 4
    assert alerts(receiver, "gap") == []


async def test_more_missed_than_the_limit_alerts_the_newest_and_the_gap(
    tmp_path: Path, emulator: ViteEmulator
) -> None:
    async with Receiver() as receiver:
        path = write(tmp_path, emulator, receiver.url(), backfill_limit=2)
        async with running(path, registry()) as daemon:
            await wait_for(lambda: emulator.subscriptions == 1)
            await cursor(daemon, "0")
        for n in range(5):
            await emulator.produce_vmlog(CONTRACT, [TRANSFER], f"missed {n}".encode())
        async with running(path, registry()):
            await wait_for(lambda: len(alerts(receiver)) == 2 and alerts(receiver, "gap"))
    assert [a["event"]["data"]["account_block_height"] for a in alerts(receiver)] == [4, 5]
    (gap,) = alerts(receiver, "gap")
    assert gap["title"] == "chain: vmlog 1-3 missed"
    assert gap["event"]["data"]["address"] == CONTRACT


async def test_a_rollback_while_stopped_is_retracted_at_the_restart(
    tmp_path: Path, emulator: ViteEmulator
) -> None:
    async with Receiver() as receiver:
        path = write(tmp_path, emulator, receiver.url())
        async with running(path, registry()) as daemon:
            await wait_for(lambda: emulator.subscriptions == 1)
            await cursor(daemon, "0")
            await emulator.produce_vmlog(CONTRACT, [TRANSFER], b"kept")
            await emulator.produce_vmlog(CONTRACT, [TRANSFER], b"rolled back")
            await wait_for(lambda: len(alerts(receiver)) == 2, what="two alerts")
            await cursor(daemon, "2")
        await wait_for(lambda: emulator.subscriptions == 0)
        await emulator.rollback_account(CONTRACT)  # the second block, while stopped
        await emulator.produce_vmlog(CONTRACT, [TRANSFER], b"in its place")
        async with running(path, registry()):
            await wait_for(lambda: len(alerts(receiver)) == 4, what="retracted, then the new one")
    kept, gone, retracted, replaced = alerts(receiver)
    assert [a["status"] for a in (kept, gone, retracted, replaced)] == [
        "firing",
        "firing",
        "retracted",
        "firing",
    ]
    # SPEC section 5: the retraction's event has the same id and data as the fact.
    assert retracted["event"]["id"] == gone["event"]["id"]
    assert retracted["event"]["data"] == gone["event"]["data"]
    assert retracted["event"]["removed"] is True
    assert retracted["title"] == "[retracted] Transfer at height 2"  # the data, rendered
    assert replaced["event"]["data"]["account_block_height"] == 2
    assert replaced["event"]["id"] != gone["event"]["id"]
    (gap,) = alerts(receiver, "gap")  # and what a rollback deeper than it can reach
    assert "rolled back" in gap["event"]["data"]["reason"]
