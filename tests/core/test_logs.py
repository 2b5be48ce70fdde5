from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import pytest

from support import make_registry, write_config
from tocsin.config import load_config
from tocsin.logs import setup_logging


@pytest.fixture
def restore_logging() -> None:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield  # type: ignore[misc]
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_secrets_from_the_config_never_reach_a_log_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, restore_logging: None, fmt: str
) -> None:
    monkeypatch.setenv("PUSH_TOKEN", "tok-9f8e7d6c")
    (tmp_path / "secret").write_text("file-secret-5150\n")
    path = write_config(
        tmp_path / "t.toml",
        """
[sources.feed]
plugin = "testpush"
url = "ws://127.0.0.1:1/feed"
token = { env = "PUSH_TOKEN" }
[actions.hook]
plugin = "webhook"
url = "http://127.0.0.1:1/hook"
secret = { file = "SECRET" }
""".replace("SECRET", str(tmp_path / "secret")),
    )
    load_config(path, make_registry())
    stream = io.StringIO()
    setup_logging("debug", fmt, stream)
    log = logging.getLogger("websockets.client")
    # What a library's debug log could print: a request line with a query string.
    log.debug("> GET /feed?apikey=%s HTTP/1.1", "tok-9f8e7d6c")
    try:
        raise RuntimeError("bad auth with file-secret-5150")
    except RuntimeError:
        logging.getLogger("tocsin.x").exception("failed")
    out = stream.getvalue()
    assert "tok-9f8e7d6c" not in out and "file-secret-5150" not in out
    assert out.count("***") >= 2
    lines = out.strip().splitlines()
    if fmt == "json":
        records = [json.loads(line) for line in lines]
        assert [r["level"] for r in records] == ["DEBUG", "ERROR"]
        assert "Traceback" in records[1]["exception"]
    else:
        assert " DEBUG websockets.client: > GET /feed?apikey=*** HTTP/1.1" in lines[0]
        # One line per record, each with its level: a traceback stays on its record's line.
        assert len(lines) == 2 and " ERROR tocsin.x: failed | Traceback (most recent" in lines[1]
        assert lines[1].endswith("RuntimeError: bad auth with ***")


def test_uncaught_exceptions_are_logged_scrubbed() -> None:
    import io
    import sys
    import threading

    from tocsin.fields import SecretValue
    from tocsin.logs import setup_logging

    SecretValue("crash-s3cret-9")
    stream = io.StringIO()
    hooks = sys.excepthook, threading.excepthook
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    libraries = {
        n: logging.getLogger(n).level for n in ("websockets", "aiohttp", "apprise", "asyncio")
    }
    try:
        setup_logging("info", "text", stream)
        try:
            raise RuntimeError("failed with crash-s3cret-9")
        except RuntimeError as err:
            sys.excepthook(type(err), err, err.__traceback__)
        thread = threading.Thread(target=lambda: 1 / 0, name="worker")
        thread.start()
        thread.join()
    finally:
        sys.excepthook, threading.excepthook = hooks
        root.handlers[:], _ = saved
        root.setLevel(saved[1])
        for name, level in libraries.items():  # setup_logging quiets these: undo it
            logging.getLogger(name).setLevel(level)
    text = stream.getvalue()
    assert "CRITICAL tocsin.crash: uncaught exception" in text
    assert "uncaught exception in thread worker" in text and "ZeroDivisionError" in text
    assert "crash-s3cret-9" not in text and "failed with ***" in text
