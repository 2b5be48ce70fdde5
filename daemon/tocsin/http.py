"""The ``[daemon] http`` endpoint: ``/healthz``, ``/readyz``, ``/metrics`` and the status page.

An aiohttp application served from a task in the daemon's task group (``serve``), listening
before READY and closed when the daemon stops. Handlers stay cheap and bounded: counters
are read as they are (metrics.py); what needs the state database goes to the store's
writer thread with a deadline, and the page's lists carry a LIMIT. The page is rendered on
the server by an autoescaping Jinja environment (status.html); it refreshes itself with a
``<meta http-equiv="refresh">`` and runs no script.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import resources
from typing import TYPE_CHECKING, Any

import anyio
import jinja2
import orjson
from aiohttp import web
from anyio.abc import TaskStatus
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from . import __version__
from .errors import ServeError
from .fields import secret_registry
from .metrics import OUTCOMES, LoopLag, OutboxProbe, answer, make_registry
from .store import DEAD, Delivery, RecentAlert, Store

if TYPE_CHECKING:
    from .daemon import Daemon

log = logging.getLogger(__name__)

RECENT_ALERTS = 50
DEAD_SHOWN = 50
PAGE_QUERY_WITHIN = 2.0
"""How long the page waits for the state database before it shows what it has without."""
REFRESH = 5
HEADERS = {
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'unsafe-inline'; frame-ancestors 'none'; form-action 'none'"
    ),
}


def _ago(moment: float | None, now: float | None = None) -> str:
    """``"12s ago"``, ``"3m ago"``...; ``"never"`` for None."""
    if moment is None:
        return "never"
    seconds = max(0, int((time.time() if now is None else now) - moment))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit} ago"
    return f"{seconds}s ago"


def _clock(moment: float | None) -> str:
    """UTC wall time, ``"2026-11-22 10:00:03Z"``; empty for None."""
    if moment is None:
        return ""
    return datetime.fromtimestamp(moment, UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _parse_iso(text: str) -> float | None:
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)
    env.filters["ago"] = _ago
    env.filters["clock"] = _clock
    env.filters["scrub"] = secret_registry.scrub
    return env


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A dead-lettered delivery as the page shows it."""

    seq: int
    action: str
    label: str
    rule: str
    title: str
    attempts: int
    created_at: float
    error: str

    @classmethod
    def of(cls, delivery: Delivery) -> DeadLetter:
        try:
            payload = orjson.loads(delivery.payload)
        except orjson.JSONDecodeError:
            payload = {}
        return cls(
            delivery.seq,
            delivery.action,
            delivery.label,
            str(payload.get("rule", "")),
            str(payload.get("title", "")),
            delivery.attempts,
            delivery.created_at,
            delivery.last_error,
        )


