"""The ``bge`` source's config table: ``[sources.NAME]`` with ``plugin = "bge"``.

Each subscription is checked against what BGE's v2 API takes (PROTOCOLS.md section 2),
so a wrong channel is a config error with its path rather than a refusal at run time.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from tocsin import (
    ConfigModel,
    Duration,
    ResumableSourceConfig,
    Secret,
    format_duration,
    parse_duration,
)

from .protocol import (
    BIZ_OF,
    DEFAULT_URL,
    EVENT_TYPES,
    INTERVAL_SECONDS,
    ORDERBOOK_LEVELS,
    ChannelKey,
    canonical_interval,
    channel_key,
)

SERVER_IDLE = 30.0  # BGE closes a session nothing was pushed on for 30 s
KEEPALIVE = 20.0  # the default keepalive: well inside SERVER_IDLE
_PRODUCT = r"[A-Za-z0-9]{1,20}(?:_[A-Za-z0-9]{1,20}){1,3}"


class BGESubscription(ConfigModel):
    """One ``subscriptions`` entry: ``{biz, type, product, interval?}``.

    ``biz`` may be left out (each type belongs to one); ``type`` is case-insensitive
    (``orderBook``); ``product`` is a pair like ``BTC_USDT`` (upper-cased), or ``all``
    for ``orders``; ``interval`` is required for candles (1min, 5min, 15min, 30min,
    60min/1hour, 4hour, 1day, 1week, 1mon), is the orderbook level ``"0"``...``"11"``
    (default ``"0"``), and is refused elsewhere.
    """

    biz: Literal["market", "exchange"] | None = None
    type: str
    product: str
    interval: str = ""

    @model_validator(mode="before")
    @classmethod
    def _spellings(cls, value: Any) -> Any:
        if not isinstance(value, dict):
            return value
        table = dict(value)
        kind = table.get("type")
        if isinstance(kind, str):
            kind = table["type"] = kind.strip().lower()
            if kind == "orderbook":
                table.setdefault("interval", "0")
        product = table.get("product")
        if isinstance(product, str):
            product = product.strip()
            table["product"] = "all" if product.lower() == "all" else product.upper()
        interval = table.get("interval")
        if isinstance(interval, int) and not isinstance(interval, bool):
            table["interval"] = str(interval)
        elif isinstance(interval, str):
            table["interval"] = interval.strip()
        return table

    @model_validator(mode="after")
    def _channel(self) -> BGESubscription:
        if self.type not in BIZ_OF:
            raise ValueError(f"unknown type {self.type[:40]!r}: BGE has {', '.join(EVENT_TYPES)}")
        biz = BIZ_OF[self.type]
        if self.biz is not None and self.biz != biz:
            kind = "a private" if biz == "exchange" else "a public"
            raise ValueError(f'{self.type} is {kind} channel: biz = "{biz}"')
        if self.product != "all" and not re.fullmatch(_PRODUCT, self.product):
            raise ValueError(f"product {self.product[:40]!r} is not a trading pair like BTC_USDT")
        if self.product == "all" and self.type == "assets":
            raise ValueError(
                'assets takes one product: BGE answers product "all" with an error'
                " (only orders takes all)"
            )
        if self.product == "all" and self.type != "orders":
            raise ValueError(f'product "all" is only for orders, not {self.type}')
        if self.type == "candles":
            if canonical_interval(self.interval) not in INTERVAL_SECONDS:
                raise ValueError(
                    f"candles need an interval: one of 1min, 5min, 15min, 30min, 60min (or"
                    f" 1hour), 4hour, 1day, 1week, 1mon, not {self.interval[:20]!r}"
                )
        elif self.type == "orderbook":
            if self.interval not in ORDERBOOK_LEVELS:
                raise ValueError(
                    f'the orderbook interval is a level "0" to "11", not {self.interval[:20]!r}'
                )
        elif self.interval:
            raise ValueError(f"{self.type} takes no interval")
        return self

    @property
    def channel_biz(self) -> str:
        return self.biz or BIZ_OF[self.type]

    @property
    def private(self) -> bool:
        return self.channel_biz == "exchange"

    @property
    def key(self) -> ChannelKey:
        return channel_key(self.type, self.product, self.interval)


class BGEConfig(ResumableSourceConfig):
    """``[sources.NAME]`` with ``plugin = "bge"``; unknown keys are errors.

    Besides the common keys: ``url``; ``access_key`` and ``secret_key`` (together, and
    needed only for ``biz = "exchange"`` subscriptions); ``subscriptions``; ``zip`` (ask
    for gzip frames); ``keepalive`` (the ``req`` sent after that long without data, under
    BGE's 30 s and ``stale_after``; by default 20 s, or half of a shorter ``stale_after``); ``seq_gaps`` (report a skipped ``seq_id`` on ticker and candles as a
    ``source.gap``: it assumes one number per push on a channel, which BGE's documents
    suggest without saying); ``backfill`` and ``backfill_limit`` (candles only).

    ``stale_after`` keeps the common 60 s: BGE does not say how often it pings, and a
    live session is never that quiet (pings, pushes, or the keepalive's answers).
    """

    url: str = DEFAULT_URL
    access_key: Secret | None = None
    secret_key: Secret | None = None
    subscriptions: list[BGESubscription] = Field(min_length=1)
    zip: bool = False
    keepalive: Duration = Field(default=KEEPALIVE, ge=0.1)  # or half a shorter stale_after
    seq_gaps: bool = True

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        if not value.startswith(("ws://", "wss://")):
            raise ValueError("expected a ws:// or wss:// URL")
        return value

    @model_validator(mode="before")
    @classmethod
    def _keepalive(cls, data: Any) -> Any:
        """No ``keepalive``: 20 s, or half of a shorter ``stale_after`` (any from 1s)."""
        if not isinstance(data, dict) or "keepalive" in data:
            return data
        try:
            stale_after = parse_duration(
                data.get("stale_after", cls.model_fields["stale_after"].default)
            )
        except (ValueError, TypeError):
            return data  # the field's own check says what is wrong
        return {**data, "keepalive": min(KEEPALIVE, stale_after / 2)}

    @model_validator(mode="after")
    def _check(self) -> BGEConfig:
        keys = [s.key for s in self.subscriptions]
        twice = sorted({k.label for k in keys if keys.count(k) > 1})
        if twice:
            raise ValueError(f"subscriptions: listed more than once: {', '.join(twice)}")
        if (self.access_key is None) != (self.secret_key is None):
            given, missing = (
                ("access_key", "secret_key")
                if self.secret_key is None
                else ("secret_key", "access_key")
            )
            raise ValueError(f"{given} needs {missing}")
        private = [s.key.label for s in self.subscriptions if s.private]
        if private and self.access_key is None:
            raise ValueError(
                f"private channels ({', '.join(private)}) need access_key and secret_key"
            )
        if self.keepalive >= SERVER_IDLE:
            raise ValueError(
                "keepalive must be under 30s: BGE closes a session with no push for 30 s"
            )
        if self.keepalive >= self.stale_after:
            raise ValueError(
                f"keepalive ({format_duration(self.keepalive)}) must be shorter than"
                f" stale_after ({format_duration(self.stale_after)})"
            )
        return self
