"""A harness for fault tests: a real ``tocsin run`` subprocess, an EOSPark emulator and
webhook receivers in the test's event loop, and a systemd notify socket.

The daemon runs as ``python -m tocsin.cli run -c CONFIG`` with only the plugins it needs
(``TOCSIN_LOAD_PLUGINS=builtin,eospark``: a subprocess loads installed plugins, and
another engineer's half-written one must not break these tests). Its stderr goes to a
file the test reads. Every wait polls a condition with a deadline; nothing sleeps to wait.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
from aiohttp import web
from tocsin_eospark import EOSParkEmulator
from tocsin_eospark.emulator import transaction, transfer

KEY = "eospark-fault-key-7Qw3"
ME = "myaccount"
HEARTBEAT = 0.2  # the emulator's heartbeat (10 s at EOSPark): with stale_after = "1s"
PLUGINS = "builtin,eospark"


async def wait_for(
    condition: Callable[[], Any], within: float = 15.0, what: str = "condition"
) -> Any:
    """Poll ``condition`` until it is truthy; fail after ``within`` seconds."""
    deadline = time.monotonic() + within
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within}s waiting for {what}")
        await anyio.sleep(0.01)


# -- the systemd side of the notify protocol -------------------------------------------


class NotifySocket:
    """An ``AF_UNIX`` datagram socket as systemd binds it: a path, or ``@name`` (abstract)."""

    def __init__(self, address: str | None = None) -> None:
        self.address = address or f"@tocsin-test-{uuid.uuid4().hex}"
        bind = "\0" + self.address[1:] if self.address.startswith("@") else self.address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(bind)
        self.sock.setblocking(False)
        self.messages: list[dict[str, str]] = []
        self.times: list[float] = []  # monotonic receipt time of each message

    def start_reading(self) -> None:
        """Read each datagram as it comes (a socket left unread fills up after a few)."""
        asyncio.get_running_loop().add_reader(self.sock.fileno(), self.poll)

    def close(self) -> None:
        with contextlib.suppress(RuntimeError):  # no loop, or never reading
            asyncio.get_running_loop().remove_reader(self.sock.fileno())
        self.sock.close()
        if not self.address.startswith("@"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.address)

    def poll(self) -> list[dict[str, str]]:
        """Read every datagram waiting; returns all messages so far."""
        while True:
            try:
                data = self.sock.recv(4096)
            except BlockingIOError:
                return self.messages
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if line)
            self.messages.append(fields)
            self.times.append(time.monotonic())

    def count(self, name: str, value: str = "1") -> int:
        return sum(1 for m in self.poll() if m.get(name) == value)

    def statuses(self) -> list[str]:
        return [m["STATUS"] for m in self.poll() if "STATUS" in m]

    async def wait(self, name: str, value: str = "1", n: int = 1, within: float = 20.0) -> None:
        await wait_for(lambda: self.count(name, value) >= n, within, f"{name}={value} (x{n})")

    async def wait_status(self, contains: str, within: float = 15.0) -> str:
        found: str = await wait_for(
            lambda: next((s for s in reversed(self.statuses()) if contains in s), ""),
            within,
            f"a STATUS= line with {contains!r}",
        )
        return found


# -- the daemon ------------------------------------------------------------------------


def daemon_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NOTIFY_", "WATCHDOG_"))}
    env.update(TOCSIN_LOAD_PLUGINS=PLUGINS, EOSPARK_KEY=KEY, PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


class DaemonProcess:
    """``tocsin run`` on one config, started (and restarted) as a subprocess."""

    def __init__(
        self,
        config: Path,
        notify: NotifySocket | None = None,
        *,
        log_level: str = "info",
        env: dict[str, str] | None = None,
        watchdog_usec: int | None = None,
    ) -> None:
        self.config = config
        self.notify = notify
        self.log_level = log_level
        self.watchdog_usec = watchdog_usec
        self.env = env or daemon_env()
        self.log_path = config.with_suffix(".log")
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> None:
        assert self.proc is None or self.proc.poll() is not None, "already running"
        env = dict(self.env)
        if self.notify is not None:
            env["NOTIFY_SOCKET"] = self.notify.address
        if self.watchdog_usec is not None:
            # Also makes STATUS= come at every ping (half of it), not every 5 s.
            env["WATCHDOG_USEC"] = str(self.watchdog_usec)
        self.starts += 1
        with self.log_path.open("ab") as log:
            log.write(f"--- start {self.starts}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "tocsin.cli",
                    "run",
                    "-c",
                    str(self.config),
                    "--log-level",
                    self.log_level,
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=self.config.parent,
            )

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, signum: int) -> None:
        assert self.alive(), "the daemon is not running:\n" + self.output()[-3000:]
        os.kill(self.pid, signum)

    async def kill9(self) -> None:
        self.signal(signal.SIGKILL)
        await self.wait_exit(10)

    async def wait_exit(self, within: float) -> int:
        """Wait for the daemon to exit; its exit status (negative: killed by that signal)."""
        proc = self.proc
        assert proc is not None
        await wait_for(lambda: proc.poll() is not None, within, "the daemon to exit")
        return proc.returncode

    def output(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def run_output(self) -> str:
        """The output of the latest start only."""
        return self.output().rsplit(f"--- start {self.starts}\n", 1)[-1]

    async def wait_log(self, text: str, within: float = 15.0) -> None:
        await wait_for(lambda: text in self.run_output(), within, f"log line {text!r}")

    def rss_kib(self) -> int:
        """Resident memory of the daemon (``VmRSS`` in /proc), in KiB."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise AssertionError("no VmRSS")

    def stop_now(self) -> None:
        """Teardown: kill whatever still runs."""
        if self.alive():
            assert self.proc is not None
            self.proc.kill()
            self.proc.wait(10)


