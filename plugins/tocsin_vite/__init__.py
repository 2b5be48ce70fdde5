"""tocsin's Vite plugin: the ``vite`` source (go-vite JSON-RPC subscriptions) and its emulator."""

from __future__ import annotations
