from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import anyio
import anyio.lowlevel
import pytest
from pydantic import BaseModel

import tocsin
import tocsin_builtin
from support import make_registry, running, wait_for, write_config
from tocsin import (
    Action,
    Alert,
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
from tocsin.testing import RecordingContext


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

    with pytest.raises(PluginError) as caught:
        make_plugin_manager([Typo()], load_entry_points=False)
    assert str(caught.value) == (  # the plugin's name, not pluggy's repr of the object
        "plugin 'Typo': unknown hook 'register_source' (did you mean 'register_sources'?)"
    )


def test_an_async_hook_or_a_config_of_the_wrong_kind_is_a_plugin_error() -> None:
    # Both passed before: the async hook registered nothing (exit 0, a RuntimeWarning),
    # and the action with a plain pydantic Config crashed `tocsin run` (the plugin audit).
    class Async:
        @staticmethod
        @hookimpl
        async def register_template_filters(register: Callable[..., None]) -> None:
            raise AssertionError("never called")

    with pytest.raises(PluginError) as caught:
        build_registry(make_plugin_manager([Async()], load_entry_points=False))
    assert str(caught.value) == (
        "plugin 'Async': register_template_filters must be a plain function, not async"
    )

    class Plain(BaseModel):
        url: str = ""

    class Pager(Action):
        name = "pager"
        Config = Plain  # type: ignore[assignment]

    class WrongConfig:
        @staticmethod
        @hookimpl
        def register_actions(register: Callable[..., None]) -> None:
            register(Pager)

    with pytest.raises(PluginError) as caught:
        build_registry(make_plugin_manager([WrongConfig()], load_entry_points=False))
    assert str(caught.value) == (
        "plugin 'WrongConfig': register_actions registered Pager, whose Config is not a"
        " subclass of tocsin.ActionConfig"
    )


def test_failing_hook_is_a_plugin_error() -> None:
    class Broken:
        @staticmethod
        @hookimpl
        def register_actions(register: Callable[..., None]) -> None:
            raise RuntimeError("boom")

    with pytest.raises(PluginError, match="failed in register_actions"):
        build_registry(make_plugin_manager([Broken()], load_entry_points=False))

    class Exits:
        @staticmethod
        @hookimpl
        def register_actions(register: Callable[..., None]) -> None:
            sys.exit("bye from a plugin hook")

    with pytest.raises(PluginError) as caught:
        build_registry(make_plugin_manager([Exits()], load_entry_points=False))
    assert str(caught.value) == (
        "plugin 'Exits' failed in register_actions: SystemExit: bye from a plugin hook"
    )


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


def test_a_name_in_tocsin_load_plugins_that_no_plugin_has_is_a_warning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # A typo left the plugin out with no word (the plugin audit).
    monkeypatch.setenv("TOCSIN_LOAD_PLUGINS", "buitlin,eospark")
    with caplog.at_level(logging.WARNING, logger="tocsin.plugins"):
        registry = build_registry(make_plugin_manager())
    assert "webhook" not in registry.actions and "eospark" in registry.sources
    assert caplog.messages == ["TOCSIN_LOAD_PLUGINS names 'buitlin', which no installed plugin is"]


def install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dist: str, entry: str, module: str, body: str
) -> None:
    """An installed distribution ``dist`` ("name version") on the path, whose ``tocsin``
    entry point ``entry`` is ``module``, a module of ``body``."""
    name, version = dist.split()
    info = tmp_path / "site" / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    (info / "entry_points.txt").write_text(f"[tocsin]\n{entry} = {module}\n")
    (tmp_path / "site" / f"{module}.py").write_text(body + "\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))


def test_a_second_plugin_of_the_same_name_stops_loading_naming_both(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A third-party distribution whose entry point is named like a built-in one.
    install(tmp_path, monkeypatch, "tocsin-bad 0.0.7", "eospark", "tocsin_bad_mod", "")
    monkeypatch.setenv("TOCSIN_LOAD_PLUGINS", "eospark,builtin")
    with pytest.raises(PluginError) as caught:
        make_plugin_manager()
    message = str(caught.value)
    assert message.startswith("plugin name 'eospark' is installed twice: by ")
    assert "tocsin-bad 0.0.7 (tocsin_bad_mod)" in message and "(tocsin_eospark)" in message


@pytest.mark.parametrize(
    ("body", "error"),
    [
        (
            'raise RuntimeError("no key\\nsecond line\\n  third")',
            "RuntimeError: no key second line third",
        ),
        ('import sys\nsys.exit("plugin exits at import")', "SystemExit: plugin exits at import"),
    ],
)
def test_a_plugin_that_fails_to_import_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, body: str, error: str
) -> None:
    install(tmp_path, monkeypatch, "tocsin-broken 0.0.1", "broken", "tocsin_broken_mod", body)
    monkeypatch.setenv("TOCSIN_LOAD_PLUGINS", "broken")
    with pytest.raises(PluginError) as caught:
        make_plugin_manager()
    assert str(caught.value) == f"plugin 'broken' (tocsin_broken_mod) failed to load: {error}"


def test_a_hook_with_a_wrong_argument_name_is_a_plugin_error() -> None:
    class WrongArgument:
        @staticmethod
        @hookimpl
        def register_sources(reg: Callable[..., None]) -> None:
            raise AssertionError("never called")

    with pytest.raises(
        PluginError,
        match=r"plugin 'WrongArgument' in register_sources: Argument\(s\) \{'reg'\} are declared",
    ):
        make_plugin_manager([WrongArgument()], load_entry_points=False)


def test_registering_what_is_not_a_source_is_a_plugin_error() -> None:
    class NotASource:
        name = "weird"

    class Registers:
        @staticmethod
        @hookimpl
        def register_sources(register: Callable[..., None]) -> None:
            register(NotASource)

    with pytest.raises(PluginError, match=r"not a subclass of tocsin\.Source"):
        build_registry(make_plugin_manager([Registers()], load_entry_points=False))


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


class Fragile(RuleKind):
    """A rule kind that refuses some rules when built, and fails on some events."""

    name = "fragile"

    def __init__(self, config: RuleConfig) -> None:
        super().__init__(config)
        if config.name.startswith("refused"):
            raise ValueError(f"cannot watch {config.name}")

    def on_event(self, event: Event, group_key: str, now: float) -> list[Firing]:
        if event.data.get("x") == 0:
            raise ZeroDivisionError("on_event blew up")
        return [Firing("firing", event, (event.id,))]


class FragilePlugin:
    @staticmethod
    @hookimpl
    def register_rule_kinds(register: Callable[[type[RuleKind]], None]) -> None:
        register(Fragile)


def test_a_kind_that_refuses_a_rule_is_a_config_problem_and_its_failure_a_reason(
    tmp_path: Path,
) -> None:
    registry = make_registry(FragilePlugin())
    bad = write_config(
        tmp_path / "bad.toml",
        '[[rules]]\nname = "refused one"\nkind = "fragile"\n[[rules]]\nname = "ok"\nkind = "fragile"\n',
    )
    with pytest.raises(ConfigError) as caught:
        compile_rules(load_config(bad, registry), registry)
    assert [str(p) for p in caught.value.problems] == [
        f'{bad}: rules[0] "refused one": kind: the fragile kind could not take this rule:'
        " ValueError: cannot watch refused one"
    ]
    good = write_config(tmp_path / "good.toml", '[[rules]]\nname = "ok"\nkind = "fragile"\n')
    engine = Engine(compile_rules(load_config(good, registry), registry))
    event = Event(id="e", source="s", provider="p", type="t", data={"x": 0})
    assert engine.process(event) == []
    # What tocsin test and explain say about the rule: the kind's failure, not "matched".
    assert engine.suppressed["ok"] == "the kind failed: ZeroDivisionError: on_event blew up"
    assert engine.stats.kind_errors == 1


class StartFails(Action):
    name = "startfails"

    async def start(self) -> None:
        raise RuntimeError("no way to reach the pager")


class StartFailsPlugin:
    @staticmethod
    @hookimpl
    def register_actions(register: Callable[[type[Action]], None]) -> None:
        register(StartFails)


async def test_an_action_that_cannot_start_stops_start_up_and_refuses_a_reload(
    tmp_path: Path,
) -> None:
    from tocsin.daemon import Daemon

    registry = make_registry(StartFailsPlugin())
    head = '[daemon]\nstate_dir = "state"\n[actions.console]\nplugin = "log"\n'
    broken = '[actions.pager]\nplugin = "startfails"\n'
    path = write_config(tmp_path / "t.toml", head + broken)
    with pytest.raises(BaseExceptionGroup) as group:  # out of the daemon's task groups
        await Daemon(str(path), registry).run()
    error: BaseException = group.value
    while isinstance(error, BaseExceptionGroup):  # as tocsin run unwraps it for the user
        (error,) = error.exceptions
    assert isinstance(error, PluginError)
    assert str(error) == (
        "action 'pager' (plugin 'startfails') could not start:"
        " RuntimeError: no way to reach the pager"
    )
    path.write_text(head)
    async with running(path, registry) as daemon:
        path.write_text(head + broken)
        assert await daemon.reload() is False
        assert set(daemon.actions) == {"console"}  # the running config stays whole
        assert daemon.config.actions.keys() == {"console"}


class SlowClose(Action):
    """Records what it delivers; closing the one named ``b`` waits for ``release``, and
    the one named ``boom`` fails."""

    name = "slowclose"
    delivered: ClassVar[list[tuple[str, str]]] = []  # (action name, alert id)
    closing: ClassVar[anyio.Event]
    release: ClassVar[anyio.Event]

    async def aclose(self) -> None:
        if self.instance == "boom":
            raise RuntimeError("a bug in closing")
        if self.instance == "b":
            SlowClose.closing.set()
            await SlowClose.release.wait()

    async def deliver(self, alert: Alert, target: str) -> None:
        SlowClose.delivered.append((self.instance, alert.id))


class SlowClosePlugin:
    @staticmethod
    @hookimpl
    def register_actions(register: Callable[[type[Action]], None]) -> None:
        register(SlowClose)


async def test_an_alert_made_while_a_reload_closes_actions_goes_to_every_action(
    tmp_path: Path,
) -> None:
    SlowClose.delivered.clear()
    SlowClose.closing, SlowClose.release = anyio.Event(), anyio.Event()
    text = (
        '[daemon]\nstate_dir = "state"\n'
        '[actions.a]\nplugin = "slowclose"\n[actions.b]\nplugin = "slowclose"\n'
        '[[rules]]\nname = "r"\nmatch = { x = 1 }\nactions = ["a", "b"]\n'
    )
    path = write_config(tmp_path / "t.toml", text)
    async with running(path, make_registry(SlowClosePlugin())) as daemon:
        path.write_text(text.replace('"slowclose"\n', '"slowclose"\nconcurrency = 2\n'))
        async with anyio.create_task_group() as tg:
            tg.start_soon(daemon.reload)  # both actions changed: both are replaced
            with anyio.fail_after(5):
                await SlowClose.closing.wait()  # the reload waits on closing the old "b"
            await daemon.intake(Event(id="e1", source="s", provider="p", type="t", data={"x": 1}))
            await wait_for(lambda: daemon.engine.stats.alerts == 1, what="the alert committed")
            SlowClose.release.set()
        await wait_for(lambda: len(SlowClose.delivered) == 2, what="a delivery to each")
    assert sorted(name for name, _ in SlowClose.delivered) == ["a", "b"]


async def test_an_action_that_fails_to_close_on_a_reload_costs_nothing_else(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    text = '[daemon]\nstate_dir = "state"\n[actions.boom]\nplugin = "slowclose"\n'
    path = write_config(tmp_path / "t.toml", text)
    async with running(path, make_registry(SlowClosePlugin())) as daemon:
        path.write_text(text + "concurrency = 2\n")
        assert await daemon.reload()
        assert daemon.actions["boom"].config.concurrency == 2
        # Closed once what it had in flight (nothing here) is done: just after the reload.
        await wait_for(lambda: "action 'boom': closing the replaced action failed" in caplog.text)
        assert not daemon.stopping
    # At exit too: the failure is logged, the daemon stops cleanly (no exception).
    assert "action 'boom': closing it failed" in caplog.text


async def test_a_recording_context_wakes_a_wait_for_frames_that_make_no_event() -> None:
    # docs/plugins.md: wait_until is "woken by every change"; a frame read (a heartbeat)
    # was not one, so a test waiting for frames hung (the plugin audit).
    ctx = RecordingContext("prices", "ticker")
    async with anyio.create_task_group() as tg:

        async def heartbeats() -> None:
            for _ in range(3):
                await anyio.lowlevel.checkpoint()  # the waiter is waiting by then
                ctx.received('{"type": "heartbeat"}')

        tg.start_soon(heartbeats)
        with anyio.fail_after(5):
            await ctx.wait_until(lambda: len(ctx.frames) == 3)
    assert ctx.events == []
