"""The emulator's eWallet data: parties, transaction requests and consumptions.

Consumptions are plain dicts shaped like the seed's Swagger excerpt, because that is
what the server broadcasts and what a rule reads.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass
from typing import Any

from tocsin import utc_iso

DEMO_TOKEN = "tok_OMG_01cbffwvj6ma9a9gg1tb24880q"
_CROCKFORD = "0123456789abcdefghjkmnpqrstvwxyz"

# Error of a failed finalize, by the status the consumption ended in (PROTOCOLS.md 4).
FAILURES = {
    "failed": (
        "transaction:insufficient_funds",
        "The specified wallet does not contain enough funds.",
    ),
    "expired": ("transaction_consumption:expired", "The specified consumption has expired."),
    "pending": ("transaction_consumption:unfinalized", "The consumption is not finalized yet."),
}


def new_id(prefix: str) -> str:
    """An eWallet-style id: prefix + a lowercase ULID (time-ordered, unique across runs)."""
    value = (int(time.time() * 1000) << 80) | secrets.randbits(80)
    chars = [_CROCKFORD[(value >> shift) & 31] for shift in range(125, -1, -5)]
    return f"{prefix}_{''.join(chars)}"


@dataclass
class Party:
    """One side of a transaction: a wallet address, its user, or an account."""

    address: str
    user_id: str | None = None
    account_id: str | None = None

    def topics(self) -> list[str]:
        out = [f"address:{self.address}"]
        if self.user_id:
            out.append(f"user:{self.user_id}")
        if self.account_id:
            out.append(f"account:{self.account_id}")
        return out


@dataclass
class TransactionRequest:
    """A transaction request that consumptions are made against."""

    id: str
    owner: Party
    token_id: str = DEMO_TOKEN

    def topics(self) -> list[str]:
        """Where ``transaction_consumption_request`` is broadcast."""
        return [f"transaction_request:{self.id}", *self.owner.topics()]


def new_consumption(
    request: TransactionRequest, consumer: Party, amount: int, consumption_id: str
) -> dict[str, Any]:
    """A pending consumption of ``request`` by ``consumer``."""
    now = utc_iso()
    return {
        "object": "transaction_consumption",
        "id": consumption_id,
        "socket_topic": f"transaction_consumption:{consumption_id}",
        "status": "pending",
        "amount": amount,
        "estimated_consumption_amount": amount,
        "token_id": request.token_id,
        "token": {"object": "token", "id": request.token_id, "symbol": "OMG", "subunit_to_unit": 1},
        "correlation_id": None,
        "idempotency_token": new_id("idem"),
        "transaction_id": None,
        "transaction": None,
        "user_id": consumer.user_id,
        "user": {"object": "user", "id": consumer.user_id} if consumer.user_id else None,
        "account_id": consumer.account_id,
        "account": None,
        "transaction_request_id": request.id,
        "transaction_request": {
            "object": "transaction_request",
            "id": request.id,
            "type": "receive",
        },
        "address": consumer.address,
        "metadata": {},
        "encrypted_metadata": {},
        "expiration_date": None,
        "created_at": now,
        "updated_at": now,
        "approved_at": None,
        "rejected_at": None,
        "confirmed_at": None,
        "failed_at": None,
        "expired_at": None,
    }


def consumer_of(consumption: dict[str, Any]) -> Party:
    return Party(consumption["address"], consumption["user_id"], consumption["account_id"])


def settle(consumption: dict[str, Any], status: str) -> dict[str, Any]:
    """Move ``consumption`` to ``status``, stamping ``updated_at`` and ``<status>_at``."""
    if consumption["status"] != status:
        now = utc_iso()
        consumption["status"] = status
        consumption["updated_at"] = now
        if status in ("approved", "rejected", "confirmed", "failed", "expired"):
            consumption[f"{status}_at"] = now
        if status == "confirmed" and consumption["transaction_id"] is None:
            consumption["transaction_id"] = new_id("txn")
    return consumption
