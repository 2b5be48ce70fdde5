"""``tocsin demo`` and ``tocsin emulate``: the bundled emulators on loopback, with traffic.

``run_demo`` reads a config (``rules.example.toml``), starts each source's emulator at the
loopback address its ``url`` names, a small receiver for each loopback webhook action
(it checks the signature and prints what arrives), and the daemon; alerts print to the
terminal as they fire. ``run_emulator`` runs one emulator standalone.
"""

from __future__ import annotations

import contextlib
import inspect
import ipaddress
import math
import os
import signal
import sys
import typing
from collections.abc import Callable, Sequence
from typing import Any, Literal, TextIO
from urllib.parse import urlsplit

import anyio
import orjson
from aiohttp import web
from anyio.abc import TaskStatus

from .config import Config, did_you_mean, load_config
from .daemon import Daemon
from .emulator import Emulator
from .errors import UsageError
from .fields import SecretValue
from .plugins import Registry

Printer = Callable[[str], None]


def loopback(host: str) -> bool:
    """Whether ``host`` is a loopback name or address (emulators listen nowhere else)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _address(url: str, what: str) -> tuple[str, int]:
    parts = urlsplit(url)
    host, port = parts.hostname or "", parts.port
    if not loopback(host) or port is None:
        raise UsageError(
            f"{what}: the demo runs emulators on loopback only, and {parts.scheme}://{host}"
            f"{':' + str(port) if port else ''}/ is not a loopback address with a port"
        )
    return host, port


def emulators_for(config: Config, registry: Registry) -> list[Emulator]:
    """One emulator per enabled source, at the address of the source's ``url``."""
    out = []
    for name, source in config.sources.items():
        if not source.enabled:
            continue
        if source.plugin not in registry.emulators:
            raise UsageError(f"source {name!r}: plugin {source.plugin!r} ships no emulator")
        url = getattr(source, "url", None)
        if not isinstance(url, str):
            raise UsageError(f"source {name!r} has no url to run its emulator at")
        host, port = _address(url, f"source {name!r}")
        out.append(registry.emulator(source.plugin)(host, port))
    return out


