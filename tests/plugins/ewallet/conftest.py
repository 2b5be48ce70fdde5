"""Fixtures of the eWallet plugin tests."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from tocsin_ewallet.emulator import EWalletEmulator


@pytest.fixture
async def emulator() -> AsyncIterator[EWalletEmulator]:
    async with EWalletEmulator() as emu:
        yield emu
