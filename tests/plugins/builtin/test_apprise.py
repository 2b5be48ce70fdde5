"""The Apprise action, through Apprise's ``json://`` service against a local HTTP server."""

from __future__ import annotations

import dataclasses
import logging
import re
import sys
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import orjson
import pytest
from pydantic import ValidationError

from support import until
from tocsin import Alert, PermanentDelivery, RetryableDelivery
from tocsin_builtin.apprise_action import AppriseAction, AppriseActionConfig

if TYPE_CHECKING:
    from conftest import Receiver

PASSWORD = "pw-5ecret-7a1c"
TOKEN = "BOTTOKEN-31337"


def config(**keys: Any) -> AppriseActionConfig:
    return AppriseActionConfig.model_validate({"plugin": "apprise", **keys})


@pytest.fixture
def make(started: Callable[[Any], Awaitable[Any]]) -> Callable[..., Awaitable[AppriseAction]]:
    """Build and start AppriseActions; all are closed at the end of the test."""

    async def build(**keys: Any) -> AppriseAction:
        return await started(AppriseAction("ops", config(**keys)))  # type: ignore[no-any-return]

    return build


def json_url(receiver: Receiver, path: str, userinfo: str = "") -> str:
    return f"json://{userinfo}{receiver.base}{path}"


# --- targets ----------------------------------------------------------------------------


async def test_each_url_is_a_target_with_a_hashed_key_and_a_label_by_its_place(
    receiver: Receiver, make: Callable[..., Any]
) -> None:
    urls = [
        json_url(receiver, "/one", f"user:{PASSWORD}@"),
        json_url(receiver, "/two-topic", f"user:{PASSWORD}@"),
    ]
    action = await make(urls=urls)
    one, two = action.targets()
    assert one.key != two.key
    for target in (one, two):
        assert re.fullmatch(r"[0-9a-f]{16}", target.key)
    # No part of the URL: Apprise's privacy form would still show a path or an ntfy topic.
    assert (one.label, two.label) == ("urls[0] (json)", "urls[1] (json)")
    # Keys are stable: the outbox finds its targets again after a restart.
    again = AppriseAction("ops", config(urls=urls))
    assert [t.key for t in again.targets()] == [one.key, two.key]


def test_the_same_url_twice_is_one_target() -> None:
    action = AppriseAction("ops", config(urls=["json://127.0.0.1:9/a", "json://127.0.0.1:9/a"]))
    assert len(action.targets()) == 1


# --- delivery ---------------------------------------------------------------------------


async def test_delivery_reaches_only_its_target_with_title_and_body(
    receiver: Receiver, make: Callable[..., Any], alert: Alert
) -> None:
    action = await make(urls=[json_url(receiver, "/one"), json_url(receiver, "/two")])
    one, _ = action.targets()
    await action.deliver(alert, one.key)
    (req,) = await receiver.wait_for_requests(1)
    assert req.path == "/one"
    sent = orjson.loads(req.body)
    assert (sent["title"], sent["message"], sent["type"]) == (alert.title, alert.body, "warning")


async def test_a_title_only_alert_is_sent_as_the_body(
    receiver: Receiver, make: Callable[..., Any], alert: Alert
) -> None:
    action = await make(urls=[json_url(receiver, "/one")])
    resolved = Alert(alert.id, "resolved", alert.rule, "all clear", "", alert.fired_at, {})
    await action.deliver(resolved, action.targets()[0].key)
    (req,) = await receiver.wait_for_requests(1)
    sent = orjson.loads(req.body)
    assert (sent["title"], sent["message"], sent["type"]) == ("", "all clear", "success")


async def test_closed_port_is_retryable(
    closed_port: int, make: Callable[..., Any], alert: Alert
) -> None:
    action = await make(urls=[f"json://user:{PASSWORD}@127.0.0.1:{closed_port}/x"])
    with pytest.raises(RetryableDelivery) as caught:
        await action.deliver(alert, action.targets()[0].key)
    assert "A Connection error occurred" in str(caught.value)
    assert PASSWORD not in str(caught.value)


async def test_an_error_status_is_retryable_and_apprise_does_not_retry_itself(
    receiver: Receiver, make: Callable[..., Any], alert: Alert
) -> None:
    receiver.respond(500, b"boom")
    action = await make(urls=[json_url(receiver, "/one?retry=3&wait=0")])
    with pytest.raises(RetryableDelivery, match="error=500"):
        await action.deliver(alert, action.targets()[0].key)
    assert len(receiver.requests) == 1


async def test_a_send_past_the_deadline_is_retryable(
    receiver: Receiver, make: Callable[..., Any], alert: Alert
) -> None:
    receiver.respond(hang=True)
    action = await make(urls=[json_url(receiver, "/slow")], deadline=0.5)
    started = anyio.current_time()
    with pytest.raises(RetryableDelivery, match=r"did not finish sending .* within 0\.5s"):
        await action.deliver(alert, action.targets()[0].key)
    assert 0.5 <= anyio.current_time() - started < 1.5
    await receiver.wait_for_requests(1)
    receiver.release()


