from __future__ import annotations

import shutil
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(autouse=True)
def _no_installed_plugins(monkeypatch: pytest.MonkeyPatch) -> None:
    # Third-party plugins installed on the machine must never leak into the suite.
    monkeypatch.setenv("TOCSIN_LOAD_PLUGINS", "builtin")


@pytest.fixture(params=[False, True], ids=["one-process", "source-process"])
def source_processes(request: pytest.FixtureRequest) -> Iterator[bool]:
    """Run the test twice: its sources in the daemon's process, then each in its own
    (``[daemon] source_processes``); configs take the mode from ``support.daemon_table``."""
    from support import SOURCE_MODE

    SOURCE_MODE.processes = request.param
    yield request.param
    SOURCE_MODE.processes = False


@pytest.fixture(scope="session")
def self_signed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(certificate, key) of a self-signed certificate for 127.0.0.1 (openssl)."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.fail("openssl is needed to make a self-signed certificate (apt-get install openssl)")
    path = tmp_path_factory.mktemp("tls")
    cert, key = path / "cert.pem", path / "key.pem"
    subprocess.run(
        [
            *(openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"),
            *("-nodes", "-keyout", str(key), "-out", str(cert), "-days", "2"),
            *("-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return cert, key


@pytest.fixture(scope="session")
def server_tls(self_signed: tuple[Path, Path]) -> ssl.SSLContext:
    """A server's TLS context presenting the ``self_signed`` certificate."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(*self_signed)
    return context
