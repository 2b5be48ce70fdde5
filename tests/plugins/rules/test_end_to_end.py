"""Through the real daemon: a threshold rule sends ``firing`` to a webhook, then, on
time and with no further event, ``resolved``."""

from __future__ import annotations

from pathlib import Path

import pytest
import tocsin_rules

from support import PushServer, Receiver, make_registry, running, wait_for, write_config

TOKEN = "s3cret-token"


@pytest.fixture(autouse=True)
def _env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PUSH_TOKEN", TOKEN)


def config_text(server: PushServer, hook_url: str) -> str:
    return f"""
[daemon]
state_dir = "state"
drain_timeout = "2s"

[sources.feed]
plugin = "testpush"
url = "{server.url}"
token = {{ env = "PUSH_TOKEN" }}

[actions.hook]
plugin = "webhook"
url = "{hook_url}"
timeout = "2s"
retry = {{ attempts = 20, backoff = "20ms", max_backoff = "100ms" }}

[[rules]]
name = "burst out"
kind = "threshold"
source = "feed"
type = "transfer"
match = {{ "args.from" = "me" }}
group_by = ["args.to"]
window = "2s"
count = 2
actions = ["hook"]
title = "2 transfers to {{{{ args.to }}}} within 2s"
"""


def transfer(id: str, to: str = "bob") -> dict[str, object]:
    return {"id": id, "type": "transfer", "data": {"args": {"from": "me", "to": to}}}


async def test_threshold_fires_then_resolves_on_time_through_the_webhook(tmp_path: Path) -> None:
    async with PushServer(token=TOKEN) as server, Receiver() as receiver:
        path = write_config(tmp_path / "t.toml", config_text(server, receiver.url()))
        async with running(path, make_registry(tocsin_rules)):
            await wait_for(lambda: server.clients, what="the source to connect")
            await server.push(transfer("t1"))
            await server.push(transfer("x1", to="carol"))  # another group: 1 of 2
            await server.push(transfer("t2"))
            await wait_for(lambda: receiver.ok(), what="the firing alert")
            await wait_for(lambda: len(receiver.ok()) == 2, within=6, what="the resolved alert")
        firing, resolved = (r.json() for r in receiver.ok())
    assert (firing["status"], resolved["status"]) == ("firing", "resolved")
    assert firing["title"] == "2 transfers to bob within 2s"
    assert resolved["title"] == "[resolved] 2 transfers to bob within 2s"
    assert firing["event"]["id"] == resolved["event"]["id"] == "t2"  # the crossing event
    assert firing["id"] != resolved["id"]
    assert [r.headers["Idempotency-Key"] for r in receiver.ok()] == [firing["id"], resolved["id"]]
    assert len(receiver.requests) == 2  # nothing from the other group


async def test_a_retracted_crossing_is_retracted_once_and_carried_no_more(tmp_path: Path) -> None:
    async with PushServer(token=TOKEN) as server, Receiver() as receiver:
        text = config_text(server, receiver.url()).replace(
            'window = "2s"', 'window = "1h"\nrealert = "1s"'
        )
        path = write_config(tmp_path / "t.toml", text)

        def sent() -> list[tuple[str, str, bool]]:
            return [
                (b["status"], b["event"]["id"], b["event"]["removed"])
                for b in (r.json() for r in receiver.ok())
            ]

        async with running(path, make_registry(tocsin_rules)):
            await wait_for(lambda: server.clients, what="the source to connect")
            await server.push(transfer("t1"))
            await server.push(transfer("t2"))
            await wait_for(lambda: len(sent()) >= 3, within=10, what="a firing and 2 repeats")
            await server.push({**transfer("t2"), "removed": True})  # the chain took it back
            await wait_for(lambda: ("retracted", "t2", True) in sent(), what="the retraction")
            await server.push(transfer("t3"))  # the bound is reached again: a new firing
            await wait_for(
                lambda: sent().count(("firing", "t3", False)) >= 2, within=10, what="t3 repeating"
            )
    alerts = sent()
    cut = alerts.index(("retracted", "t2", True))
    assert set(alerts[:cut]) == {("firing", "t2", False)}  # the firing and its repeats
    assert alerts.count(("retracted", "t2", True)) == 1  # one retraction for them all
    assert set(alerts[cut + 1 :]) == {("firing", "t3", False)}  # t2 is carried no more


