"""The plugin author's guide (docs/plugins.md) is complete and its examples work.

Every hook in ``tocsin.hookspecs`` has a section in the guide and an implementation in a
test; the examples marked ``<!-- example: NAME -->`` are executed as plugins and run
against local servers.
"""

from __future__ import annotations

import inspect
import json
import re
import sys
import tomllib
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pluggy
import pytest
from aiohttp import web
from jinja2 import ChainableUndefined
from websockets.asyncio.server import ServerConnection, serve

import tocsin_builtin
from tocsin import Alert, Event, PermanentDelivery, RetryableDelivery, SourceContext, hookspecs
from tocsin.config import load_config
from tocsin.plugins import Registry, build_registry, make_plugin_manager
from tocsin.rules import Engine, compile_rules
from tocsin.store import Store
from tocsin.testing import RecordingContext

ROOT = Path(__file__).resolve().parent.parent
GUIDE = ROOT / "docs" / "plugins.md"
TESTS = Path(__file__).resolve().parent
API_KEY = "k3y-for-the-docs-test"


def guide() -> str:
    return GUIDE.read_text(encoding="utf-8")


def hook_names() -> list[str]:
    """Every hook spec in ``tocsin.hookspecs``, checked against what pluggy sees."""
    marked = sorted(
        name
        for name, func in inspect.getmembers(hookspecs, inspect.isfunction)
        if hasattr(func, "tocsin_spec")
    )
    pm = pluggy.PluginManager("tocsin")
    pm.add_hookspecs(hookspecs)
    assert marked == sorted(pm.hook.__dict__), "hookspecs and pluggy disagree on the hooks"
    assert marked, "no hook specs found in tocsin.hookspecs"
    return marked


def example(name: str, lang: str = "python") -> str:
    """The fenced block that follows ``<!-- example: NAME -->`` in the guide."""
    pattern = rf"^<!-- example: {re.escape(name)} -->\n```{lang}\n(.*?)^```$"
    found = re.search(pattern, guide(), re.MULTILINE | re.DOTALL)
    assert found, f"docs/plugins.md has no ```{lang} block after <!-- example: {name} -->"
    return found.group(1)


