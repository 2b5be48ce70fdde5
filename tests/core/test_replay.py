"""The readers of ``tocsin test``: frame records, the factory stamping receive times."""

from __future__ import annotations

import io
from pathlib import Path

import orjson
import pytest

from tocsin import Event
from tocsin.events import utc_iso
from tocsin.record import Recorder
from tocsin.replay import ReplayFactory, envelopes, frame_record, frames, numbered_lines


def test_recorded_frames_replay_at_their_receive_time(tmp_path: Path) -> None:
    out = io.BytesIO()
    recorder = Recorder("feed", "demo", out, count=3)
    recorder.received('{"n": 1}')
    recorder.received(b"\x00\xffbinary")
    assert not recorder.done.is_set()
    recorder.received('{"n": 3}')
    assert recorder.done.is_set()
    recorder.received('{"n": 4}')  # past the count: the source is being stopped
    path = tmp_path / "frames.jsonl"
    path.write_bytes(out.getvalue())
    records = [orjson.loads(line) for line in out.getvalue().splitlines()]
    assert [sorted(r) for r in records] == [["frame", "t"], ["b64", "t"], ["frame", "t"]]
    assert recorder.seen.frames == 3

    factory = ReplayFactory("feed", "demo")
    seen: list[str | bytes] = []

    def parse(frame: str | bytes) -> list[Event]:
        seen.append(frame)
        if isinstance(frame, bytes):
            return []  # a control frame
        return [factory.event("thing", orjson.loads(frame), id=str(len(seen)))]

    skipped: list[tuple[str, str]] = []
    events = list(frames(numbered_lines(path), parse, factory, lambda w, r: skipped.append((w, r))))
    assert seen == ['{"n": 1}', b"\x00\xffbinary", '{"n": 3}']
    assert skipped == []
    assert [(where, e.data) for where, e in events] == [
        (f"{path}:1", {"n": 1}),
        (f"{path}:3", {"n": 3}),
    ]
    # No provider time: the event's time is when its frame was received, as live.
    for (_, event), record in zip(events, [records[0], records[2]], strict=True):
        assert event.received == record["t"]
        assert event.time == utc_iso(record["t"])
        assert (event.source, event.provider) == ("feed", "demo")


@pytest.mark.parametrize(
    "line, reason",
    [
        (b"[1]", 'not a frame record: expected {"t": ..., "frame": ...}'),
        (b'{"t": true, "frame": "x"}', 'no receive time "t"'),
        (b'{"t": "1", "frame": "x"}', 'no receive time "t"'),
        (b'{"t": 1, "frame": 2}', 'no "frame" (text) or "b64" (binary)'),
        (b'{"t": 1, "b64": "a"}', '"b64" is not base64'),
        (b'{"t": 1, "frame": "boom"}', "the source's frame parser failed: KeyError: 'x'"),
        (b'{"t": 1, "frame": "bad"}', "malformed frame: no good"),
    ],
)
def test_bad_records_are_skipped_with_a_reason(tmp_path: Path, line: bytes, reason: str) -> None:
    path = tmp_path / "f.jsonl"
    path.write_bytes(line + b"\n" + frame_record(2.0, "ok"))

    def parse(frame: str | bytes) -> list[Event]:
        if frame == "boom":
            raise KeyError("x")  # a plugin's bug
        if frame == "bad":
            raise ValueError("no good")
        return [factory.event("t", {}, id="ok")]

    factory = ReplayFactory("s", "p")
    skipped: list[tuple[str, str]] = []
    events = list(frames(numbered_lines(path), parse, factory, lambda w, r: skipped.append((w, r))))
    assert skipped == [(f"{path}:1", reason)]
    assert [e.id for _, e in events] == ["ok"]


def test_envelopes_skip_blank_and_bad_lines(tmp_path: Path) -> None:
    path = tmp_path / "e.jsonl"
    path.write_text('\n{"id": "a", "source": "s", "type": "t"}\n  \n{"id": 1}\n')
    skipped: list[tuple[str, str]] = []
    events = list(envelopes(numbered_lines(path), lambda w, r: skipped.append((w, r))))
    assert [(w, e.id) for w, e in events] == [(f"{path}:2", "a")]
    assert skipped == [(f"{path}:4", "missing or non-string field(s): id, source, type")]


def test_a_file_that_cannot_be_written_stops_the_recording() -> None:
    class Full(io.BytesIO):
        def write(self, data: object) -> int:
            raise OSError(28, "No space left on device")

    recorder = Recorder("feed", "demo", Full(), count=None)
    recorder.received("frame")
    assert recorder.done.is_set()
    assert recorder.seen.error == "No space left on device"
    assert recorder.seen.frames == 0
