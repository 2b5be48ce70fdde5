"""``tocsin test`` on stateful rules: each event's window count, why a rule did not fire,
and the alerts time alone caused before an event (replayed in the events' own time).

The CLI loads plugins by entry point (``TOCSIN_LOAD_PLUGINS=builtin,rules``): this test
needs the ``rules = "tocsin_rules"`` entry point installed."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tocsin.cli import main

CONFIG = """
[actions.console]
plugin = "log"

[[rules]]
name = "burst"
kind = "threshold"
type = "action"
match = { action = "transfer", "args.from" = "myaccount" }
window = "10m"
count = 3
title = "3 transfers out within 10m"

[[rules]]
name = "odds moved"
kind = "change"
type = "order_slip"
group_by = ["event_id", "market_id", "product_id"]
field = "price"
by = "15%"
window = "5m"
title = "odds {{ price }} on market {{ market_id }}"

[[rules]]
name = "market quiet"
kind = "absence"
type = "order_slip"
group_by = ["market_id"]
window = "2m"
title = "market {{ market_id }} stopped quoting"
"""


def transfer(id: str, time: str, frm: str = "myaccount") -> dict[str, object]:
    data = {"action": "transfer", "args": {"from": frm, "to": "bob", "quantity": "1.0000 EOS"}}
    return {"id": id, "source": "eos", "provider": "eospark", "type": "action", "time": time,
            "data": data}  # fmt: skip


def quote(id: str, time: str, price: str, market: str = "219_33753655") -> dict[str, object]:
    data = {"event_id": "40789105-e", "market_id": market, "product_id": "1", "price": price}
    return {"id": id, "source": "odds", "provider": "ckex", "type": "order_slip", "time": time,
            "data": data}  # fmt: skip


@pytest.fixture(autouse=True)
def _rules_plugin(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOCSIN_LOAD_PLUGINS", "builtin,rules")


def replay(
    tmp_path: Path, config: str, events: list[dict[str, object]], capsys: pytest.CaptureFixture[str]
) -> tuple[Path, list[str]]:
    """``tocsin test`` of ``events`` on ``config``: the events file's path and the lines printed."""
    (tmp_path / "tocsin.toml").write_text(config)
    path = tmp_path / "events.jsonl"
    path.write_text("".join(json.dumps(event) + "\n" for event in events))
    code = main(["test", "-c", str(tmp_path / "tocsin.toml"), str(path)])
    out, err = capsys.readouterr()
    assert code == 0, err  # 2 with "unknown rule kind" until the entry point is installed
    return path, out.splitlines()


def test_tocsin_test_explains_windows_and_shows_what_time_caused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    lines = [
        transfer("t1", "2026-11-22T10:00:00Z"),
        transfer("t2", "2026-11-22T10:01:00Z"),
        quote("q1", "2026-11-22T10:02:00Z", "2.10"),
        transfer("t3", "2026-11-22T10:03:00Z"),
        quote("q2", "2026-11-22T10:03:30Z", "2.45"),
        transfer("t4", "2026-11-22T10:04:00Z", frm="someone"),
        quote("q3", "2026-11-22T10:06:00Z", "1.90", market="1_31260330"),
        transfer("t5", "2026-11-22T10:13:00Z"),
    ]
    events, out = replay(tmp_path, CONFIG, lines, capsys)
    expected = [
        f"{events}:1: no alert from 'burst': 1 of 3 within 10m",
        f"{events}:2: no alert from 'burst': 2 of 3 within 10m",
        f"{events}:3: no alert from 'odds moved': 2.10 is the only value within 5m;"
        " fires on a move of 15%",
        f"{events}:3: no alert from 'market quiet': last event 0s ago; fires after 2m",
        f"{events}:4: [firing] burst -> console",
        "    title: 3 transfers out within 10m",
        "    burst: 3 of 3 within 10m; firing",
        f"{events}:5: [firing] odds moved -> console",
        "    title: odds 2.45 on market 219_33753655",
        "    odds moved: 2.45 is the only value within 5m; fires on a move of 15%",
        f'{events}:6: no alert from \'burst\': match args.from is "someone", not "myaccount"',
        f"{events}:7 (before): [firing] market quiet -> console",
        "    title: market 219_33753655 stopped quoting",
        f"{events}:8 (before): [resolved] burst -> console",
        "    title: [resolved] 3 transfers out within 10m",
        f"{events}:8 (before): [firing] market quiet -> console",
        "    title: market 1_31260330 stopped quoting",
        f"{events}:8: no alert from 'burst': 1 of 3 within 10m",
        "8 event(s), 5 alert(s) would be sent",
    ]
    for line in expected:
        assert line in out, f"missing: {line}\n" + "\n".join(out)


