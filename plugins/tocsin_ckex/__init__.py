"""tocsin-ckex: sportsbook and fancy odds from the ckex / uni247 "interact ws".

One ``order_slip`` event per changed sportsbook quote and one ``order_slip_fancy`` event
per changed fancy quote (SPEC section 4), and a local emulator of the server.
"""

from __future__ import annotations

from collections.abc import Callable

from tocsin import Emulator, Source, hookimpl

from .emulator import CkexEmulator
from .source import CkexConfig, CkexSource

__all__ = ["CkexConfig", "CkexEmulator", "CkexSource"]


@hookimpl
def register_sources(register: Callable[[type[Source]], None]) -> None:
    """``plugin = "ckex"`` in a ``[sources.NAME]`` table."""
    register(CkexSource)


@hookimpl
def register_emulators(register: Callable[[type[Emulator]], None]) -> None:
    """``tocsin emulate ckex``; started by ``tocsin demo``."""
    register(CkexEmulator)
