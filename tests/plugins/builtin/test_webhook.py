"""The webhook action against a real HTTP receiver on 127.0.0.1."""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import TYPE_CHECKING, Any

import anyio
import orjson
import pytest
from pydantic import ValidationError

from tocsin import Alert, PermanentDelivery, RetryableDelivery
from tocsin_builtin.webhook import (
    WebhookAction,
    WebhookConfig,
    origin,
    parse_retry_after,
    sign,
    verify,
)

if TYPE_CHECKING:
    from conftest import Receiver

TOKEN = "tok-9f8e7d6c5b4a"
SECRET = "whsec-0123456789abcdef"

Make = Callable[..., AsyncIterator[WebhookAction]]


def config(url: str, **keys: Any) -> WebhookConfig:
    return WebhookConfig.model_validate({"plugin": "webhook", "url": url, **keys})


@pytest.fixture
def make(started: Callable[[Any], Awaitable[Any]]) -> Callable[..., Awaitable[WebhookAction]]:
    """Build and start WebhookActions; all are closed at the end of the test."""

    async def build(url: str, **keys: Any) -> WebhookAction:
        return await started(WebhookAction("hook", config(url, **keys)))  # type: ignore[no-any-return]

    return build


# --- the request ------------------------------------------------------------------------


async def test_payload_and_headers_follow_the_spec(
    receiver: Receiver, make: Callable[..., Any], alert: Alert
) -> None:
    action = await make(receiver.url(), secret=SECRET, headers={"Authorization": f"Bearer {TOKEN}"})
    before = int(time.time())
    await action.deliver(alert, "")
    (req,) = await receiver.wait_for_requests(1)

    assert req.method == "POST"
    assert req.body == orjson.dumps(alert.payload())
    assert orjson.loads(req.body) == {
        "id": alert.id,
        "status": "firing",
        "rule": "incoming transfer",
        "title": alert.title,
        "body": alert.body,
        "fired_at": "2026-11-22T10:00:00Z",
        "event": alert.event,
    }
    assert req.headers["Content-Type"] == "application/json"
    assert req.headers["Idempotency-Key"] == alert.id
    assert req.headers["Authorization"] == f"Bearer {TOKEN}"
    stamp = req.headers["X-Tocsin-Timestamp"]
    assert stamp.isdigit()
    assert before <= int(stamp) <= int(time.time())
    # Checked against an independent computation of the SPEC's formula.
    expected = hmac.new(SECRET.encode(), f"{stamp}.".encode() + req.body, hashlib.sha256)
    assert req.headers["X-Tocsin-Signature"] == "sha256=" + expected.hexdigest()
    assert verify(SECRET.encode(), stamp, req.body, req.headers["X-Tocsin-Signature"])


async def test_the_users_user_agent_replaces_tocsins(
    receiver: Receiver, make: Callable[..., Any], alert: Alert
) -> None:
    mine = await make(receiver.url("/mine"), headers={"user-agent": "mine/1"})
    await mine.deliver(alert, "")
    ours = await make(receiver.url("/ours"))
    await ours.deliver(alert, "")
    first, second = await receiver.wait_for_requests(2)
    assert first.headers.getall("User-Agent") == ["mine/1"]
    assert second.headers.getall("User-Agent")[0].startswith("tocsin/")


async def test_without_a_secret_nothing_is_signed(
    receiver: Receiver, make: Callable[..., Any], alert: Alert
) -> None:
    action = await make(receiver.url())
    await action.deliver(alert, "")
    (req,) = await receiver.wait_for_requests(1)
    assert "X-Tocsin-Signature" not in req.headers
    assert "X-Tocsin-Timestamp" not in req.headers
    assert req.headers["Idempotency-Key"] == alert.id


async def test_query_string_of_the_url_is_kept(
    receiver: Receiver, make: Callable[..., Any], alert: Alert
) -> None:
    action = await make(receiver.url(f"/in/{TOKEN}?key={TOKEN}"))
    await action.deliver(alert, "")
    (req,) = await receiver.wait_for_requests(1)
    assert (req.path, req.query) == (f"/in/{TOKEN}", f"key={TOKEN}")


# --- outcomes ---------------------------------------------------------------------------


@pytest.mark.parametrize("status", [200, 201, 202, 204])
async def test_2xx_is_success(
    receiver: Receiver, make: Callable[..., Any], alert: Alert, status: int
) -> None:
    receiver.respond(status, b"")
    action = await make(receiver.url())
    await action.deliver(alert, "")
    await receiver.wait_for_requests(1)


@pytest.mark.parametrize("status", [500, 502, 503, 504, 408, 425, 429])
async def test_retryable_statuses(
    receiver: Receiver, make: Callable[..., Any], alert: Alert, status: int
) -> None:
    receiver.respond(status, b"try later")
    action = await make(receiver.url())
    with pytest.raises(RetryableDelivery) as caught:
        await action.deliver(alert, "")
    assert caught.value.retry_after is None
    assert str(caught.value) == f"HTTP {status} from the webhook: try later"