class DemoReceiver:
    """Receives a webhook action's POSTs on loopback, checks the signature, prints them."""

    def __init__(self, name: str, url: str, secret: SecretValue | None, say: Printer) -> None:
        self.name = name
        self.host, self.port = _address(url, f"action {name!r}")
        self.path = urlsplit(url).path or "/"
        self.secret = secret
        self.say = say
        self.received = 0
        self._runner: web.AppRunner | None = None

    async def _handle(self, request: web.Request) -> web.Response:
        from tocsin_builtin.webhook import verify  # the action's own check, not a copy

        body = await request.read()
        self.received += 1
        try:
            alert = orjson.loads(body)
            line = f"[{alert['status']}] {alert['rule']}: {alert['title']}"
        except (orjson.JSONDecodeError, KeyError, TypeError):
            line = "(not an alert)"
        if self.secret is None:
            check = "unsigned"
        else:
            ok = verify(
                self.secret.get().encode(),
                request.headers.get("X-Tocsin-Timestamp", ""),
                body,
                request.headers.get("X-Tocsin-Signature", ""),
            )
            check = "signature ok" if ok else "BAD SIGNATURE"
        self.say(f"webhook {self.name} <- {line} ({check})")
        return web.Response(text="ok")

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post(self.path, self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, self.host, self.port).start()

    async def aclose(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


async def run_demo(
    config_path: str, registry: Registry, say: Printer, *, signals: bool = True
) -> None:
    """Run emulators, receivers and the daemon on ``config_path`` until SIGINT/SIGTERM."""
    config = load_config(config_path, registry)
    emulators = emulators_for(config, registry)
    receivers = [
        DemoReceiver(name, action.url.get(), getattr(action, "secret", None), say)  # type: ignore[attr-defined]
        for name, action in config.actions.items()
        if action.plugin == "webhook" and loopback(urlsplit(action.url.get()).hostname or "")  # type: ignore[attr-defined]
    ]
    daemon = Daemon(config_path, registry)
    async with contextlib.AsyncExitStack() as stack, anyio.create_task_group() as tg:
        if signals:  # before anything is announced, so an early Ctrl-C is not lost
            await tg.start(_on_signal, daemon.stop)
        parts: list[Emulator | DemoReceiver] = [*emulators, *receivers]
        for part in parts:
            await _listen(part)
            stack.push_async_callback(part.aclose)
        for emulator in emulators:
            say(f"{emulator.name} emulator on {emulator.url}")
        say("tocsin is running on " + config_path + "; alerts print here. Ctrl-C stops.")
        address = daemon.config.daemon.http_address()
        if address is not None:
            host = f"[{address[0]}]" if ":" in address[0] else address[0]
            say(f"status page: http://{host}:{address[1]}/ (and /metrics)")
        for emulator in emulators:
            tg.start_soon(emulator.demo_traffic)
        await daemon.run()
        tg.cancel_scope.cancel()


async def _listen(part: Emulator | DemoReceiver) -> None:
    try:
        await part.start()
    except OSError as err:
        where = f"{part.host}:{part.port}"
        reason = os.strerror(err.errno) if err.errno else str(err)
        raise UsageError(f"cannot listen on {where}: {reason}") from None


async def _on_signal(
    stop: Callable[[], None], *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
) -> None:
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as received:
        task_status.started()
        async for _ in received:
            stop()
            return


async def run_emulator(
    registry: Registry,
    provider: str,
    host: str,
    port: int,
    say: Printer,
    settings: Sequence[str] = (),
) -> None:
    """One emulator, standalone, with its demo traffic, until SIGINT/SIGTERM.

    ``settings`` are ``NAME=VALUE`` texts for the emulator's keyword arguments
    (``emulator_settings``)."""
    if provider not in registry.emulators:
        known = ", ".join(sorted(registry.emulators)) or "none installed"
        raise UsageError(
            f'no emulator "{provider}"{did_you_mean(provider, registry.emulators)} (known: {known})'
        )
    if not loopback(host):
        raise UsageError(f"emulators listen on loopback only, not {host}")
    import tomli_w

    cls = registry.emulator(provider)
    options = emulator_settings(cls, provider, settings)
    stopped = anyio.Event()
    try:
        emulator = cls(host, port, **options)
    except ValueError as err:  # a setting the emulator itself refuses
        raise UsageError(f"the {provider} emulator refused its settings: {err}") from None
    async with anyio.create_task_group() as tg:
        await tg.start(_on_signal, stopped.set)  # before anything is announced
        await _listen(emulator)
        try:
            say(f"{provider} emulator on {emulator.url}; connect a daemon with:\n")
            say(tomli_w.dumps({"sources": {provider: _plain(emulator.demo_source())}}))
            tg.start_soon(emulator.demo_traffic)
            await stopped.wait()
            tg.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                await emulator.aclose()


_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


def settable(cls: type[Emulator]) -> dict[str, Any]:
    """The keyword arguments of an emulator's constructor that ``tocsin emulate --set``
    can give (a bool, number, text or a choice of them), with their types."""
    try:
        hints = typing.get_type_hints(cls.__init__)
    except Exception:  # a plugin's annotations that do not resolve: nothing to set
        return {}
    out = {}
    for name, param in inspect.signature(cls.__init__).parameters.items():
        if param.kind is not param.KEYWORD_ONLY or name not in hints:
            continue
        kind = hints[name]
        if kind in (bool, int, float, str) or typing.get_origin(kind) is Literal:
            out[name] = kind
    return out


def emulator_settings(cls: type[Emulator], provider: str, texts: Sequence[str]) -> dict[str, Any]:
    """``NAME=VALUE`` texts as keyword arguments of ``cls`` (``settable``), each VALUE read
    as its argument's type; a usage error names what can be set."""
    known = settable(cls)
    out: dict[str, Any] = {}
    for text in texts:
        name, sep, raw = text.partition("=")
        name = name.strip().replace("-", "_")
        if not sep or name not in known:
            names = ", ".join(sorted(known)) or "nothing"
            hint = did_you_mean(name, known) if sep else ""
            raise UsageError(
                f'--set {text!r}: the {provider} emulator has no setting "{name}"{hint}'
                f" (NAME=VALUE; it takes {names})"
            )
        out[name] = _setting(known[name], raw.strip(), f"--set {name}")
    return out


def _setting(kind: Any, raw: str, where: str) -> Any:
    if typing.get_origin(kind) is Literal:
        for choice in typing.get_args(kind):
            if str(choice) == raw:
                return choice
        choices = ", ".join(str(c) for c in typing.get_args(kind))
        raise UsageError(f"{where}: {raw!r} is not one of {choices}")
    if kind is bool:
        if raw.lower() in _TRUE + _FALSE:
            return raw.lower() in _TRUE
        raise UsageError(f"{where}: {raw!r} is not true or false")
    if kind in (int, float):
        try:
            number = kind(raw)
        except ValueError:
            raise UsageError(f"{where}: {raw!r} is not a number") from None
        if not math.isfinite(number):
            raise UsageError(f"{where}: {raw!r} is not a finite number")
        if number < 0:  # intervals, timeouts, limits
            raise UsageError(f"{where}: {raw!r} is not a number from 0")
        return number
    return raw


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def printer(stream: TextIO = sys.stdout) -> Printer:
    def say(text: str) -> None:
        print(text, file=stream, flush=True)

    return say
