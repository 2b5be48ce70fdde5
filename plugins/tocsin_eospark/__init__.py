"""tocsin's EOSPark plugin: the ``eospark`` source (EOS actions) and its local emulator.

``[sources.NAME]`` with ``plugin = "eospark"`` connects to EOSPark's WebSocket API and
emits one ``action`` event per action of each pushed transaction (SPEC section 4).
"""

from __future__ import annotations

from collections.abc import Callable

from tocsin import Emulator, Source, hookimpl

from .emulator import EOSParkEmulator
from .source import EOSParkConfig, EOSParkSource

__all__ = ["EOSParkConfig", "EOSParkEmulator", "EOSParkSource"]


@hookimpl
def register_sources(register: Callable[[type[Source]], None]) -> None:
    """``plugin = "eospark"`` in a ``[sources.NAME]`` table."""
    register(EOSParkSource)


@hookimpl
def register_emulators(register: Callable[[type[Emulator]], None]) -> None:
    """``tocsin emulate eospark``, and the EOSPark part of ``tocsin demo``."""
    register(EOSParkEmulator)