async def test_a_stuck_channel_holds_itself_up_and_no_other(
    receiver: Receiver, make: Callable[..., Any], alert: Alert
) -> None:
    receiver.respond(hang=True, path="/slow")
    action = await make(
        urls=[json_url(receiver, "/slow"), json_url(receiver, "/fast")], workers=1, deadline=0.5
    )
    slow, fast = (t.key for t in action.targets())
    with pytest.raises(RetryableDelivery, match="did not finish"):
        await action.deliver(alert, slow)
    # The abandoned send gave the only worker back: the other channel goes on...
    await action.deliver(alert, fast)
    await action.deliver(alert, fast)
    # ...while the stuck one is not sent to again until its send ends: one thread at most.
    other = dataclasses.replace(alert, id="another alert")
    for waiting in (alert, other):  # the same alert's next try, or another alert
        with pytest.raises(RetryableDelivery, match=r"the last send to urls\[0\] \(json\) has not"):
            await action.deliver(waiting, slow)
    assert [r.path for r in receiver.requests] == ["/slow", "/fast", "/fast"]
    receiver.release()
    await until(lambda: slow not in action._sending)
    await action.deliver(alert, slow)  # its abandoned send got through: not sent again
    await action.deliver(other, slow)
    assert [r.path for r in receiver.requests] == ["/slow", "/fast", "/fast", "/slow"]


@pytest.mark.parametrize(("status", "sent"), [(200, 1), (500, 2)])
async def test_a_send_that_ends_after_its_deadline_counts_for_the_next_try(
    receiver: Receiver, make: Callable[..., Any], alert: Alert, status: int, sent: int
) -> None:
    # A channel slower than the deadline: before, every try sent the notification again
    # (an audit saw 4 of one alert in 8 s). Now the next try takes the late outcome: a
    # success is the delivery's, a failure sends again.
    receiver.respond(status, hang=True)
    action = await make(urls=[json_url(receiver, "/slow")], deadline=0.5)
    (target,) = (t.key for t in action.targets())
    with pytest.raises(RetryableDelivery, match="did not finish"):
        await action.deliver(alert, target)
    await receiver.wait_for_requests(1)
    receiver.release()
    if status == 200:
        await action.deliver(alert, target)
    else:
        with pytest.raises(RetryableDelivery, match="could not notify"):
            await action.deliver(alert, target)
    assert len(receiver.requests) == sent


async def test_deliveries_waiting_for_a_busy_channel_go_one_at_a_time(
    receiver: Receiver, make: Callable[..., Any], alert: Alert
) -> None:
    # Every waiter woke on the same send's end and sent at once (review of 5c3f1c7): two
    # notifications in flight on the channel said to send one at a time.
    receiver.respond(hang=True)
    action = await make(urls=[json_url(receiver, "/slow")], deadline=10, workers=4)
    (target,) = (t.key for t in action.targets())

    earlier = set(threading.enumerate())  # another test's stuck sends may still be running

    def sending() -> int:
        return sum(t.name == "apprise-ops" and t not in earlier for t in threading.enumerate())

    async with anyio.create_task_group() as tg:
        tg.start_soon(action.deliver, alert, target)
        await receiver.wait_for_requests(1)
        for n in (1, 2):
            tg.start_soon(action.deliver, dataclasses.replace(alert, id=f"other {n}"), target)
        await anyio.wait_all_tasks_blocked()
        receiver.release_once()  # the first send ends; the next one hangs
        await receiver.wait_for_requests(2)
        await anyio.wait_all_tasks_blocked()
        assert sending() == 1  # the other waiter waits for the second send
        receiver.release()
    assert len(receiver.requests) == 3


CHILD = """
import sys, anyio
from tocsin import Alert, RetryableDelivery
from tocsin_builtin.apprise_action import AppriseAction, AppriseActionConfig

async def main():
    cfg = {"plugin": "apprise", "urls": [sys.argv[1]], "deadline": 0.3}
    action = AppriseAction("ops", AppriseActionConfig.model_validate(cfg))
    await action.start()
    try:
        await action.deliver(Alert("a1", "firing", "r", "t", "b", "", {}), action.targets()[0].key)
    except RetryableDelivery as err:
        print("abandoned:", type(err).__name__, flush=True)
    await action.aclose()

anyio.run(main)
"""


async def test_a_stuck_send_never_keeps_the_process_from_exiting(receiver: Receiver) -> None:
    receiver.respond(hang=True)
    with anyio.fail_after(20):
        child = await anyio.run_process(
            # rto: Apprise's own read timeout, 4 s by default, made longer than the wait.
            [sys.executable, "-c", CHILD, json_url(receiver, "/stuck?rto=60")],
            check=False,
        )
    # The send is still stuck in Apprise (the receiver never answered), yet the process
    # ended: a pool's threads would be joined at exit, and systemd would kill the daemon.
    assert child.returncode == 0, child.stderr
    assert child.stdout == b"abandoned: RetryableDelivery\n"
    assert [r.path for r in receiver.requests] == ["/stuck"]
    receiver.release()


