"""The seed's reading of provider credentials on the client socket (PROTOCOLS.md section 4):
``seed_provider_on_client`` off (the provider's code: 403) and on (the seed: accepted)."""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import quote

import anyio
import pytest
from tocsin_ewallet.emulator import (
    DEMO_ACCESS_KEY,
    DEMO_SECRET_KEY,
    DEMO_USER,
    EWalletEmulator,
)
from tocsin_ewallet.protocol import ACCEPT, authorization
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidStatus

from .ewallet_helpers import CLIENT_AUTH, PROVIDER_AUTH, REQUEST_TOPIC

PROVIDER_BASIC = authorization("Basic", DEMO_ACCESS_KEY, DEMO_SECRET_KEY)
OTHER_USER = "usr_01hsomeoneelse0000000000"


def headers(auth: str) -> dict[str, str]:
    return {"Authorization": auth, "Accept": ACCEPT}


async def status_of(url: str, given: dict[str, str]) -> int:
    """The HTTP status of a refused upgrade (eWallet's 403 has an empty body)."""
    with pytest.raises(InvalidStatus) as caught:
        async with connect(url, additional_headers=given, open_timeout=5):
            pass
    assert caught.value.response.body == b""
    return caught.value.response.status_code


async def join(ws: ClientConnection, topic: str, ref: str = "1") -> dict[str, Any]:
    await ws.send(json.dumps({"topic": topic, "event": "phx_join", "ref": ref, "data": {}}))
    with anyio.fail_after(5):
        reply = json.loads(await ws.recv())
    assert isinstance(reply, dict) and reply["event"] == "phx_reply" and reply["ref"] == ref
    return reply


async def test_provider_credentials_are_refused_on_the_client_socket_by_default() -> None:
    async with EWalletEmulator() as emu:
        assert emu.seed_provider_on_client is False
        for auth in (PROVIDER_AUTH, PROVIDER_BASIC):
            assert await status_of(emu.url, headers(auth)) == 403
            async with connect(emu.admin_url, additional_headers=headers(auth), open_timeout=5):
                pass  # the admin socket is where the provider's code takes them
        async with connect(emu.url, additional_headers=headers(CLIENT_AUTH), open_timeout=5) as ws:
            assert (await join(ws, REQUEST_TOPIC))["success"] is True
    assert [(h.path, h.accepted) for h in emu.handshakes] == [
        ("/api/client/socket", False),
        ("/api/admin/socket", True),
        ("/api/client/socket", False),
        ("/api/admin/socket", True),
        ("/api/client/socket", True),
    ]
    assert emu.refused == 2 and emu.connections == 3


@pytest.mark.parametrize("auth", [PROVIDER_AUTH, PROVIDER_BASIC], ids=["OMGProvider", "Basic"])
async def test_the_seed_reading_accepts_provider_credentials_on_the_client_socket(
    auth: str,
) -> None:
    async with EWalletEmulator(seed_provider_on_client=True) as emu:
        emu.add_user(OTHER_USER, "addr-someone-else")
        async with connect(emu.url, additional_headers=headers(auth), open_timeout=5) as ws:
            # A provider sees every user's channel, not only one user's.
            for n, topic in enumerate((f"user:{DEMO_USER}", f"user:{OTHER_USER}", REQUEST_TOPIC)):
                assert (await join(ws, topic, str(n)))["success"] is True
            # Still the client socket: its broken channels crash whoever joins them.
            refused = await join(ws, "account:acc_1", "9")
            assert refused["success"] is False
            assert refused["error"]["description"] == "join crashed"
        # The query-string form of the headers is read the same way.
        query = f"?headers[Authorization]={quote(auth)}&headers[Accept]={quote(ACCEPT)}"
        async with connect(emu.url + query, open_timeout=5) as ws:
            assert (await join(ws, REQUEST_TOPIC))["success"] is True
    assert [h.accepted for h in emu.handshakes] == [True, True]
    assert emu.connections == 2 and emu.refused == 0


async def test_the_seed_reading_still_checks_the_credentials() -> None:
    async with EWalletEmulator(seed_provider_on_client=True) as emu:
        emu.admins["usr_admin1"] = "admin-token"
        refused = (
            authorization("OMGProvider", DEMO_ACCESS_KEY, "wrong-secret"),
            authorization("Basic", "unknown-access-key", DEMO_SECRET_KEY),
            authorization("OMGAdmin", "usr_admin1", "admin-token"),  # admin socket only
            authorization("OMGClient", DEMO_ACCESS_KEY, DEMO_SECRET_KEY),  # not a client key
        )
        for auth in refused:
            assert await status_of(emu.url, headers(auth)) == 403
        assert await status_of(emu.url, {"Authorization": PROVIDER_AUTH}) == 403  # no Accept
        async with connect(emu.url, additional_headers=headers(CLIENT_AUTH), open_timeout=5) as ws:
            # Client credentials are unchanged: the user's own channels only.
            assert (await join(ws, REQUEST_TOPIC))["success"] is True
            assert (await join(ws, f"user:{OTHER_USER}", "2"))["success"] is False
    assert emu.refused == 5 and emu.connections == 1