async def test_retry_after_in_seconds(
    receiver: Receiver, make: Callable[..., Any], alert: Alert
) -> None:
    receiver.respond(429, b"slow down", {"Retry-After": "7"})
    action = await make(receiver.url())
    with pytest.raises(RetryableDelivery) as caught:
        await action.deliver(alert, "")
    assert caught.value.retry_after == 7.0


async def test_retry_after_as_an_http_date(
    receiver: Receiver, make: Callable[..., Any], alert: Alert
) -> None:
    when = datetime.now(UTC) + timedelta(seconds=90)
    receiver.respond(429, b"", {"Retry-After": format_datetime(when, usegmt=True)})
    action = await make(receiver.url())
    with pytest.raises(RetryableDelivery) as caught:
        await action.deliver(alert, "")
    assert caught.value.retry_after is not None
    assert 85 <= caught.value.retry_after <= 91


async def test_retry_after_on_a_503(
    receiver: Receiver, make: Callable[..., Any], alert: Alert
) -> None:
    receiver.respond(503, b"", {"Retry-After": "120"})
    action = await make(receiver.url())
    with pytest.raises(RetryableDelivery) as caught:
        await action.deliver(alert, "")
    assert caught.value.retry_after == 120.0


@pytest.mark.parametrize("status", [400, 401, 403, 404, 410, 422])
async def test_other_client_errors_are_permanent(
    receiver: Receiver, make: Callable[..., Any], alert: Alert, status: int
) -> None:
    receiver.respond(status, b"x" * 300, {"Retry-After": "5"})
    action = await make(receiver.url())
    with pytest.raises(PermanentDelivery) as caught:
        await action.deliver(alert, "")
    assert str(caught.value) == f"HTTP {status} from the webhook: " + "x" * 200


async def test_redirects_are_not_followed(
    receiver: Receiver, make: Callable[..., Any], alert: Alert
) -> None:
    receiver.respond(308, b"", {"Location": receiver.url("/new")}, path="/old")
    action = await make(receiver.url("/old"))
    with pytest.raises(PermanentDelivery, match="HTTP 308 from the webhook"):
        await action.deliver(alert, "")
    assert [r.path for r in receiver.requests] == ["/old"]


async def test_connection_refused_is_retryable(
    closed_port: int, make: Callable[..., Any], alert: Alert
) -> None:
    action = await make(f"http://u:{TOKEN}@127.0.0.1:{closed_port}/in/{TOKEN}?k={TOKEN}")
    with pytest.raises(RetryableDelivery) as caught:
        await action.deliver(alert, "")
    message = str(caught.value)
    assert message.startswith(f"cannot reach the webhook at http://127.0.0.1:{closed_port}/: ")
    assert TOKEN not in message


async def test_a_hanging_receiver_times_out(
    receiver: Receiver, make: Callable[..., Any], alert: Alert
) -> None:
    receiver.respond(hang=True)
    action = await make(receiver.url(f"/in/{TOKEN}"), timeout=0.2)
    started = anyio.current_time()
    with pytest.raises(RetryableDelivery) as caught:
        await action.deliver(alert, "")
    assert anyio.current_time() - started < 2.0
    assert str(caught.value) == (
        f"the webhook at http://{receiver.base}/ did not answer within 0.2s"
    )


async def test_deliver_before_start_is_a_programming_error(alert: Alert) -> None:
    action = WebhookAction("hook", config("http://127.0.0.1:9/"))
    with pytest.raises(RuntimeError, match="start"):
        await action.deliver(alert, "")
    await action.aclose()  # harmless without start()


async def test_pool_is_bounded_by_concurrency(
    receiver: Receiver, make: Callable[..., Any], alert: Alert
) -> None:
    receiver.respond(hang=True)
    action = await make(receiver.url(), concurrency=2)
    async with anyio.create_task_group() as tg:
        for _ in range(3):
            tg.start_soon(action.deliver, alert, "")
        await receiver.wait_for_requests(2)
        assert action._pool is not None and action._pool.connections == 2
        receiver.release()
    assert len(receiver.requests) == 3
    assert action._pool.connections <= 2


# --- secrets ----------------------------------------------------------------------------


def test_secrets_never_print() -> None:
    cfg = config(
        f"https://user:{TOKEN}@hooks.example.com/in/{TOKEN}?key={TOKEN}",
        secret=SECRET,
        headers={"X-Api-Key": f"Bearer {TOKEN}"},
    )
    for text in (str(cfg), repr(cfg), cfg.model_dump_json(), str(cfg.model_dump())):
        assert TOKEN not in text
        assert SECRET not in text
    assert WebhookAction("hook", cfg).targets()[0].label == "hook (https://hooks.example.com:443/)"


