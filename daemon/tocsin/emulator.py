"""The base class of provider emulators: protocol-faithful local servers of a provider.

Each provider plugin ships one, registered through ``register_emulators``. Tests drive it
through its control methods (push data, drop connections, stop heartbeats, reject auth,
count connections, record what clients sent); ``tocsin demo`` and ``tocsin emulate`` run
it with ``demo_traffic()``. Emulators listen on loopback only.
"""

from __future__ import annotations

from typing import Any, ClassVar, Self

from websockets.asyncio.server import Server, ServerConnection, serve


class Emulator:
    """A local server speaking one provider's protocol.

    Subclasses set ``name`` (the provider's plugin name) and implement ``start``,
    ``aclose``, ``url``, ``demo_source`` and ``demo_traffic``.
    """

    name: ClassVar[str]

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host = host
        self.port = port

    async def start(self) -> None:
        """Bind and serve; afterwards ``port`` is the real port (``0`` picks a free one)."""
        raise NotImplementedError

    async def aclose(self) -> None:
        """Close every connection and stop serving."""
        raise NotImplementedError

    @property
    def url(self) -> str:
        """The WebSocket URL a client connects to (without credentials)."""
        raise NotImplementedError

    def demo_source(self) -> dict[str, Any]:
        """The ``[sources.NAME]`` table that connects a daemon to this emulator."""
        raise NotImplementedError

    async def demo_traffic(self) -> None:
        """Push a scripted stream of realistic traffic until cancelled."""
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


class WebSocketEmulator(Emulator):
    """An emulator served by websockets: it owns the server's start, port and close.

    Subclasses set ``path`` (what ``url`` ends with), implement ``handle`` (one client
    connection) and may override ``serve_options`` (keyword arguments of websockets'
    ``serve``: ``process_request``, ``max_size``, ``logger``, ``ping_interval``...).
    """

    path: ClassVar[str] = "/"

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        super().__init__(host, port)
        self._server: Server | None = None

    async def handle(self, ws: ServerConnection) -> None:
        """Serve one client connection until it ends."""
        raise NotImplementedError

    def serve_options(self) -> dict[str, Any]:
        """Keyword arguments for websockets' ``serve``; none by default."""
        return {}

    async def start(self) -> None:
        self._server = await serve(self.handle, self.host, self.port, **self.serve_options())
        self.port = self._server.sockets[0].getsockname()[1]

    async def aclose(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    @property
    def url(self) -> str:
        return f"ws://{self.host}:{self.port}{self.path}"
