from __future__ import annotations

import pytest


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(autouse=True)
def _no_installed_plugins(monkeypatch: pytest.MonkeyPatch) -> None:
    # Third-party plugins installed on the machine must never leak into the suite.
    monkeypatch.setenv("TOCSIN_LOAD_PLUGINS", "builtin")