async def test_a_threshold_counts_no_fact_the_provider_took_back(tmp_path: Path) -> None:
    # The rules audit: a fact taken back was still counted (A, B, B removed, C fired "3"),
    # and one taken back and pushed again counted twice (D, E, E removed, E fired "3").
    # A match rule on every event is the control: its alert on END comes after the rest.
    async with PushServer(token=TOKEN) as server, Receiver() as receiver:
        text = config_text(server, receiver.url()).replace(
            'window = "2s"\ncount = 2', 'window = "1h"\ncount = 3'
        )
        text += '\n[[rules]]\nname = "each"\nsource = "feed"\nmatch = { "args.to" = "end" }\nactions = ["hook"]\n'
        path = write_config(tmp_path / "t.toml", text)

        def sent() -> list[tuple[str, str, str]]:
            return [(b["rule"], b["status"], b["event"]["id"]) for b in receiver_json(receiver)]

        async with running(path, make_registry(tocsin_rules)):
            await wait_for(lambda: server.clients, what="the source to connect")
            for frame in [
                transfer("A"),
                transfer("B"),
                {**transfer("B"), "removed": True},
                transfer("C"),
                transfer("D", to="carol"),
                transfer("E", to="carol"),
                {**transfer("E", to="carol"), "removed": True},
                transfer("E", to="carol"),
                transfer("END", to="end"),
            ]:
                await server.push(frame)
            await wait_for(lambda: ("each", "firing", "END") in sent(), what="the control alert")
            await server.push(transfer("F"))  # A, C, F: three live facts to bob
            await wait_for(lambda: ("burst out", "firing", "F") in sent(), what="bob's firing")
    assert [a for a in sent() if a[0] == "burst out"] == [("burst out", "firing", "F")]


def receiver_json(receiver: Receiver) -> list[dict[str, object]]:
    return [r.json() for r in receiver.ok()]


QUIET = """
[[rules]]
name = "quiet"
kind = "absence"
source = "feed"
type = "transfer"
group_by = ["args.to"]
window = "2s"
actions = ["hook"]
title = "nothing to {{ args.to }}"

[[rules]]
name = "each"
source = "feed"
type = "thing"
actions = ["hook"]
"""


async def test_the_event_that_ended_an_absence_taken_back_is_no_retraction(
    tmp_path: Path,
) -> None:
    # The resolved alert stands: only a firing is retracted. The key, still silent, fires
    # again a window after the event taken back, carrying the placeholder.
    async with PushServer(token=TOKEN) as server, Receiver() as receiver:
        text = config_text(server, receiver.url()).split("[[rules]]")[0] + QUIET
        path = write_config(tmp_path / "t.toml", text)

        def sent() -> list[tuple[str, str, str]]:
            return [
                (b["status"], b["event"]["provider"], str(b["event"]["id"]))
                for b in receiver_json(receiver)
                if b["rule"] == "quiet"
            ]

        async with running(path, make_registry(tocsin_rules)):
            await wait_for(lambda: server.clients, what="the source to connect")
            await server.push(transfer("a1"))
            await wait_for(lambda: sent(), within=10, what="the firing")
            await server.push(transfer("a2"))
            await wait_for(lambda: len(sent()) == 2, within=10, what="the resolved")
            await server.push({**transfer("a2"), "removed": True})
            await server.push({"id": "END", "type": "thing", "data": {}})  # after the removal
            await wait_for(
                lambda: any(b["rule"] == "each" for b in receiver_json(receiver)),
                what="the control alert",
            )
            await wait_for(lambda: len(sent()) == 3, within=10, what="the firing again")
        titles = [b["title"] for b in receiver_json(receiver) if b["rule"] == "quiet"]
    (firing, resolved, again) = sent()
    assert (firing, resolved) == (("firing", "testpush", "a1"), ("resolved", "testpush", "a2"))
    assert again[:2] == ("firing", "tocsin")  # the placeholder: a2 is carried no more
    assert titles[2] == "nothing to bob"
