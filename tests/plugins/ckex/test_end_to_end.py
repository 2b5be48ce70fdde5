"""End to end: the emulator -> the ckex source in a real daemon -> a rule -> a real webhook."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest
import tocsin_ckex
import tomli_w
from tocsin_ckex.emulator import CkexEmulator
from tocsin_ckex.protocol import start_command

import tocsin_builtin
from support import Receiver, daemon_toml, running, wait_for, write_config
from tocsin.testing import Registry, build_registry, make_plugin_manager

pytestmark = pytest.mark.usefixtures("source_processes")

EVENT, MARKET = "40789105-e", "219_33753655"

RULES = """
[actions.hook]
plugin = "webhook"
url = "{hook}"
timeout = "2s"
retry = {{ attempts = 20, backoff = "20ms", max_backoff = "100ms" }}

[[rules]]
name = "odds above 2.0"
source = "odds"
type = "order_slip"
match = {{ open = true }}
when = "price > 2.0"
actions = ["hook"]
title = "{{{{ event_id }}}} #{{{{ product_id }}}} at {{{{ price }}}}"
"""

GAP_RULE = """
[[rules]]
name = "odds gap"
source = "odds"
type = "source.gap"
actions = ["hook"]
title = "{{ reason }}"
"""


@pytest.fixture
def registry() -> Registry:
    pm = make_plugin_manager([tocsin_builtin, tocsin_ckex], load_entry_points=False)
    return build_registry(pm)


def config(emu: CkexEmulator, receiver: Receiver) -> str:
    return f"""
{daemon_toml()}
[sources.odds]
plugin = "ckex"
url = "{emu.url}"
token = {{ env = "CKEX_TOKEN" }}
markets = [{{ kind = "sportsbook", event_id = "{EVENT}", market_id = "{MARKET}" }}]
max_backoff = "1s"
{RULES.format(hook=receiver.url())}
{GAP_RULE}
"""


def titles(receiver: Receiver) -> list[str]:
    return [r.json()["title"] for r in receiver.ok()]


async def test_odds_alert_once_per_fact_through_duplicates_locks_reconnects_and_restarts(
    tmp_path: Path, registry: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with CkexEmulator(quote_interval=0.05, alive_interval=0.5) as emu, Receiver() as receiver:
        monkeypatch.setenv("CKEX_TOKEN", emu.token())
        await emu.quote(EVENT, MARKET, "1", "1.80", push=False)
        await emu.quote(EVENT, MARKET, "2", "2.37", push=False)
        path = write_config(tmp_path / "tocsin.toml", config(emu, receiver))
        async with running(path, registry) as daemon:
            await wait_for(lambda: receiver.ok(), what="the first alert")
            for _ in range(3):
                await emu.push(EVENT, MARKET)  # duplicates, besides the snapshot repeats
            await emu.flip_status(EVENT, MARKET, "2")  # locked: no alert
            await emu.flip_status(EVENT, MARKET, "1")  # open again at 2.37: a new fact
            await emu.drop_connections()
            await wait_for(lambda: emu.commands.count(start_command()) == 2, what="a reconnect")
            await emu.push(EVENT, MARKET)  # the same quotes on the new connection
            await emu.quote(EVENT, MARKET, "3", "2.10")  # a new fact, after all of that
            await wait_for(lambda: len(receiver.ok()) == 4, what="the gap and the new facts")
            # Two quotes, two locked, two open again, none for the repeats, the new one.
            assert daemon.sources["odds"].events == 7
        assert sorted(titles(receiver)) == [
            f"{EVENT} #2 at 2.37",
            f"{EVENT} #2 at 2.37",
            f"{EVENT} #3 at 2.1",  # odds are numbers in data
            "reconnected; events while disconnected may be missed",
        ]
        async with running(path, registry):  # a restart on the same state: no repeats
            await wait_for(lambda: emu.commands.count(start_command()) == 3, what="a subscription")
            await emu.quote(EVENT, MARKET, "1", "2.01")  # after the snapshot of the same facts
            await wait_for(lambda: len(receiver.ok()) == 5, what="the new fact")
        assert titles(receiver)[4] == f"{EVENT} #1 at 2.01"
        firing = [r.json() for r in receiver.ok() if r.json()["rule"] == "odds above 2.0"]
        assert {a["event"]["provider"] for a in firing} == {"ckex"}
        assert firing[0]["event"]["data"] == {
            "event_id": EVENT,
            "market_id": MARKET,
            "product_id": "2",
            "price": 2.37,
            "status": "1",
            "open": True,
        }
        assert len(receiver.requests) == 5 and emu.connections == 3


async def test_a_restart_knows_the_last_odds_of_each_product(
    tmp_path: Path, registry: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    # SPEC section 4: the same fact keeps its id across a restart, so a re-sent snapshot
    # alerts nothing, and a change made while stopped is a new fact that alerts.
    async with CkexEmulator(quote_interval=0.05, alive_interval=0.5) as emu, Receiver() as receiver:
        monkeypatch.setenv("CKEX_TOKEN", emu.token())
        await emu.quote(EVENT, MARKET, "1", "2.37", push=False)
        await emu.quote(EVENT, MARKET, "2", "1.50", push=False)
        path = write_config(tmp_path / "tocsin.toml", config(emu, receiver))
        async with running(path, registry) as daemon:
            await wait_for(lambda: len(receiver.ok()) == 1, what="#1 at 2.37")
            await emu.quote(EVENT, MARKET, "2", "2.20")  # #2 reaches 2.20 by a move
            await wait_for(lambda: len(receiver.ok()) == 2, what="#2 at 2.2")
            await emu.quote(EVENT, MARKET, "1", "1.90")  # #1 falls below: no alert
            await wait_for(lambda: daemon.sources["odds"].events == 4, what="#1 at 1.9")
        await emu.quote(EVENT, MARKET, "1", "2.37", push=False)  # while stopped: back up
        async with running(path, registry) as daemon:
            await wait_for(lambda: len(receiver.ok()) == 3, what="#1 back at 2.37")
            await emu.quote(EVENT, MARKET, "3", "2.05")  # a marker after the snapshots
            await wait_for(lambda: len(receiver.ok()) == 4, what="#3 at 2.05")
            assert daemon.sources["odds"].events == 2  # #2's re-sent 2.20 is no news
    assert titles(receiver) == [
        f"{EVENT} #1 at 2.37",
        f"{EVENT} #2 at 2.2",
        f"{EVENT} #1 at 2.37",  # a new crossing: its own alert
        f"{EVENT} #3 at 2.05",
    ]


async def test_demo_alerts_within_seconds_of_subscribing(
    tmp_path: Path, registry: Registry
) -> None:
    async with CkexEmulator() as emu, Receiver() as receiver:
        text = daemon_toml()
        text += tomli_w.dumps({"sources": {"odds": emu.demo_source()}})
        path = write_config(tmp_path / "demo.toml", text + RULES.format(hook=receiver.url()))
        async with anyio.create_task_group() as tg:
            tg.start_soon(emu.demo_traffic)
            async with running(path, registry):
                await wait_for(lambda: start_command() in emu.commands, what="the subscription")
                subscribed = anyio.current_time()
                await wait_for(lambda: receiver.ok(), within=3, what="a demo alert")
                assert anyio.current_time() - subscribed < 3
            tg.cancel_scope.cancel()
        alert = receiver.ok()[0].json()
        assert alert["rule"] == "odds above 2.0"
        assert float(alert["event"]["data"]["price"]) > 2.0