async def test_a_target_no_longer_configured_is_permanent(
    make: Callable[..., Any], alert: Alert
) -> None:
    action = await make(urls=["json://127.0.0.1:9/a"])
    with pytest.raises(PermanentDelivery, match="target no longer configured"):
        await action.deliver(alert, "0123456789abcdef")


async def test_deliver_before_start_is_a_programming_error(alert: Alert) -> None:
    action = AppriseAction("ops", config(urls=["json://127.0.0.1:9/a"]))
    with pytest.raises(RuntimeError, match="start"):
        await action.deliver(alert, action.targets()[0].key)
    await action.aclose()


# --- validation -------------------------------------------------------------------------


def test_an_invalid_url_is_refused_by_index_without_quoting_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    with pytest.raises(ValidationError) as caught:
        config(urls=["json://127.0.0.1/a", f"tgram://{TOKEN}/", f"nosuchscheme://{TOKEN}"])
    errors = caught.value.errors()
    assert [e["loc"] for e in errors] == [("urls", 1), ("urls", 2)]
    assert all("not a URL Apprise understands" in e["msg"] for e in errors)
    assert TOKEN not in str(caught.value)
    # Apprise's own complaint quotes the URL: it must not reach our log handlers.
    assert TOKEN not in caplog.text


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        ({}, "give either urls"),
        ({"urls": []}, "give either urls"),
        ({"urls": ["json://127.0.0.1/a"], "config": __file__}, "not both"),
        ({"urls": ["json://127.0.0.1/a"], "tag": "ops"}, "use it with config"),
        ({"config": "https://example.com/apprise.yml"}, "local Apprise config file"),
        ({"config": "/nonexistent/apprise.txt"}, "does not exist"),
        ({"urls": ["json://127.0.0.1/a"], "workers": 0}, "greater than or equal to 1"),
        ({"urls": ["json://127.0.0.1/a"], "workers": 33}, "less than or equal to 32"),
        ({"urls": ["json://127.0.0.1/a"], "deadline": "0s"}, "greater than 0"),
        ({"urls": ["json://127.0.0.1/a"], "url": "x"}, "Extra inputs are not permitted"),
    ],
)
def test_bad_configs_are_refused(keys: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=re.escape(message)):
        config(**keys)


def test_secrets_never_print() -> None:
    cfg = config(urls=[f"json://user:{PASSWORD}@127.0.0.1/{TOKEN}"], deadline="45s")
    assert cfg.deadline == 45.0
    for text in (str(cfg), repr(cfg), cfg.model_dump_json()):
        assert PASSWORD not in text
        assert TOKEN not in text


# --- config files -----------------------------------------------------------------------


async def test_a_config_file_and_its_tags(
    tmp_path: Path, receiver: Receiver, make: Callable[..., Any], alert: Alert
) -> None:
    path = tmp_path / "apprise.txt"
    path.write_text(
        f"ops={json_url(receiver, '/ops', f'u:{PASSWORD}@')}\n"
        f"ops,dev={json_url(receiver, '/both')}\n"
        f"dev={json_url(receiver, '/dev')}\n"
    )
    everything = AppriseAction("all", config(config=str(path)))
    assert len(everything.targets()) == 3
    action = await make(config=str(path), tag="ops")
    labels = [t.label for t in action.targets()]
    assert len(labels) == 2
    assert any("/ops" in label and "u:****@" in label for label in labels)
    assert not any(PASSWORD in label for label in labels)
    for target in action.targets():
        await action.deliver(alert, target.key)
    assert sorted(r.path for r in await receiver.wait_for_requests(2)) == ["/both", "/ops"]


def test_a_config_file_with_a_bad_entry_is_refused_without_quoting_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    path = tmp_path / "apprise.txt"
    path.write_text(f"json://127.0.0.1/a\ntgram://{TOKEN}/\n")
    with pytest.raises(ValidationError, match=r"1 problem\(s\) reading") as caught:
        config(config=str(path))
    assert TOKEN not in str(caught.value)
    assert TOKEN not in caplog.text


def test_a_config_file_without_a_matching_url_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "apprise.txt"
    path.write_text("dev=json://127.0.0.1/a\n")
    with pytest.raises(ValidationError, match="holds no Apprise URL tagged 'ops'"):
        config(config=str(path), tag="ops")


# --- Apprise's log output ---------------------------------------------------------------


async def test_apprise_log_records_are_masked(
    closed_port: int, make: Callable[..., Any], alert: Alert, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    url = f"json://user:{PASSWORD}@127.0.0.1:{closed_port}/x"
    action = await make(urls=[url])
    with pytest.raises(RetryableDelivery):
        await action.deliver(alert, action.targets()[0].key)
    # Whatever a service plugin prints (here, straight through Apprise's logger).
    logging.getLogger("apprise").warning("posting to %s failed", url)
    assert "posting to *** failed" in caplog.text
    assert PASSWORD not in caplog.text
    assert any(r.name == "apprise" and r.levelno == logging.WARNING for r in caplog.records)
