"""The emulator's chain: snapshot blocks, account chains, unreceived blocks and vmlogs.

A small in-memory model of what go-vite's event system and ledger API see. Every change
(a block added, a block rolled back) returns ``Change`` records, which the emulator fans
out to push subscriptions and filters; the ledger methods read the same state, so a
client's backfill sees exactly what it missed. Hashes are random, heights consecutive.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from .protocol import log_data

ChangeKind = Literal["snapshot", "account", "unreceived", "vmlog"]


@dataclass(frozen=True, slots=True)
class VmLog:
    topics: tuple[str, ...]
    data: str  # base64, as go-vite sends it


@dataclass(slots=True)
class SnapshotBlock:
    hash: str
    height: int
    timestamp: int


@dataclass(slots=True)
class AccountBlock:
    hash: str
    address: str
    height: int
    timestamp: int
    block_type: int  # 2 send (call), 4 receive: go-vite's BlockTypeSendCall / BlockTypeReceive
    to_address: str = ""
    send_block_hash: str = ""  # of a receive block: the send it receives
    logs: tuple[VmLog, ...] = ()


@dataclass(frozen=True, slots=True)
class Change:
    """One event as the event system sees it, before it is shaped for a subscriber."""

    kind: ChangeKind
    hash: str
    removed: bool
    height: int = 0
    address: str = ""  # account (account/vmlog) or receiver (unreceived)
    received: bool = False
    log: VmLog | None = None


def new_hash() -> str:
    return secrets.token_hex(32)


def log_of(topics: Iterable[str], payload: bytes | str = b"") -> VmLog:
    """A vmlog with ``topics`` and ``payload`` (bytes are base64-encoded, text kept)."""
    data = log_data(payload) if isinstance(payload, bytes) else payload
    return VmLog(tuple(topics), data)


@dataclass
class Chain:
    """Snapshot chain, account chains and the unreceived pool of a pretend node."""

    snapshots: list[SnapshotBlock] = field(default_factory=list)
    accounts: dict[str, list[AccountBlock]] = field(default_factory=dict)
    unreceived: dict[str, dict[str, AccountBlock]] = field(default_factory=dict)
    start_height: int = 100  # the chain did not start when the emulator did

    def __post_init__(self) -> None:
        if not self.snapshots:
            now = int(time.time())
            self.snapshots.append(SnapshotBlock(new_hash(), self.start_height, now))

    # -- reading -------------------------------------------------------------------------

    @property
    def snapshot_height(self) -> int:
        return self.snapshots[-1].height

    def account_height(self, address: str) -> int:
        blocks = self.accounts.get(address)
        return blocks[-1].height if blocks else 0

    def snapshot_blocks(self, top: int, count: int) -> list[SnapshotBlock]:
        """Up to ``count`` snapshot blocks from height ``top`` downwards (getSnapshotBlocks)."""
        out = [b for b in reversed(self.snapshots) if b.height <= top]
        return out[:count]

    def account_blocks(self, address: str, start: int, end: int) -> list[AccountBlock]:
        """Blocks of ``address`` with ``start <= height <= end``, ascending."""
        return [b for b in self.accounts.get(address, []) if start <= b.height <= end]

    def unreceived_blocks(self, address: str) -> list[AccountBlock]:
        """The send blocks to ``address`` not yet received, oldest first."""
        return list(self.unreceived.get(address, {}).values())

    def vmlogs(
        self, address: str, start: int, end: int, topics: Sequence[Sequence[str]] = ()
    ) -> list[tuple[AccountBlock, VmLog]]:
        """Logs of ``address`` at heights ``start..end`` (0 = open) matching ``topics``."""
        latest = self.account_height(address)
        start = start or 1
        end = latest if end == 0 or end > latest else end
        return [
            (block, log)
            for block in self.account_blocks(address, start, end)
            for log in block.logs
            if topics_match(topics, log.topics)
        ]

    # -- changing ------------------------------------------------------------------------

    def add_snapshot(self) -> list[Change]:
        block = SnapshotBlock(new_hash(), self.snapshot_height + 1, int(time.time()))
        self.snapshots.append(block)
        return [Change("snapshot", block.hash, False, block.height)]

    def add_account_block(
        self,
        address: str,
        logs: Iterable[VmLog] = (),
        to: str = "",
        receive: str = "",
    ) -> tuple[AccountBlock, list[Change]]:
        """A new block on ``address``'s chain: a send (to ``to``) or, with ``receive``
        (a send block hash), the receive of that send."""
        chain = self.accounts.setdefault(address, [])
        block = AccountBlock(
            hash=new_hash(),
            address=address,
            height=len(chain) + 1,
            timestamp=int(time.time()),
            block_type=4 if receive else 2,
            to_address=to,
            send_block_hash=receive,
            logs=tuple(logs),
        )
        return block, self._append(block)

    def receive(self, address: str, send_hash: str) -> list[Change]:
        """``address`` receives the unreceived send ``send_hash``."""
        if send_hash not in self.unreceived.get(address, {}):
            raise KeyError(f"no unreceived block {send_hash} for {address}")
        _, changes = self.add_account_block(address, receive=send_hash)
        return changes

    def _append(self, block: AccountBlock) -> list[Change]:
        self.accounts.setdefault(block.address, []).append(block)
        changes = [Change("account", block.hash, False, block.height, block.address)]
        changes += [
            Change("vmlog", block.hash, False, block.height, block.address, log=log)
            for log in block.logs
        ]
        if block.to_address:
            self.unreceived.setdefault(block.to_address, {})[block.hash] = block
            changes.append(Change("unreceived", block.hash, False, address=block.to_address))
        if block.send_block_hash:
            self.unreceived.get(block.address, {}).pop(block.send_block_hash, None)
            changes.append(
                Change(
                    "unreceived", block.send_block_hash, False, address=block.address, received=True
                )
            )
        return changes

    def rollback_snapshots(self, count: int = 1) -> tuple[list[SnapshotBlock], list[Change]]:
        """Drop the top ``count`` snapshot blocks (never the first); removal changes, newest first."""
        count = min(count, len(self.snapshots) - 1)
        dropped = [self.snapshots.pop() for _ in range(count)]
        return dropped, [Change("snapshot", b.hash, True, b.height) for b in dropped]

    def readd_snapshots(self, blocks: Sequence[SnapshotBlock]) -> list[Change]:
        """Put back blocks dropped by ``rollback_snapshots`` (the chain switches back)."""
        changes = []
        for block in reversed(blocks):
            block.height = self.snapshot_height + 1
            self.snapshots.append(block)
            changes.append(Change("snapshot", block.hash, False, block.height))
        return changes

    def rollback_account(
        self, address: str, count: int = 1
    ) -> tuple[list[AccountBlock], list[Change]]:
        """Drop the top ``count`` blocks of ``address``: removal changes, newest first."""
        chain = self.accounts.get(address, [])
        dropped: list[AccountBlock] = []
        changes: list[Change] = []
        for _ in range(min(count, len(chain))):
            block = chain.pop()
            dropped.append(block)
            changes.append(Change("account", block.hash, True, block.height, address))
            changes += [
                Change("vmlog", block.hash, True, block.height, address, log=log)
                for log in block.logs
            ]
            if block.to_address:
                self.unreceived.get(block.to_address, {}).pop(block.hash, None)
                changes.append(Change("unreceived", block.hash, True, address=block.to_address))
            if block.send_block_hash:
                # The receive is undone: the send is unreceived again [inferred shape].
                send = self._find(block.send_block_hash)
                if send is not None:
                    self.unreceived.setdefault(address, {})[send.hash] = send
                changes.append(
                    Change(
                        "unreceived", block.send_block_hash, True, address=address, received=True
                    )
                )
        return dropped, changes

    def readd_account(self, blocks: Sequence[AccountBlock]) -> list[Change]:
        changes: list[Change] = []
        for block in reversed(blocks):
            block.height = self.account_height(block.address) + 1
            changes += self._append(block)
        return changes

    def _find(self, block_hash: str) -> AccountBlock | None:
        for blocks in self.accounts.values():
            for block in blocks:
                if block.hash == block_hash:
                    return block
        return None


def topics_match(wanted: Sequence[Sequence[str]], topics: Sequence[str]) -> bool:
    """go-vite's FilterLog: position i of the log must be one of ``wanted[i]`` (empty = any)."""
    if len(topics) < len(wanted):
        return False
    return all(not options or topics[i] in options for i, options in enumerate(wanted))