class HTTPEndpoint:
    """Serves one daemon's endpoint on ``host:port``; ``url`` is set once listening."""

    def __init__(self, daemon: Daemon, host: str, port: int) -> None:
        self.daemon = daemon
        self.host = host
        self.port = port
        self.url = ""
        self.lag = LoopLag()
        self.outbox = OutboxProbe(daemon)
        self.registry = make_registry(daemon, self.lag)
        self.started_at = time.time()
        self._page = _environment().from_string(
            resources.files("tocsin").joinpath("status.html").read_text(encoding="utf-8")
        )

    def application(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/", self.status_page)
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/readyz", self.readyz)
        app.router.add_get("/metrics", self.metrics)
        return app

    async def serve(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Listen, say where, serve until cancelled, then close every connection."""
        runner = web.AppRunner(self.application(), access_log=None, shutdown_timeout=1.0)
        await runner.setup()
        try:
            try:
                await web.TCPSite(runner, self.host, self.port).start()
            except OSError as err:
                reason = os.strerror(err.errno) if err.errno and err.errno > 0 else err.strerror
                raise ServeError(
                    f"cannot serve [daemon] http on {self.host}:{self.port}:"
                    f" {(reason or str(err)).lower()}"
                ) from err
            host, port = runner.addresses[0][:2]
            self.url = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
            log.info(
                "http: serving /metrics, /healthz, /readyz and the status page on %s", self.url
            )
            async with anyio.create_task_group() as tg:
                tg.start_soon(self.lag.run)
                task_status.started()
                await anyio.sleep_forever()
        finally:
            with anyio.CancelScope(shield=True):
                await runner.cleanup()

    # -- probes ----------------------------------------------------------------------------

    async def readiness(self) -> str:
        """Why the daemon is not ready, ``""`` when it is."""
        daemon = self.daemon
        if daemon.stopping:
            return "stopping"
        if not daemon.ready.is_set():
            return "starting"
        if daemon.paused:
            return secret_registry.scrub(f"intake paused: {daemon.paused}")
        await self.outbox.refresh()
        if self.outbox.error:
            return f"state database unavailable: {self.outbox.error}"
        return ""

    async def healthz(self, request: web.Request) -> web.Response:
        return web.Response(text="ok\n", headers=HEADERS)

    async def readyz(self, request: web.Request) -> web.Response:
        reason = await self.readiness()
        if reason:
            return web.Response(status=503, text=reason + "\n", headers=HEADERS)
        return web.Response(text="ready\n", headers=HEADERS)

    async def metrics(self, request: web.Request) -> web.Response:
        await self.outbox.refresh()
        return web.Response(
            body=generate_latest(self.registry),
            headers={**HEADERS, "Content-Type": CONTENT_TYPE_LATEST},
        )

    # -- the status page ---------------------------------------------------------------

    async def status_page(self, request: web.Request) -> web.Response:
        try:
            refresh = min(max(int(request.query.get("refresh", REFRESH)), 1), 3600)
        except ValueError:
            refresh = REFRESH
        view = await self.view()
        html = self._page.render(refresh=refresh, **view)
        return web.Response(text=html, content_type="text/html", headers=HEADERS)

    async def view(self) -> dict[str, Any]:
        """What the page shows, gathered now."""
        daemon = self.daemon
        readiness = await self.readiness()
        recent, dead, problem = await self._from_store()
        stats = daemon.engine.stats
        sources = [
            {
                "name": name,
                "plugin": runner.provider,
                "state": runner.state,
                "reason": runner.down_reason if runner.state != "up" else "",
                "since": _parse_iso(runner.since),
                "last_event": runner.last_event,
                "events": runner.events,
                "reconnects": runner.reconnects,
                "rejected": sum(runner.rejected.values()),
            }
            for name, runner in sorted(daemon.sources.items())
        ]
        rules = [
            {
                "name": name,
                "kind": rule.config.kind,
                "evaluations": stats.evaluated[name],
                "matches": stats.per_rule[name],
                "alerts": stats.alerts_per_rule[name],
                "last_fired": stats.last_fired.get(name),
                "note": daemon.engine.suppressed.get(name, ""),
            }
            for name, rule in daemon.engine.rules.items()
        ]
        outcomes = daemon.dispatcher.outcomes
        actions = [
            {
                "name": name,
                "plugin": action.config.plugin,
                **{shown: outcomes[(name, key)] for key, shown in OUTCOMES.items()},
            }
            for name, action in sorted(daemon.actions.items())
        ]
        outbox = None
        if daemon.outbox is not None:
            pending, dead_count, oldest = daemon.outbox
            outbox = {"pending": pending, "dead": dead_count, "oldest": oldest}
        return {
            "version": __version__,
            "config": str(daemon.config_path),
            "now": time.time(),
            "started": self.started_at,
            "readiness": readiness,
            "status_line": daemon.status_line(),
            "lag": self.lag,
            "sources": sources,
            "rules": rules,
            "actions": actions,
            "outbox": outbox,
            "outbox_error": self.outbox.error,
            "recent": recent,
            "dead": dead,
            "store_problem": problem,
        }

    async def _from_store(self) -> tuple[list[RecentAlert], list[DeadLetter], str]:
        """The latest alerts and dead letters, or why they cannot be shown now."""
        store = self.daemon.store
        recent = answer(store.submit(Store.recent_alerts, RECENT_ALERTS))
        dead = answer(store.submit(Store.list_deliveries, [DEAD], DEAD_SHOWN))
        both: list[asyncio.Future[Any]] = [recent, dead]
        with anyio.move_on_after(PAGE_QUERY_WITHIN):
            await asyncio.wait(both)
        if not (recent.done() and dead.done()):
            recent.cancel()  # the writer skips what nobody waits for any more
            dead.cancel()
            return [], [], f"the state database did not answer within {PAGE_QUERY_WITHIN:g}s"
        for future in (recent, dead):
            error = future.exception()
            if error is not None:
                return [], [], secret_registry.scrub(str(error))
        return recent.result(), [DeadLetter.of(d) for d in dead.result()], ""
