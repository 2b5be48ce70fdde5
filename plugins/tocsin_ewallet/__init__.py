"""tocsin source and emulator for the OmiseGO eWallet websocket (Phoenix channels).

``plugin = "ewallet"``: one event per consumption request or finalization pushed on the
joined channels (``transaction_consumption_request``, ``transaction_consumption_finalized``),
once even when eWallet broadcasts it to several of them::

    [sources.wallet]
    plugin = "ewallet"
    url = "wss://ewallet.example.com/api/client/socket"
    api_key = { env = "EWALLET_API_KEY" }          # or, on .../api/admin/socket,
    auth_token = { env = "EWALLET_AUTH_TOKEN" }    # access_key + secret_key
    channels = ["transaction_request:txr_01...", "user:usr_01..."]
    heartbeat = "30s"

Recorded frames replay (``tocsin test --frames``): the ``source`` module docstring says
what does and what does not.
"""

from __future__ import annotations

from collections.abc import Callable

from tocsin import Emulator, Source, hookimpl

from .emulator import EWalletEmulator
from .source import EWalletSource

__all__ = ["EWalletEmulator", "EWalletSource"]


@hookimpl
def register_sources(register: Callable[[type[Source]], None]) -> None:
    """``plugin = "ewallet"`` in a ``[sources.NAME]`` table."""
    register(EWalletSource)


@hookimpl
def register_emulators(register: Callable[[type[Emulator]], None]) -> None:
    """``tocsin emulate ewallet``, and the eWallet part of ``tocsin demo``."""
    register(EWalletEmulator)
