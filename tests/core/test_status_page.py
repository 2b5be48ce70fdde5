"""The status page in a real browser: ``tocsin run`` (a subprocess) with an EOSPark source on
the bundled emulator and a webhook to a local receiver, its page loaded in headless Chromium
driven over the DevTools protocol. The page refreshes itself; the test never reloads it.

Chromium is Debian's package (``make chromium`` installs it; ``make test`` does first).
A screenshot of the page is saved under ``tmp_path`` and, when ``$TOCSIN_ARTIFACTS`` is set,
copied there.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import pytest
import websockets
from prometheus_client.parser import text_string_to_metric_families
from tocsin_eospark import EOSParkEmulator

from faults.harness import (
    KEY,
    DaemonProcess,
    Hook,
    Traffic,
    config_text,
    emulator_running,
    wait_for,
)

CHROMIUM = "/usr/bin/chromium"
PHONE = {"width": 390, "height": 844, "deviceScaleFactor": 2, "mobile": True}

pytestmark = pytest.mark.skipif(
    not os.access(CHROMIUM, os.X_OK),
    reason=f"{CHROMIUM} is missing: `make chromium` installs Debian's chromium package",
)


class DevToolsError(Exception):
    """Chromium answered a command with an error (e.g. a page navigating away)."""


class Chromium:
    """Headless Chromium with one page (tab), driven over the DevTools protocol."""

    def __init__(self, profile: Path) -> None:
        self.profile = profile
        self.log = profile.with_suffix(".log")
        self.proc: subprocess.Popen[bytes] | None = None
        self.ws: websockets.ClientConnection | None = None
        self.session = ""
        self._id = 0

    def _launch(self) -> None:
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                [
                    CHROMIUM,
                    "--headless",
                    "--no-sandbox",  # root in a container
                    "--disable-gpu",
                    "--disable-dev-shm-usage",
                    "--no-first-run",
                    "--remote-debugging-address=127.0.0.1",
                    "--remote-debugging-port=0",
                    f"--user-data-dir={self.profile}",
                    "about:blank",
                ],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=log,
                start_new_session=True,  # its helper processes end with it (see _end)
            )

    def _end(self) -> None:
        if self.proc is not None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)

    async def __aenter__(self) -> Chromium:
        self._launch()
        found = await wait_for(
            lambda: re.search(r"DevTools listening on (ws://\S+)", self.log.read_text("utf-8")),
            within=60,
            what="Chromium's DevTools endpoint",
        )
        assert found.group(1).startswith("ws://127.0.0.1:")
        self.ws = await websockets.connect(found.group(1), max_size=None)
        target = await self.call("Target.createTarget", url="about:blank")
        attached = await self.call(
            "Target.attachToTarget", targetId=target["targetId"], flatten=True
        )
        self.session = attached["sessionId"]
        await self.call("Emulation.setDeviceMetricsOverride", **PHONE)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.ws is not None:
            await self.ws.close()
        self._end()

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        """Send one command (to the page once attached) and return its result; events that
        arrive meanwhile are not needed and are dropped."""
        assert self.ws is not None
        self._id += 1
        message: dict[str, Any] = {"id": self._id, "method": method, "params": params}
        if self.session:
            message["sessionId"] = self.session
        await self.ws.send(json.dumps(message))
        with anyio.fail_after(30):
            while True:
                reply = json.loads(await self.ws.recv())
                if reply.get("id") == self._id:
                    if "error" in reply:
                        raise DevToolsError(f"{method}: {reply['error']}")
                    result: dict[str, Any] = reply["result"]
                    return result

    async def navigate(self, url: str) -> None:
        await self.call("Page.navigate", url=url)

    async def evaluate(self, expression: str) -> Any:
        """The value of ``expression`` in the page; None while it is (re)loading."""
        try:
            result = await self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        except DevToolsError:
            return None  # the context went away with a refresh
        if "exceptionDetails" in result:
            return None
        return result["result"].get("value")

    async def wait_until(
        self, expression: str, check: Callable[[Any], bool], within: float, what: str
    ) -> Any:
        """Evaluate ``expression`` until ``check(value)``; fail after ``within`` seconds."""
        deadline = time.monotonic() + within
        last = None
        while True:
            last = await self.evaluate(expression)
            if last is not None and check(last):
                return last
            assert time.monotonic() < deadline, f"timed out waiting for {what}; last: {last!r}"
            await anyio.sleep(0.2)

    async def screenshot(self) -> bytes:
        """The whole page as a PNG."""
        height = await self.evaluate("document.documentElement.scrollHeight") or PHONE["height"]
        shot = await self.call(
            "Page.captureScreenshot",
            format="png",
            captureBeyondViewport=True,
            clip={"x": 0, "y": 0, "width": PHONE["width"], "height": height, "scale": 1},
        )
        return base64.b64decode(shot["data"])


SOURCE_STATE = "document.querySelector('tr[data-source=\"eos\"]')?.dataset.state ?? null"
ALERT_ROWS = "Array.from(document.querySelectorAll('#alerts tbody tr'), r => r.innerText)"
FITS_THE_PHONE = "document.documentElement.scrollWidth <= window.innerWidth"


def metrics(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def save(png: bytes, path: Path) -> None:
    """Keep the screenshot: at ``path``, and in ``$TOCSIN_ARTIFACTS`` when that is set."""
    path.write_bytes(png)
    if os.environ.get("TOCSIN_ARTIFACTS"):
        artifacts = Path(os.environ["TOCSIN_ARTIFACTS"])
        artifacts.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, artifacts / path.name)


@pytest.fixture
async def emulator() -> AsyncIterator[EOSParkEmulator]:
    async with emulator_running() as emu:
        yield emu


@pytest.mark.timeout(240)
async def test_status_page_follows_the_source_and_shows_alerts(
    tmp_path: Path, emulator: EOSParkEmulator
) -> None:
    async with Hook() as hook, aiohttp.ClientSession() as http:
        text = config_text(emulator, {"hook": hook}).replace(
            "[daemon]\n", '[daemon]\nhttp = "127.0.0.1:0"\n', 1
        )
        config = tmp_path / "tocsin.toml"
        config.write_text(text, encoding="utf-8")
        tocsin = DaemonProcess(config)
        tocsin.start()
        try:
            served = await wait_for(
                lambda: re.search(
                    r"http: serving .* on (http://127\.0\.0\.1:\d+)", tocsin.output()
                ),
                what="the http endpoint's address in the log",
            )
            base = served.group(1)
            await wait_for(lambda: emulator.subscribed, what="the subscription")

            async def get(path: str) -> tuple[int, str]:
                async with http.get(base + path) as response:
                    return response.status, await response.text()

            async def scrape() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
                status, body = await get("/metrics")
                assert status == 200
                return metrics(body)

            assert await get("/healthz") == (200, "ok\n")
            await wait_for(lambda: "tocsin running" in tocsin.output(), what="READY")
            assert await get("/readyz") == (200, "ready\n")

            traffic = Traffic(emulator)
            await traffic.push(frm="alice")
            await wait_for(lambda: hook.ok_keys(), what="the first alert's delivery")
            before = await scrape()
            events = ("tocsin_events_total", (("source", "eos"), ("type", "action")))
            assert before[events] == 1

            async with Chromium(tmp_path / "chromium") as browser:
                await browser.navigate(base + "/?refresh=1")
                await browser.wait_until(SOURCE_STATE, lambda s: s == "up", 30, "the source up")
                assert await browser.evaluate(FITS_THE_PHONE), "the page is wider than a phone"

                # The provider refuses the key and drops the connection: the source is down
                # until the key is back (it retries every max_backoff, 1 s here).
                emulator.api_keys.discard(KEY)
                await emulator.drop_connections()
                await browser.wait_until(SOURCE_STATE, lambda s: s == "down", 30, "source down")

                emulator.api_keys.add(KEY)
                await wait_for(lambda: emulator.subscribed, within=30, what="the resubscription")
                await traffic.push(frm="carol", memo="for the page")
                rows = await browser.wait_until(
                    ALERT_ROWS,
                    lambda rows: any("from carol" in row for row in rows),
                    30,
                    "the alert in the last-alerts table",
                )
                assert len(rows) == 2
                await browser.wait_until(SOURCE_STATE, lambda s: s == "up", 30, "the source up")
                png = await browser.screenshot()

            save(png, tmp_path / "status-page.png")
            assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 1000

            await wait_for(lambda: len(hook.ok_keys()) == 2, what="the second delivery")
            after = await scrape()
            assert after[events] == 2
            hooked = ("tocsin_deliveries_total", (("action", "hook"), ("outcome", "delivered")))
            # Counted when the delivery is recorded, a moment after the receiver answered.
            deadline = time.monotonic() + 15
            while after[hooked] < 2 and time.monotonic() < deadline:
                await anyio.sleep(0.1)
                after = await scrape()
            assert after[hooked] == 2
            assert after[("tocsin_rule_matches_total", (("rule", "incoming"),))] == 2
            assert after[("tocsin_rule_alerts_total", (("rule", "incoming"),))] == 2
            assert after[("tocsin_reconnects_total", (("source", "eos"),))] >= 1
            assert after[("tocsin_source_up", (("source", "eos"),))] == 1

            tocsin.signal(signal.SIGTERM)
            assert await tocsin.wait_exit(30) == 0
        finally:
            tocsin.stop_now()
    assert "Traceback" not in tocsin.output()