# -- the wire shapes -------------------------------------------------------------------


def rpc_snapshot_block(block: SnapshotBlock) -> dict[str, Any]:
    """A snapshot block as the ledger API returns it [field set inferred from go-vite v2]."""
    return {
        "hash": block.hash,
        "prevHash": "",
        "height": block.height,
        "producer": "",
        "timestamp": block.timestamp,
    }


def rpc_account_block(block: AccountBlock) -> dict[str, Any]:
    """An account block as the ledger API returns it; heights are strings in go-vite v2."""
    return {
        "blockType": block.block_type,
        "hash": block.hash,
        "height": str(block.height),
        "address": block.address,
        "accountAddress": block.address,  # the v1 name
        "toAddress": block.to_address,
        "sendBlockHash": block.send_block_hash,
        "timestamp": block.timestamp,
    }


def rpc_vmlog(block: AccountBlock, log: VmLog, removed: bool | None = None) -> dict[str, Any]:
    """A vmlog item (LogsV2); ``removed`` is left out for ledger answers, which have none."""
    item: dict[str, Any] = {
        "vmlog": {"topics": list(log.topics), "data": log.data or None},
        "accountBlockHash": block.hash,
        "accountBlockHeight": str(block.height),
        "address": block.address,
    }
    if removed is not None:
        item["removed"] = removed
    return item


