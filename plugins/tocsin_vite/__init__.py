"""tocsin's Vite plugin: the ``vite`` source (go-vite JSON-RPC subscriptions) and its emulator.

``[sources.NAME]`` with ``plugin = "vite"`` subscribes to a go-vite node over WebSocket
(push subscriptions, or polling filters with ``mode = "poll"``) and emits
``snapshot_block``, ``account_block``, ``unreceived_block`` and ``vmlog`` events, with
rollbacks as ``removed`` events; it resumes from saved heights after a reconnect or a
restart (SPEC sections 3 and 4, PROTOCOLS.md section 3). Recorded pushes replay
(``tocsin test --frames``); backfilled facts do not: the ``pushes`` module says why.
"""

from __future__ import annotations

from collections.abc import Callable

from tocsin import Emulator, Source, hookimpl

from .emulator import ViteEmulator
from .source import ViteConfig, ViteSource, ViteSubscription

__all__ = ["ViteConfig", "ViteEmulator", "ViteSource", "ViteSubscription"]


@hookimpl
def register_sources(register: Callable[[type[Source]], None]) -> None:
    """``plugin = "vite"`` in a ``[sources.NAME]`` table."""
    register(ViteSource)


@hookimpl
def register_emulators(register: Callable[[type[Emulator]], None]) -> None:
    """``tocsin emulate vite``, and the Vite part of ``tocsin demo``."""
    register(ViteEmulator)
