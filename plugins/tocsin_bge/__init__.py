"""tocsin's BGE exchange plugin: the ``bge`` source (market data, orders, assets) and its emulator.

``[sources.NAME]`` with ``plugin = "bge"`` connects to BGE's v2 WebSocket API and emits
one event per pushed item: ``ticker``, ``fills``, ``orderbook``, ``candles``,
``percent10`` (public) and ``orders``, ``assets`` (private, after a signed login).
Recorded frames replay (``tocsin test --frames``): the ``source`` module docstring says
what does and what does not.
"""

from __future__ import annotations

from collections.abc import Callable

from tocsin import Emulator, Source, hookimpl

from .config import BGEConfig, BGESubscription
from .emulator import BGEEmulator
from .source import BGESource

__all__ = ["BGEConfig", "BGEEmulator", "BGESource", "BGESubscription"]


@hookimpl
def register_sources(register: Callable[[type[Source]], None]) -> None:
    """``plugin = "bge"`` in a ``[sources.NAME]`` table."""
    register(BGESource)


@hookimpl
def register_emulators(register: Callable[[type[Emulator]], None]) -> None:
    """``tocsin emulate bge``, and the BGE part of ``tocsin demo``."""
    register(BGEEmulator)
