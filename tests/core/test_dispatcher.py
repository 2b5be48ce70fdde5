from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from support import PushServer, Receiver, running, wait_for, write_config
from tocsin import RetryPolicy
from tocsin.dispatcher import backoff_delay, next_step


def test_backoff_doubles_with_jitter_up_to_the_cap() -> None:
    policy = RetryPolicy(backoff=1, max_backoff=30)
    for attempts, ceiling in [(1, 1), (2, 2), (3, 4), (5, 16), (6, 30), (40, 30)]:
        for _ in range(50):
            assert ceiling / 2 <= backoff_delay(policy, attempts) <= ceiling


def test_budget_ends_in_dead_letter() -> None:
    policy = RetryPolicy(attempts=3, backoff=1, max_backoff=10, max_age=100)
    assert next_step(policy, 1, created_at=0, now=10, retry_after=None) is not None
    assert next_step(policy, 3, created_at=0, now=10, retry_after=None) is None  # attempts used up
    assert next_step(policy, 1, created_at=0, now=99.9, retry_after=None) is None  # beyond max_age


def test_retry_after_is_honoured_above_max_backoff_within_max_age() -> None:
    policy = RetryPolicy(attempts=10, backoff=1, max_backoff=5, max_age=3600)
    assert next_step(policy, 1, created_at=0, now=0, retry_after=120) == 120
    assert next_step(policy, 1, created_at=0, now=0, retry_after=7200) is None


@pytest.fixture(autouse=True)
def _env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PUSH_TOKEN", "tok-abcdef")


async def test_hanging_action_is_bounded_and_does_not_delay_another(tmp_path: Path) -> None:
    hang = asyncio.Event()
    async with (
        PushServer(token="tok-abcdef") as server,
        Receiver(hang=hang) as stuck,
        Receiver() as fine,
    ):
        text = f"""
[daemon]
state_dir = "state"
drain_timeout = "100ms"
[sources.feed]
plugin = "testpush"
url = "{server.url}"
token = {{ env = "PUSH_TOKEN" }}
[actions.stuck]
plugin = "webhook"
url = "{stuck.url()}"
timeout = "30s"
concurrency = 3
[actions.fine]
plugin = "webhook"
url = "{fine.url()}"
[[rules]]
name = "each"
type = "transfer"
group_by = ["n"]
"""
        path = write_config(tmp_path / "t.toml", text)
        async with running(path) as daemon:
            await wait_for(lambda: server.clients)
            for n in range(50):
                await server.push({"id": f"e{n}", "type": "transfer", "data": {"n": n}})
            await wait_for(
                lambda: len(fine.ok()) == 50, what="the healthy action to get everything"
            )
            # the hanging action holds exactly its concurrency in flight; the rest waits on disk
            await wait_for(
                lambda: daemon.dispatcher.inflight == 3, what="only the stuck deliveries in flight"
            )
            assert stuck.requests == []
            hang.set()
            await wait_for(lambda: len(stuck.ok()) == 50, what="the stuck action to catch up")
