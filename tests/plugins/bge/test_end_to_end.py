"""End to end: the emulator -> the BGE source in a real daemon -> rules -> a real webhook."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import anyio
import pytest
import tocsin_bge
import tomli_w
from tocsin_bge import BGEEmulator
from tocsin_bge.emulator import DEMO_PRODUCT, DEMO_THRESHOLD

import tocsin_builtin
from support import Receiver, daemon_table, running, wait_for
from tocsin.daemon import Daemon
from tocsin.testing import build_registry, make_plugin_manager

from .conftest import PAIR

pytestmark = pytest.mark.usefixtures("source_processes")

# "BTC_USDT last price above X" (the demo rule, without its throttle, which would hide a
# duplicate alert).
RULE = {
    "name": "BTC_USDT above 30000",
    "type": "ticker",
    "match": {"product": PAIR},
    "when": "close > 30000",
    "actions": ["hook"],
    "title": "BTC_USDT at {{ close }}",
    "body": "24h change {{ change_percent }}% (seq {{ seq_id }})",
}
GAP_RULE = {
    "name": "gap",
    "type": "source.gap",
    "actions": ["hook"],
    "title": "{{ source }}: {{ reason }} ({{ channels }})",
}


def registry() -> Any:
    plugins = [tocsin_builtin, tocsin_bge]
    return build_registry(make_plugin_manager(plugins, load_entry_points=False))


def write(tmp_path: Path, source: dict[str, Any], hook: str, *rules: dict[str, Any]) -> Path:
    config = {
        "daemon": daemon_table(),
        "sources": {"market": source},
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


def source_table(emulator: BGEEmulator) -> dict[str, Any]:
    return {
        "plugin": "bge",
        "url": emulator.url,
        "subscriptions": [{"biz": "market", "type": "ticker", "product": PAIR}],
        "max_backoff": "1s",
        "keepalive": "200ms",
        "stale_after": "2s",
    }


def alerted(receiver: Receiver, rule: str = "BTC_USDT above 30000") -> list[dict[str, Any]]:
    return [r.json() for r in receiver.ok() if r.json()["rule"] == rule]


async def processed(daemon: Daemon, events: int) -> None:
    await wait_for(lambda: daemon.engine.stats.events >= events, what=f"{events} events")


async def test_a_price_above_x_alerts_once_per_fact_through_duplicates_a_reconnect_and_a_restart(
    tmp_path: Path, emulator: BGEEmulator
) -> None:
    async with Receiver() as receiver:
        path = write(tmp_path, source_table(emulator), receiver.url(), RULE, GAP_RULE)
        async with running(path, registry()) as daemon:
            await wait_for(lambda: emulator.subscribed, what="the source to subscribe")
            await emulator.push_ticker(PAIR, 29_900, open_=29_500)  # below: no alert
            above = await emulator.push_ticker(PAIR, 30_100.25, open_=29_500)
            await emulator.push_duplicate("ticker", PAIR)  # BGE sends it twice
            await wait_for(lambda: len(alerted(receiver)) == 1, what="the first alert")
            await emulator.drop_connections()
            await wait_for(lambda: alerted(receiver, "gap"), what="the gap alert")
            await emulator.push_duplicate("ticker", PAIR)  # re-sent after the reconnect
            await emulator.push_ticker(PAIR, 30_200, open_=29_500)
            await wait_for(lambda: len(alerted(receiver)) == 2, what="the second alert")
            await processed(daemon, 3)
        async with running(path, registry()) as daemon:  # a restart: the source starts afresh
            await wait_for(lambda: emulator.subscribed and emulator.connections == 3)
            await emulator.push_duplicate("ticker", PAIR)  # the last fact, once more
            await emulator.push_ticker(PAIR, 30_300, open_=29_500)
            await wait_for(lambda: len(alerted(receiver)) == 3, what="the third alert")
            await processed(daemon, 2)
    first, second, third = alerted(receiver)
    assert [a["title"] for a in (first, second, third)] == [
        "BTC_USDT at 30100.25",
        "BTC_USDT at 30200",
        "BTC_USDT at 30300",
    ]
    assert first["body"] == f"24h change 2.03% (seq {above})"
    event = first["event"]
    assert (event["provider"], event["source"], event["type"]) == ("bge", "market", "ticker")
    assert event["data"]["close"] == 30_100.25 and event["data"]["product"] == PAIR
    assert event["time"].endswith(".000Z")
    (gap,) = alerted(receiver, "gap")
    assert gap["title"] == (
        "market: reconnected; pushes while disconnected may be missed (ticker BTC_USDT)"
    )
    assert len(receiver.requests) == 4


async def test_demo_traffic_alerts_within_3_seconds(tmp_path: Path) -> None:
    async with BGEEmulator() as emulator, Receiver() as receiver:
        rule = {**RULE, "name": "demo", "when": f"close > {DEMO_THRESHOLD}", "throttle": "1m"}
        rule["group_by"] = ["product"]
        path = write(tmp_path, emulator.demo_source(), receiver.url(), rule)
        async with anyio.create_task_group() as tg:
            tg.start_soon(emulator.demo_traffic)
            async with running(path, registry()):
                await wait_for(lambda: emulator.subscribed)
                subscribed_at = time.monotonic()
                await wait_for(lambda: alerted(receiver, "demo"), within=5, what="a demo alert")
                assert time.monotonic() - subscribed_at < 3
            tg.cancel_scope.cancel()
    data = alerted(receiver, "demo")[0]["event"]["data"]
    assert data["product"] == DEMO_PRODUCT and data["close"] > DEMO_THRESHOLD
