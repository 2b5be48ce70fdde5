"""The log action: one line per alert through ``tocsin.alerts``."""

from __future__ import annotations

import logging

import orjson
import pytest
from pydantic import ValidationError

from tocsin import Alert
from tocsin_builtin.log_action import LogAction, LogConfig


def lines(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    """The records of ``tocsin.alerts`` (other loggers may be verbose in a full run)."""
    return [r for r in caplog.records if r.name == "tocsin.alerts"]


def action(**keys: str) -> LogAction:
    return LogAction("console", LogConfig.model_validate({"plugin": "log", **keys}))


async def test_text_line(alert: Alert, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="tocsin.alerts")
    log = action()
    await log.start()
    await log.deliver(alert, "")
    await log.aclose()
    (record,) = lines(caplog)
    assert record.name == "tocsin.alerts"
    assert record.levelno == logging.WARNING
    assert record.getMessage() == (
        "ALERT [firing] incoming transfer: Received 12.5000 EOS — from alice to myaccount: rent"
    )
    assert record.__dict__["alert_id"] == alert.id


async def test_json_line_at_the_configured_level(
    alert: Alert, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="tocsin.alerts")
    await action(level="info", format="json").deliver(alert, "")
    (record,) = lines(caplog)
    assert record.levelno == logging.INFO
    assert "\n" not in record.getMessage()
    assert orjson.loads(record.getMessage()) == alert.payload()


async def test_a_body_cannot_forge_log_lines(
    alert: Alert, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="tocsin.alerts")
    forged = Alert(alert.id, "resolved", "r", "t", "x\nALERT [firing] fake: y\r", "", {})
    await action(level="error").deliver(forged, "")
    (record,) = lines(caplog)
    assert record.getMessage() == "ALERT [resolved] r: t — x\\nALERT [firing] fake: y\\r"


async def test_an_empty_body_and_odd_event_data_never_fail(
    alert: Alert, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="tocsin.alerts")
    odd = Alert(alert.id, "retracted", "r", "title only", "", "", {"n": {1: object()}})
    await action().deliver(odd, "")
    await action(format="json").deliver(odd, "")
    text, json_line = (r.getMessage() for r in lines(caplog))
    assert text == "ALERT [retracted] r: title only"
    assert orjson.loads(json_line)["event"]["n"]["1"].startswith("<object object")


@pytest.mark.parametrize("keys", [{"level": "loud"}, {"format": "xml"}, {"colour": "red"}])
def test_bad_keys_are_refused(keys: dict[str, str]) -> None:
    with pytest.raises(ValidationError):
        action(**keys)