@pytest.mark.parametrize(
    ("url", "message"),
    [
        (f"ftp://user:{TOKEN}@example.com/x", "url must start with http:// or https://"),
        (f"{TOKEN}", "url must start with http:// or https://"),
        (f"http:///{TOKEN}", "url must name a host"),
        (f"http://example.com:{TOKEN}/", "url is not a valid URL"),
        (f"http://example.com/{TOKEN} x", "url cannot contain spaces"),
    ],
)
def test_bad_urls_are_refused_without_quoting_them(url: str, message: str) -> None:
    with pytest.raises(ValidationError) as caught:
        config(url)
    assert message in str(caught.value)
    assert TOKEN not in str(caught.value)
    assert [e["loc"] for e in caught.value.errors()] == [("url",)]


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        ({"timeout": 0}, "greater than 0"),
        ({"timeout": "soon"}, "is not a duration"),
        ({"headers": {"Idempotency-Key": "x"}}, "set by tocsin"),
        ({"headers": {"x-tocsin-signature": "x"}}, "set by tocsin"),
        ({"headers": {"Bad Name": "x"}}, "not a valid HTTP header name"),
        ({"headers": {"X-Token": f"{TOKEN}\r\nX-Evil: 1"}}, "cannot contain a line break"),
        ({"retries": 3}, "Extra inputs are not permitted"),
    ],
)
def test_bad_keys_are_refused(keys: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError) as caught:
        config("http://127.0.0.1/", **keys)
    assert message in str(caught.value)
    assert TOKEN not in str(caught.value)


def test_credentials_go_in_the_url_or_a_header_not_both() -> None:
    with pytest.raises(ValidationError) as caught:
        config(f"http://u:{TOKEN}@127.0.0.1/", headers={"authorization": f"Bearer {TOKEN}"})
    assert "either in the url (user:password@) or as an Authorization header" in str(caught.value)
    assert TOKEN not in str(caught.value)
    config(f"http://u:{TOKEN}@127.0.0.1/")
    config("http://127.0.0.1/", headers={"Authorization": f"Bearer {TOKEN}"})


def test_durations_and_retry_use_the_shared_types() -> None:
    cfg = config("http://127.0.0.1/", timeout="1m30s", retry={"attempts": 3})
    assert cfg.timeout == 90.0
    assert cfg.retry.attempts == 3
    assert config("http://127.0.0.1/").timeout == 10.0


async def test_errors_never_carry_the_token(
    receiver: Receiver, closed_port: int, make: Callable[..., Any], alert: Alert
) -> None:
    messages = []
    receiver.respond(500, b"")
    receiver.respond(hang=True, path=f"/slow/{TOKEN}")
    for url, keys in (
        (f"http://u:{TOKEN}@{receiver.base}/in/{TOKEN}?k={TOKEN}", {}),
        (f"http://u:{TOKEN}@127.0.0.1:{closed_port}/in/{TOKEN}?k={TOKEN}", {}),
        (f"http://u:{TOKEN}@{receiver.base}/slow/{TOKEN}", {"timeout": 0.2}),
    ):
        action = await make(url, **keys)
        with pytest.raises(RetryableDelivery) as caught:
            await action.deliver(alert, "")
        messages.append(str(caught.value))
    assert all(TOKEN not in m for m in messages), messages


# --- pure helpers -----------------------------------------------------------------------


def test_sign_and_verify() -> None:
    body = b'{"id":"x"}'
    signature = sign(b"k", 1700000000, body)
    assert signature == "sha256=" + hmac.new(b"k", b"1700000000." + body, "sha256").hexdigest()
    assert verify(b"k", 1700000000, body, signature, now=1700000100)
    assert verify(b"k", "1700000000", body, signature, tolerance=None)
    assert not verify(b"other", 1700000000, body, signature, now=1700000000)
    assert not verify(b"k", 1700000000, body + b" ", signature, now=1700000000)
    assert not verify(b"k", 1700000001, body, signature, now=1700000000)
    assert not verify(b"k", 1700000000, body, signature, now=1700000000 + 301)
    assert not verify(b"k", "soon", body, signature)


def test_parse_retry_after() -> None:
    now = 1_800_000_000.0
    date = format_datetime(datetime.fromtimestamp(now + 30, UTC), usegmt=True)
    past = format_datetime(datetime.fromtimestamp(now - 30, UTC), usegmt=True)
    assert parse_retry_after("120", now) == 120.0
    assert parse_retry_after(" 5 ", now) == 5.0
    assert parse_retry_after(date, now) == 30.0
    assert parse_retry_after(past, now) == 0.0
    for junk in (None, "", "-5", "soon", "Mon, 99 Foo 2026", "١٢"):
        assert parse_retry_after(junk, now) is None


def test_origin_hides_everything_but_scheme_host_and_port() -> None:
    assert origin(f"https://u:{TOKEN}@example.com/a/{TOKEN}?k={TOKEN}#f") == (
        "https://example.com:443/"
    )
    assert origin("http://[::1]:8080/x") == "http://[::1]:8080/"
    assert origin("http://example.com:bad/") == "<invalid url>"
