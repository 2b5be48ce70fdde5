"""tocsin's BGE exchange plugin: the ``bge`` source (v2 WebSocket) and its emulator."""

from __future__ import annotations
