from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import tocsin
import tocsin_builtin
from support import make_registry, write_config
from tocsin import (
    Action,
    Emulator,
    Event,
    Firing,
    RuleConfig,
    RuleKind,
    WebSocketEmulator,
    hookimpl,
)
from tocsin.config import load_config
from tocsin.errors import ConfigError, PluginError
from tocsin.plugins import build_registry, make_plugin_manager, plugin_versions
from tocsin.rules import Engine, compile_rules


class EveryOther(RuleKind):
    """A third-party rule kind: fires on every ``nth`` matching event."""

    name = "every_nth"

    class Config(RuleConfig):
        nth: int = 2

    def __init__(self, config: RuleConfig) -> None:
        super().__init__(config)
        self.seen = 0

    def on_event(self, event: Event, group_key: str, now: float) -> list[Firing]:
        self.seen += 1
        nth = self.config.nth  # type: ignore[attr-defined]
        return [Firing("firing", event, (event.id,))] if self.seen % nth == 0 else []


class KindPlugin:
    @staticmethod
    @hookimpl
    def register_rule_kinds(register: Callable[[type[RuleKind]], None]) -> None:
        register(EveryOther)

    @staticmethod
    @hookimpl
    def register_template_filters(register: Callable[[str, Callable[..., Any]], None]) -> None:
        register("shout", lambda value: str(value).upper() + "!")


class DuplicateLog:
    @staticmethod
    @hookimpl
    def register_actions(register: Callable[[type[Action]], None]) -> None:
        class Log(Action):
            name = "log"

        register(Log)


def test_third_party_kind_and_filter(tmp_path: Path) -> None:
    registry = make_registry(KindPlugin())
    assert registry.rule_kinds["every_nth"].obj is EveryOther
    assert registry.rule_kinds["every_nth"].plugin == "KindPlugin"
    assert registry.filters["shout"].plugin == "KindPlugin"
    path = write_config(
        tmp_path / "t.toml",
        '[[rules]]\nname = "third"\nkind = "every_nth"\nnth = 3\ntitle = "{{ who | shout }}"\n',
    )
    engine = Engine(compile_rules(load_config(path, registry), registry))
    fired = []
    for i in range(7):
        fired += engine.process(
            Event(id=str(i), source="s", provider="p", type="t", data={"who": "eve"})
        )
    assert [a.alert.title for a in fired] == ["EVE!", "EVE!"]


def test_kind_keys_are_validated_by_the_kind(tmp_path: Path) -> None:
    path = write_config(
        tmp_path / "t.toml", '[[rules]]\nname = "x"\nkind = "every_nth"\nnth = "many"\nnht = 1\n'
    )
    with pytest.raises(ConfigError) as caught:
        load_config(path, make_registry(KindPlugin()))
    text = str(caught.value)
    assert 'rules[0] "x": nth: Input should be a valid integer' in text
    assert 'rules[0] "x": unknown key "nht" (did you mean "nth"?)' in text


def test_duplicate_name_names_both_plugins() -> None:
    pm = make_plugin_manager([tocsin_builtin, DuplicateLog()], load_entry_points=False)
    with pytest.raises(PluginError) as caught:
        build_registry(pm)
    assert str(caught.value) == (
        "action plugin 'log' is registered twice: by plugin 'tocsin_builtin' and by plugin 'DuplicateLog'"
    )


def test_misspelled_hook_fails_loudly() -> None:
    class Typo:
        @staticmethod
        @hookimpl
        def register_source(register: Callable[..., None]) -> None:  # missing "s"
            raise AssertionError("never called")

    with pytest.raises(PluginError, match="register_source"):
        make_plugin_manager([Typo()], load_entry_points=False)


def test_failing_hook_is_a_plugin_error() -> None:
    class Broken:
        @staticmethod
        @hookimpl
        def register_actions(register: Callable[..., None]) -> None:
            raise RuntimeError("boom")

    with pytest.raises(PluginError, match="failed in register_actions"):
        build_registry(make_plugin_manager([Broken()], load_entry_points=False))


def test_entry_points_and_load_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TOCSIN_LOAD_PLUGINS")
    pm = make_plugin_manager()
    assert pm.get_plugin("builtin") is tocsin_builtin
    registry = build_registry(pm)
    assert {"webhook", "apprise", "log"} <= set(registry.actions)
    assert registry.actions["webhook"].plugin == "builtin"
    assert plugin_versions(pm)["builtin"] == tocsin.__version__
    monkeypatch.setenv("TOCSIN_LOAD_PLUGINS", "")
    assert build_registry(make_plugin_manager()).actions == {}


class Echo(WebSocketEmulator):
    """A minimal emulator: a WebSocket server that pushes one frame to each client."""

    name = "echo"

    async def handle(self, ws: Any) -> None:
        await ws.send('{"hello": "world"}')
        await ws.wait_closed()

    def demo_source(self) -> dict[str, Any]:
        return {"plugin": "echo", "url": self.url}


class EmulatorPlugin:
    @staticmethod
    @hookimpl
    def register_emulators(register: Callable[[type[Emulator]], None]) -> None:
        register(Echo)


async def test_emulators_are_registered_and_serve_on_loopback() -> None:
    import websockets

    registry = make_registry(EmulatorPlugin())
    assert registry.emulators["echo"].plugin == "EmulatorPlugin"
    async with registry.emulator("echo")() as emulator:
        assert emulator.port != 0
        assert emulator.url == f"ws://127.0.0.1:{emulator.port}/"
        assert emulator.demo_source() == {"plugin": "echo", "url": emulator.url}
        async with websockets.connect(emulator.url) as ws:
            assert await ws.recv() == '{"hello": "world"}'
    with pytest.raises(OSError):  # closed: nothing listens there any more
        await websockets.connect(emulator.url, open_timeout=5)