def load_example(name: str, monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    """Execute a python example as a fresh module, importable while the test runs."""
    module = types.ModuleType(f"docs_example_{name}")
    module.__file__ = f"{GUIDE}:{name}"
    # Registered like an imported module, so pydantic can resolve the postponed annotations.
    monkeypatch.setitem(sys.modules, module.__name__, module)
    exec(compile(example(name), module.__file__, "exec"), module.__dict__)
    return module


def registry_of(*plugins: object) -> Registry:
    return build_registry(make_plugin_manager(plugins, load_entry_points=False))


# -- the guide covers every hook, and the tests exercise every hook ---------------------


def test_every_hook_has_a_section_in_the_guide() -> None:
    headings = re.findall(r"^#{2,3} (.*)$", guide(), re.MULTILINE)
    missing = [
        hook
        for hook in hook_names()
        if not any(re.search(rf"`{hook}(\(.*?\))?`", heading) for heading in headings)
    ]
    assert not missing, (
        f"docs/plugins.md has no '### `hook(...)`' heading for: {', '.join(missing)}"
    )


def test_every_hook_is_implemented_by_a_test() -> None:
    sources = [
        path.read_text(encoding="utf-8")
        for path in sorted(TESTS.rglob("*.py"))
        if path.resolve() != Path(__file__).resolve()
    ]
    missing = [
        hook
        for hook in hook_names()
        if not any(
            re.search(rf"^\s*(async\s+)?def {hook}\s*\(", text, re.MULTILINE) for text in sources
        )
    ]
    assert not missing, (
        f"no test under tests/ implements these hooks (def <hook>(...) in a test plugin): {', '.join(missing)}"
    )


# -- the ticker source example -----------------------------------------------------------


TICKS = [
    {"symbol": "BTC", "price": 101234.5, "ts": 1764000000123},
    {"symbol": "ETH", "price": 3100, "ts": 1764000000456},
]


class TickerServer:
    """The example's protocol: a subscription, its answer, then pushed frames."""

    def __init__(self, frames: list[str], *, key: str = API_KEY) -> None:
        self.frames = frames
        self.key = key
        self.subscriptions: list[dict[str, Any]] = []
        self.changed = anyio.Event()

    async def handler(self, ws: ServerConnection) -> None:
        subscription = json.loads(await ws.recv())
        self.subscriptions.append(subscription)
        self.changed.set()
        if subscription.get("key") != self.key:
            await ws.send(json.dumps({"op": "error", "code": 401, "message": "invalid key"}))
            await ws.wait_closed()
            return
        await ws.send(json.dumps({"op": "subscribed", "symbols": subscription["symbols"]}))
        for frame in self.frames:
            await ws.send(frame)
        await ws.wait_closed()


async def run_ticker(
    monkeypatch: pytest.MonkeyPatch,
    server: TickerServer,
    until: Callable[[RecordingContext], bool],
    **keys: Any,
) -> tuple[types.ModuleType, RecordingContext]:
    """Run the example's source against ``server`` until ``until(ctx)``, then cancel it."""
    module = load_example("ticker_plugin", monkeypatch)
    source_cls = registry_of(module).source("ticker")
    assert source_cls is module.TickerSource
    ctx = RecordingContext("prices", "ticker")
    recorder: SourceContext = ctx  # the fake must satisfy the protocol
    with anyio.fail_after(20):
        async with serve(server.handler, "127.0.0.1", 0) as ws_server:
            port = ws_server.sockets[0].getsockname()[1]
            config = source_cls.Config.model_validate(
                {
                    "plugin": "ticker",
                    "url": f"ws://127.0.0.1:{port}/v1/stream",
                    "symbols": ["BTC", "ETH"],
                    "api_key": keys.pop("api_key", API_KEY),
                    **keys,
                }
            )
            assert API_KEY not in repr(config) and API_KEY not in str(config)
            async with anyio.create_task_group() as tg:
                tg.start_soon(source_cls(config, recorder).run)
                await ctx.wait_until(lambda: until(ctx))
                tg.cancel_scope.cancel()
    return module, ctx


async def test_ticker_example_emits_events_and_counts_rejects(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    frames = [
        json.dumps(TICKS[0]),
        "{not json",
        json.dumps({"op": "heartbeat"}),
        json.dumps(TICKS[1]),
    ]
    server = TickerServer(frames)

    module, ctx = await run_ticker(
        monkeypatch, server, lambda c: len(c.events) >= 2 and len(c.rejects) >= 1
    )

    assert server.subscriptions == [{"op": "subscribe", "symbols": ["BTC", "ETH"], "key": API_KEY}]
    assert ctx.states() == ["up"]
    assert ctx.rejects == ["malformed frame: not JSON"]
    btc, eth = ctx.events
    assert (btc.source, btc.provider, btc.type, btc.removed) == ("prices", "ticker", "price", False)
    assert btc.data == {"symbol": "BTC", "price": 101234.5, "ts": 1764000000123}
    assert btc.time == "2025-11-24T16:00:00.123Z"  # the provider's time, not receipt time
    assert eth.data == {"symbol": "ETH", "price": 3100.0, "ts": 1764000000456}
    assert btc.id == module.stable_id("ticker", "BTC", 1764000000123)
    assert btc.id != eth.id
    # Stable: the same tick pushed again gives the same id.
    assert module.tick_id(module.parse_tick(json.dumps(TICKS[0]))) == btc.id


async def test_ticker_example_waits_max_backoff_after_a_refused_key(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    server = TickerServer([], key="another-key")

    _, ctx = await run_ticker(monkeypatch, server, lambda c: "down" in c.states())

    assert ctx.status == [("down", "the server refused the API key (401)")]
    assert ctx.events == []
    assert len(server.subscriptions) == 1  # and the next try is max_backoff away


async def test_ticker_example_reconnects_when_silent(monkeypatch: pytest.MonkeyPatch) -> None:
    server = TickerServer([])  # subscribes, then never says anything

    _, ctx = await run_ticker(
        monkeypatch, server, lambda c: "gap" in c.states(), stale_after="1s", max_backoff="1s"
    )

    assert ctx.states() == ["up", "stale", "up", "gap"]
    assert ctx.status[1] == ("stale", "nothing received for 1s")
    assert len(server.subscriptions) == 2


def test_ticker_parser_rejects_garbage_with_a_value_error(monkeypatch: pytest.MonkeyPatch) -> None:
    module = load_example("ticker_plugin", monkeypatch)
    garbage: list[str | bytes] = [
        b"\xff\xfe",
        "[" * 100_000,
        "[]",
        "{}",
        '{"symbol": "BTC", "price": true, "ts": 1}',
        '{"symbol": "BTC", "price": NaN, "ts": 1}',
        '{"symbol": "BTC", "price": 1, "ts": 1e3}',
        '{"symbol": "BTC", "price": 1, "ts": 99999999999999999999}',
        '{"symbol": 7, "price": 1, "ts": 1}',
    ]
    for raw in garbage:
        with pytest.raises(ValueError):
            module.parse_tick(raw)
    assert module.parse_tick('{"op": "heartbeat"}') is None


def test_ticker_config_and_pyproject_examples(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    pyproject = tomllib.loads(example("ticker_pyproject", "toml"))
    assert pyproject["project"]["entry-points"]["tocsin"] == {"ticker": "tocsin_ticker"}

    module = load_example("ticker_plugin", monkeypatch)
    registry = registry_of(tocsin_builtin, module)
    path = tmp_path / "tocsin.toml"
    path.write_text(example("ticker_config", "toml"), encoding="utf-8")
    config = load_config(path, registry, environ={"TICKER_API_KEY": API_KEY})
    (rule,) = compile_rules(config, registry)
    assert rule.config.name == "BTC above 100k"
    source = config.sources["prices"]
    assert isinstance(source, module.TickerConfig)
    assert source.stale_after == 20.0 and source.api_key.get() == API_KEY


# -- the action, rule kind and filter examples ------------------------------------------


def test_action_rule_kind_and_filter_examples_register(monkeypatch: pytest.MonkeyPatch) -> None:
    names = ("pager_action", "once_kind", "money_filter")
    registry = registry_of(*(load_example(name, monkeypatch) for name in names))
    assert list(registry.actions) == ["pager"]
    assert list(registry.rule_kinds) == ["once"]
    assert list(registry.filters) == ["money"]


def test_once_kind_example_fires_once_and_resolves(monkeypatch: pytest.MonkeyPatch) -> None:
    module = load_example("once_kind", monkeypatch)
    kind = module.OnceKind(
        module.OnceConfig.model_validate({"name": "new whale", "kind": "once", "quiet": "1m"})
    )

    def event(n: int) -> Event:
        return Event(id=f"e{n}", source="eos", provider="eospark", type="action", data={})

    fired = kind.on_event(event(1), '["alice"]', 0.0)
    assert [(f.status, f.event.id) for f in fired] == [("firing", "e1")]
    assert kind.on_event(event(2), '["alice"]', 30.0) == []
    assert kind.on_tick(60.0) == []
    (resolved,) = kind.on_tick(90.0)
    assert (resolved.status, resolved.event.id) == ("resolved", "e2")
    assert resolved.id_parts != fired[0].id_parts


def test_once_kind_example_keeps_its_state_across_a_restart(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The guide's kind through the real engine and state database: a restart in the middle
    # of a group neither fires it again nor loses its resolved (the plugin audit: the
    # guide's kind fired "first BTC" again after every restart).
    module = load_example("once_kind", monkeypatch)
    registry = registry_of(module)
    text = '[daemon]\nstate_dir = "state"\n[[rules]]\nname = "new"\nkind = "once"\nquiet = "1m"\n'
    path = tmp_path / "t.toml"
    path.write_text(text)
    now = [0.0]

    def engine() -> Engine:
        return Engine(
            compile_rules(load_config(str(path), registry), registry), clock=lambda: now[0]
        )

    def event(n: int) -> Event:
        return Event(id=f"e{n}", source="eos", provider="eospark", type="action", data={})

    store = Store.open(tmp_path / "state")
    try:
        first = engine()
        assert [p.alert.status for p in first.process(event(1))] == ["firing"]
        store.call_sync(Store.commit_alerts, [], [], first.take_state())
        now[0] = 30.0
        second = engine()  # a restart
        second.restore(store.call_sync(Store.load_rule_state))
        assert second.process(event(2)) == []  # the group is still open: no second firing
        assert second.explain(event(3)) == [("new", "", "fired on e1; resolves after 60s quiet")]
        store.call_sync(Store.commit_alerts, [], [], second.take_state())
        now[0] = 90.0
        third = engine()
        third.restore(store.call_sync(Store.load_rule_state))
        (resolved,) = third.tick()
        assert (resolved.alert.status, resolved.alert.event["id"]) == ("resolved", "e2")
        store.call_sync(Store.commit_alerts, [], [], third.take_state())
        assert store.call_sync(Store.load_rule_state) == []  # resolved: its row is gone
    finally:
        store.close()


def test_money_filter_example_never_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    money = load_example("money_filter", monkeypatch).money
    assert money(123456.789) == "123,456.79"
    assert money(5, 0) == "5"
    odd: list[tuple[object, ...]] = [
        (None,),
        (ChainableUndefined(name="price"),),
        ("12",),
        (True,),
        (float("nan"),),
        (10**400,),
        (1.0, -1),
        (1.0, "2"),
        (1.0, 10**9),
    ]
    for args in odd:
        assert money(*args) is None, args


async def test_pager_action_example_delivers(monkeypatch: pytest.MonkeyPatch) -> None:
    module = load_example("pager_action", monkeypatch)
    answers = [200, 503, 400]
    pages: list[dict[str, Any]] = []

    async def handle(request: web.Request) -> web.Response:
        pages.append(await request.json())
        assert request.headers["Authorization"] == f"Bearer {API_KEY}"
        return web.Response(status=answers.pop(0), headers={"Retry-After": "7"})

    app = web.Application()
    app.router.add_post("/pages", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        config = module.PagerConfig.model_validate(
            {
                "plugin": "pager",
                "url": f"http://127.0.0.1:{port}/pages",
                "token": API_KEY,
                "routes": ["infra"],
            }
        )
        action = module.PagerAction("oncall", config)
        assert [(t.key, t.label) for t in action.targets()] == [("infra", "oncall/infra")]
        alert = Alert("a1", "firing", "r", "title", "body", "2026-01-01T00:00:00Z", {})
        await action.start()
        try:
            await action.deliver(alert, "infra")
            with pytest.raises(RetryableDelivery) as retry:
                await action.deliver(alert, "infra")
            assert retry.value.retry_after == 7.0
            with pytest.raises(PermanentDelivery):
                await action.deliver(alert, "infra")
            with pytest.raises(PermanentDelivery):
                await action.deliver(alert, "gone")
        finally:
            await action.aclose()
    finally:
        await runner.cleanup()
    assert [p["dedup_key"] for p in pages] == ["a1", "a1", "a1"]


def test_the_public_api_table_names_every_name_tocsin_exports() -> None:
    import tocsin

    text = guide()
    table = text[text.index("| name | what it is |") : text.index("Everything else in the")]
    named = set(re.findall(r"`([A-Za-z_]+)`", table))
    assert sorted(set(tocsin.__all__) - named - {"__version__"}) == []