def change_payload(change: Change, kind: str, version: int) -> dict[str, Any]:
    """``change`` as one result item of topic ``kind`` in the v2 (or legacy v1) shape."""
    if kind == "snapshot":
        if version == 1:
            return {
                "hash": change.hash,
                "height": change.height,
                "heightStr": str(change.height),
                "removed": change.removed,
            }
        return {"hash": change.hash, "height": str(change.height), "removed": change.removed}
    if kind == "account":
        return {"hash": change.hash, "removed": change.removed}
    if kind == "account_by_address":
        if version == 1:
            return {
                "hash": change.hash,
                "height": change.height,
                "heightStr": str(change.height),
                "removed": change.removed,
            }
        return {"hash": change.hash, "height": str(change.height), "removed": change.removed}
    if kind == "unreceived":
        key = "closed" if version == 1 else "received"
        return {"hash": change.hash, key: change.received, "removed": change.removed}
    if change.log is None:
        raise ValueError("a vmlog change without its log")
    log = {"topics": list(change.log.topics), "data": change.log.data or None}
    if version == 1:
        return {
            "log": log,
            "accountBlockHash": change.hash,
            "accountHeight": str(change.height),
            "addr": change.address,
            "removed": change.removed,
        }
    return {
        "vmlog": log,
        "accountBlockHash": change.hash,
        "accountBlockHeight": str(change.height),
        "address": change.address,
        "removed": change.removed,
    }


def matches(
    kind: str,
    address: str,
    ranges: Mapping[str, tuple[int, int]],
    topics: Sequence[Sequence[str]],
    change: Change,
) -> bool:
    """Whether a subscription of ``kind`` (with its address / FilterParam) gets ``change``."""
    if kind == "snapshot":
        return change.kind == "snapshot"
    if kind == "account":
        return change.kind == "account"
    if kind == "account_by_address":
        return change.kind == "account" and change.address == address
    if kind == "unreceived":
        return change.kind == "unreceived" and change.address == address
    if change.kind != "vmlog" or change.address not in ranges or change.log is None:
        return False
    lo, hi = ranges[change.address]
    if (lo and change.height < lo) or (hi and change.height > hi):
        return False
    return topics_match(topics, change.log.topics)