# -- webhook receivers -----------------------------------------------------------------


@dataclass
class Hit:
    """One request a ``Hook`` got, and what it answered."""

    key: str
    event_id: str
    body: dict[str, Any]
    status: int = 0  # 0 while held
    at: float = field(default_factory=time.monotonic)
    headers: dict[str, str] = field(default_factory=dict)


class Hook:
    """A webhook receiver on 127.0.0.1 port 0 whose answers the test steers.

    ``mode`` is ``"ok"`` (200), an HTTP status to answer, or ``"hang"`` (hold every request
    until ``release()``); ``before_answer`` (async, gets the ``Hit``) runs before answering.
    """

    def __init__(self) -> None:
        self.hits: list[Hit] = []
        self.mode: str | int = "ok"
        self.retry_after = "1"
        self.before_answer: Callable[[Hit], Awaitable[None]] | None = None
        self.port = 0
        self._release = anyio.Event()
        self._held_status = 200
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def release(self, status: int = 200) -> None:
        """Answer every held request with ``status`` (the daemon may be gone: it never sees
        it), and hold no more."""
        self._held_status = status
        self.mode = "ok"
        self._release.set()

    def hold(self) -> None:
        self._release = anyio.Event()
        self.mode = "hang"

    def ok_keys(self) -> list[str]:
        """Keys answered 2xx, in order (a repeat shows twice)."""
        return [h.key for h in self.hits if 200 <= h.status < 300]

    def held(self) -> list[Hit]:
        return [h for h in self.hits if h.status == 0]

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.json()
        hit = Hit(request.headers.get("Idempotency-Key", ""), body["event"]["id"], body)
        hit.headers = dict(request.headers)
        self.hits.append(hit)
        status = 200 if self.mode in ("ok", "hang") else int(self.mode)
        if self.mode == "hang":
            await self._release.wait()
            status = self._held_status
        if self.before_answer is not None:
            await self.before_answer(hit)
        hit.status = status
        headers = {"Retry-After": self.retry_after} if status == 429 else {}
        return web.Response(status=status, text="ok" if status < 300 else "no", headers=headers)

    async def __aenter__(self) -> Hook:
        app = web.Application()
        app.router.add_post("/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, shutdown_timeout=0.1)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        server = site._server
        assert server is not None and server.sockets  # type: ignore[attr-defined]
        self.port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._release.set()
        assert self._runner is not None
        await self._runner.cleanup()


# -- the state database, read by the test ----------------------------------------------


class StateDB:
    """The daemon's SQLite file, opened by the test (reads, and a lock it can take)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._conn: sqlite3.Connection | None = None

    @property
    def conn(self) -> sqlite3.Connection:
        if self._conn is None:
            self._conn = sqlite3.connect(self.path, isolation_level=None, timeout=10)
        return self._conn

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def alert_ids(self) -> set[str]:
        return {r[0] for r in self.conn.execute("SELECT id FROM alerts")}

    def states(self) -> dict[str, int]:
        """Delivery state (0 pending, 1 done, 2 dead) per alert id, for one action."""
        return dict(self.conn.execute("SELECT alert_id, state FROM outbox"))

    def count(self, state: int) -> int:
        (n,) = self.conn.execute("SELECT COUNT(*) FROM outbox WHERE state = ?", (state,)).fetchone()
        return int(n)

    def integrity(self) -> str:
        (result,) = self.conn.execute("PRAGMA integrity_check").fetchone()
        return str(result)

    def lock(self) -> None:
        """Take the write lock (the daemon can then commit nothing) until ``unlock()``."""
        self.conn.execute("BEGIN IMMEDIATE")

    def unlock(self) -> None:
        self.conn.execute("ROLLBACK")


# -- configs and traffic ---------------------------------------------------------------


def config_text(
    emulator: EOSParkEmulator,
    hooks: dict[str, Hook],
    *,
    drain: str = "5s",
    stale_after: str = "30s",
    retry: str = 'attempts = 1000, backoff = "50ms", max_backoff = "200ms"',
    timeout: str = "3s",
    rules: str = "",
    concurrency: int = 4,
) -> str:
    """A config: source ``eos`` on the emulator, a webhook action per hook, rule ``incoming``
    (every transfer to ``myaccount``, one group per transaction) to every action."""
    actions = "".join(
        f"""
[actions.{name}]
plugin = "webhook"
url = "{hook.url}"
timeout = "{timeout}"
concurrency = {concurrency}
retry = {{ {retry} }}
"""
        for name, hook in hooks.items()
    )
    default_rules = f"""
[[rules]]
name = "incoming"
source = "eos"
type = "action"
match = {{ contract = "eosio.token", action = "transfer", "args.to" = "{ME}" }}
actions = {list(hooks)!r}
group_by = ["trx_id"]
title = "{{{{ args.quantity }}}} from {{{{ args.from }}}}"
""".replace("'", '"')
    return f"""
[daemon]
state_dir = "state"
drain_timeout = "{drain}"

[sources.eos]
plugin = "eospark"
url = "{emulator.url}"
api_key = {{ env = "EOSPARK_KEY" }}
stale_after = "{stale_after}"
max_backoff = "1s"
subscriptions = [{{ account = "{ME}", contract = "eosio.token", action = "transfer" }}]
{actions}
{rules or default_rules}
"""


class Traffic:
    """Transfers to ``myaccount`` pushed through the emulator, each a distinct transaction."""

    def __init__(self, emulator: EOSParkEmulator, prefix: str = "t") -> None:
        self.emulator = emulator
        self.prefix = prefix
        self.n = 0
        self.sent: list[str] = []  # trx ids a subscribed client got

    async def push(self, frm: str = "alice", memo: str = "", to: str = ME) -> str:
        self.n += 1
        trx_id = f"{self.prefix}{self.n:06d}".ljust(64, "0")
        trx = transaction([transfer(frm, to, f"{self.n}.0000 EOS", memo)], trx_id=trx_id)
        if await self.emulator.push_transaction(trx):
            self.sent.append(trx_id)
        return trx_id


@asynccontextmanager
async def emulator_running(**options: Any) -> AsyncIterator[EOSParkEmulator]:
    async with EOSParkEmulator(api_keys=[KEY], heartbeat_interval=HEARTBEAT, **options) as emu:
        yield emu