def test_tocsin_test_shows_every_repeat_due_in_a_gap_between_events(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The daemon ticks every second; a replay ticks at each time a rule wakes, so repeats
    # due hours before the next event are all shown, each at its own time.
    config = CONFIG.replace(
        'window = "2m"\n', 'window = "10m"\nrealert = "30m"\nrealert_backoff = true\n'
    )
    lines = [
        quote("q1", "2026-11-22T10:00:00Z", "2.10"),
        transfer("t1", "2026-11-22T14:00:00Z", frm="someone"),
    ]
    events, out = replay(tmp_path, config, lines, capsys)
    fired = [i for i, line in enumerate(out) if "[firing] market quiet" in line]
    assert all(out[i].startswith(f"{events}:2 (before): ") for i in fired)
    # Silent from 10:00: fires at 10:10, repeats 30m later, then with backoff 1h and 2h later.
    assert [out[i + 1] for i in fired] == [
        "    at:    2026-11-22T10:10:00.000Z",
        "    at:    2026-11-22T10:40:00.000Z",
        "    at:    2026-11-22T11:40:00.000Z",
        "    at:    2026-11-22T13:40:00.000Z",
    ]


def test_a_replay_starts_its_time_at_its_first_event(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # An absence without group_by is watched from when the rule is loaded: in a replay,
    # the first event's time, never the epoch (which would be a silence of 56 years).
    config = (
        '[actions.console]\nplugin = "log"\n[[rules]]\nname = "stalled"\nkind = "absence"\n'
        'type = "order_slip"\nwindow = "1m"\n'
    )
    lines = [
        transfer("t1", "2026-11-22T10:00:00Z"),
        quote("q1", "2026-11-22T10:00:30Z", "2.10"),
        transfer("t2", "2026-11-22T10:02:00Z"),
    ]
    events, out = replay(tmp_path, config, lines, capsys)
    fired = [line for line in out if "[firing] stalled" in line]
    assert fired == [f"{events}:3 (before): [firing] stalled -> console"]  # at 10:01:30
    assert out[out.index(fired[0]) + 1] == "    at:    2026-11-22T10:01:30.000Z"


def test_a_fired_rule_s_window_is_shown_under_its_own_alert(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    head, _burst, moved, quiet = CONFIG.split("[[rules]]")
    config = "[[rules]]".join([head, quiet, moved])  # the quiet rule first
    lines = [
        quote("q1", "2026-11-22T10:02:00Z", "2.10"),
        quote("q2", "2026-11-22T10:03:30Z", "2.45"),
    ]
    events, out = replay(tmp_path, config, lines, capsys)
    at = out.index(f"{events}:2: [firing] odds moved -> console")
    assert out[at + 1 : at + 4] == [
        "    title: odds 2.45 on market 219_33753655",
        out[at + 2],  # the body
        "    odds moved: 2.45 is the only value within 5m; fires on a move of 15%",
    ]
    assert (
        out[at + 4]
        == f"{events}:2: no alert from 'market quiet': last event 0s ago; fires after 2m"
    )


def test_a_time_without_a_zone_is_utc_whatever_the_machine_s_zone(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The kinds read "2026-11-22T10:00:00" as UTC; the replay's clock read it as local
    # time, so in New York the events were 5 h old to the window and the rule never fired.
    monkeypatch.setenv("TZ", "America/New_York")
    time.tzset()
    try:
        config = CONFIG.replace("count = 3\n", 'count = 2\ntime_field = "event"\n', 1)
        lines = [transfer("t1", "2026-11-22T10:00:00"), transfer("t2", "2026-11-22T10:01:00")]
        events, out = replay(tmp_path, config, lines, capsys)
    finally:
        monkeypatch.undo()
        time.tzset()
    assert f"{events}:2: [firing] burst -> console" in out


def test_recorded_frames_replay_in_the_time_they_were_received(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Three transfers pushed within a second, of blocks 5 minutes apart (a backlog): the
    # daemon counts them at receipt (time_field = "receipt", the default) and fires; the
    # replay used the block times and did not.
    from tocsin_eospark.emulator import eos_time, transaction
    from tocsin_eospark.emulator import transfer as eos_transfer
    from tocsin_eospark.protocol import data_frame

    monkeypatch.setenv("TOCSIN_LOAD_PLUGINS", "builtin,rules,eospark")
    config = (
        '[sources.eos]\nplugin = "eospark"\napi_key = "k"\n'
        'subscriptions = [{ account = "myaccount", contract = "eosio.token" }]\n'
        + CONFIG[: CONFIG.index('[[rules]]\nname = "odds moved"')].replace('"10m"', '"1m"')
    )
    (tmp_path / "tocsin.toml").write_text(config)
    frames = tmp_path / "frames.jsonl"
    with frames.open("w") as out:
        for n in range(3):
            trx = transaction(
                [eos_transfer("myaccount", "bob", "1.0000 EOS", f"m{n}")],
                timestamp=eos_time(1_763_805_600 + 300 * n),
            )
            out.write(json.dumps({"t": 1_763_806_500 + 0.3 * n, "frame": data_frame(trx)}) + "\n")
    code = main(
        ["test", "-c", str(tmp_path / "tocsin.toml"), "--frames", str(frames), "--source", "eos"]
    )
    printed, err = capsys.readouterr()
    assert code == 0, err
    assert f"{frames}:3: [firing] burst -> console" in printed.splitlines()
