"""Frames recorded from a live run against the emulator replay into the same events."""

from __future__ import annotations

from typing import Any

import pytest
from tocsin_ckex.emulator import CkexEmulator
from tocsin_ckex.source import CkexSource

from tocsin import Event
from tocsin.testing import RecordingContext

from .conftest import RunSource
from .test_source import FANCY, QUIET, SB, settings


def facts(events: list[Event]) -> list[dict[str, Any]]:
    """What replay must reproduce. A sportsbook quote carries no time of the provider's:
    its ``time`` is when it was received, so only a fancy quote's is compared. A move's id
    holds its move number, which live is the clock's (so a restart never reuses one) and
    in a replay counts 1, 2, 3: only a product's first quote has the same id both ways."""
    out, seen = [], set()
    for event in events:
        envelope = event.envelope()
        if event.type == "order_slip":
            del envelope["time"]
        product = tuple(
            event.data.get(k) for k in ("event_id", "market_id", "product_id", "mid", "pid")
        )
        if product in seen:
            del envelope["id"]
        seen.add(product)
        out.append(envelope)
    return out


def parser(emu: CkexEmulator) -> Any:
    config = CkexSource.Config.model_validate({"plugin": "ckex", **settings(emu)})
    parse = CkexSource.frame_parser(config, RecordingContext("odds", "ckex"))
    assert parse is not None
    return parse


async def test_recorded_frames_replay_into_the_live_events(run_source: RunSource) -> None:
    async with CkexEmulator(**QUIET) as emu:
        await emu.quote(SB.event_id, SB.market_id, "1", "1.61", push=False)
        await emu.quote(SB.event_id, SB.market_id, "2", "2.37", push=False)
        await emu.fancy_quote(
            FANCY.event_id, FANCY.market_id, "1", bl="181", bo="0", ll="181", lo="0", push=False
        )

        async def body(source: CkexSource, ctx: RecordingContext) -> None:
            await ctx.wait_until(lambda: len(ctx.events) == 3)  # the snapshots
            await emu.push(SB.event_id, SB.market_id)  # the same snapshot again: no news
            await emu.quote(SB.event_id, SB.market_id, "1", "1.75")  # a move
            await emu.send_alive()
            await emu.send_raw("{not json")
            await emu.send_raw('{"type": "order-slip", "data": [{"event_id": "x"}]}')
            await emu.flip_status(SB.event_id, SB.market_id, "0")  # both locked
            await emu.quote(SB.event_id, SB.market_id, "1", "1.61", status="1")  # back: a new fact
            await emu.fancy_quote(
                FANCY.event_id, FANCY.market_id, "1", bl="185", bo="0", ll="185", lo="0"
            )
            await ctx.wait_until(lambda: len(ctx.events) == 8)

        _, ctx = await run_source(settings(emu), body)
        parse = parser(emu)

    assert len(ctx.rejects) == 2  # the bad JSON, and the quote lacking its fields
    events: list[Event] = []
    bad = 0
    for frame in ctx.frames:
        try:
            events.extend(parse(frame))
        except ValueError:
            bad += 1
    assert bad == 1  # a batch with a bad item keeps its good ones: only the bad JSON raises
    assert facts(events) == facts(ctx.events)
    # The QuoteBook's memory is the parser's too: 1.61 after 1.75 is a new fact, with its own id.
    ids = [e.id for e in events if e.data.get("product_id") == "1"]
    assert len(ids) == len(set(ids)) == 4


async def test_control_frames_give_no_event_and_garbage_raises() -> None:
    async with CkexEmulator(**QUIET) as emu:
        parse = parser(emu)
    assert parse('{"type": "alive"}') == [] and parse("{}") == []
    assert parse('{"type": "error", "error": "bad"}') == []
    for broken in ("", "[1]", '{"type": "nope"}', b"\xff\xfe"):
        with pytest.raises(ValueError):
            parse(broken)
