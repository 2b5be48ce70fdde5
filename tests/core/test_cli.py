"""The command line as a user runs it: real subprocesses, exit codes, no tracebacks."""

from __future__ import annotations

import base64
import fcntl
import json
import os
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def tocsin(*args: str, cwd: Path | None = None, **env: str) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, "TOCSIN_LOAD_PLUGINS": "builtin", **env}
    return subprocess.run(
        [sys.executable, "-m", "tocsin.cli", *args],
        capture_output=True,
        text=True,
        env=full_env,
        cwd=cwd,
        timeout=60,
    )


def rules_and_events(tmp_path: Path, rules: str, events: str) -> tuple[Path, Path]:
    """A config of ``rules`` and a JSONL file of ``events``, for tocsin test."""
    config, lines = tmp_path / "t.toml", tmp_path / "e.jsonl"
    config.write_text(rules)
    lines.write_text(events)
    return config, lines


@pytest.mark.parametrize(
    "args, message",
    [
        ([], "a command is required"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
        (["check", "--nope"], "unrecognized arguments: --nope"),
        (["check", "-c", "/does/not/exist.toml"], "/does/not/exist.toml: no such file"),
        (["outbox", "retry", "-c", "x.toml"], "no such file"),
        (["emulate", "eospark", "--port", "99999"], "99999 is not a port number"),
        (["emulate", "eospark", "--port", "-1"], "-1 is not a port number"),
    ],
)
def test_usage_errors_exit_2_with_one_sentence(args: list[str], message: str) -> None:
    run = tocsin(*args)
    assert run.returncode == 2
    assert message in run.stderr
    assert "Traceback" not in run.stderr
    assert len(run.stderr.strip().splitlines()) <= 2


def test_init_writes_a_config_that_checks(tmp_path: Path) -> None:
    run = tocsin("init", str(tmp_path / "new.toml"))
    assert run.returncode == 0 and "wrote" in run.stdout
    check = tocsin("check", "-c", str(tmp_path / "new.toml"), TOCSIN_HOOK_SECRET="x-secret-x")
    assert check.returncode == 0, check.stderr
    # Under the unit, the state goes where systemd's StateDirectory= says: none is set.
    assert "state_dir =" not in (tmp_path / "new.toml").read_text()
    again = tocsin("init", str(tmp_path / "new.toml"))
    assert again.returncode == 2 and "--force" in again.stderr
    assert tocsin("init", "--force", str(tmp_path / "new.toml")).returncode == 0


def test_test_command_on_the_example(tmp_path: Path) -> None:
    run = tocsin(
        "test",
        "-c",
        str(ROOT / "rules.example.toml"),
        str(ROOT / "examples/events.jsonl"),
        TOCSIN_HOOK_SECRET="s",
        # the example's sources need them
        TOCSIN_LOAD_PLUGINS="builtin,eospark,ewallet,ckex,vite,bge,rules",
    )
    assert run.returncode == 0, run.stderr
    assert "[firing] incoming transfer -> console, hook" in run.stdout
    assert "title: 250.0000 EOS from alice" in run.stdout
    assert "title: consumption cns_01 confirmed" in run.stdout
    assert "title: odds 2.37 on event 40789105-e market 219_33753655" in run.stdout
    assert "1.85" not in run.stdout.split("odds")[1].splitlines()[0]
    # Why each rule taking an event did not alert: the first failing check, or what held it.
    assert "no alert from 'incoming transfer': a duplicate of an alert already made" in run.stdout
    assert "no alert from 'incoming transfer': throttled (one alert per 1m per group)" in run.stdout
    assert (
        'no alert from \'incoming transfer\': match args.to is "someoneelse", not "myaccount"'
        in run.stdout
    )
    assert "no alert from 'odds above 2.0': when is false" in run.stdout
    assert run.stdout.strip().splitlines()[-1] == (
        "9 event(s), 4 alert(s) would be sent, 1 throttled, 1 duplicate(s) skipped"
    )


def test_test_command_skips_bad_lines(tmp_path: Path) -> None:
    config, events = rules_and_events(
        tmp_path,
        '[[rules]]\nname = "any"\nmatch = { x = 1 }\n',
        '{"id": "1", "source": "s", "type": "t", "data": {"x": 1}}\nnot json\n{"id": 2}\n',
    )
    run = tocsin("test", "-c", str(config), str(events))
    assert run.returncode == 0
    assert "e.jsonl:2: skipped" in run.stderr and "e.jsonl:3: skipped" in run.stderr
    assert "1 event(s), 1 alert(s) would be sent, 2 line(s) skipped" in run.stdout


def test_test_command_retracts_as_the_daemon_does(tmp_path: Path) -> None:
    fact = '{"id": "f%s", "source": "s", "type": "t", "removed": %s, "data": {"x": 1}}\n'
    # f1 fires, is retracted, comes back (fires anew), is pushed again (nothing);
    # f2 is removed without having fired.
    config, events = rules_and_events(
        tmp_path,
        '[[rules]]\nname = "in"\nmatch = { x = 1 }\n'
        '[[rules]]\nname = "quiet"\nmatch = { x = 1 }\non_removed = "ignore"\n',
        "".join(fact % (n, r) for n, r in [(1, "false"), (1, "true"), (1, "false"), (1, "false")])
        + fact % (2, "true"),
    )
    run = tocsin("test", "-c", str(config), str(events))
    assert run.returncode == 0, run.stderr
    said = [
        line.removeprefix(f"{tmp_path}/")
        for line in run.stdout.splitlines()
        if line.startswith(f"{tmp_path}/e.jsonl")
    ]
    assert said == [
        "e.jsonl:1: [firing] in -> (no action)",
        "e.jsonl:1: [firing] quiet -> (no action)",
        "e.jsonl:2: [retracted] in -> (no action)",
        "e.jsonl:2: no alert from 'quiet': on_removed = \"ignore\"",
        "e.jsonl:3: [firing] in -> (no action)",
        "e.jsonl:3: no alert from 'quiet': a duplicate of an alert already made",
        "e.jsonl:4: no alert from 'in': a duplicate of an alert already made",
        "e.jsonl:4: no alert from 'quiet': a duplicate of an alert already made",
        "e.jsonl:5: a removal of a fact that fired nothing: no alert",
    ]
    assert "5 event(s), 4 alert(s) would be sent" in run.stdout


def test_plugins_lists_what_each_registers() -> None:
    run = tocsin("plugins")
    assert run.returncode == 0
    lines = run.stdout.splitlines()
    assert lines[0].startswith("builtin ")
    assert "  actions: apprise, log, webhook" in lines
    assert "  rule kinds: match" in lines


def test_run_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    config = tmp_path / "t.toml"
    config.write_text(
        '[daemon]\nstate_dir = "state"\n[actions.console]\nplugin = "log"\n[[rules]]\nname = "a"\n'
    )
    env = {**os.environ, "TOCSIN_LOAD_PLUGINS": "builtin", "TOCSIN_LOG_LEVEL": "info"}
    with subprocess.Popen(
        [sys.executable, "-m", "tocsin.cli", "run", "-c", str(config)],
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    ) as proc:
        assert proc.stderr is not None
        deadline = time.monotonic() + 30
        seen = ""
        while "tocsin running" not in seen:
            assert time.monotonic() < deadline, seen
            ready, _, _ = select.select([proc.stderr], [], [], 1)
            if ready:
                seen += proc.stderr.readline()
        proc.send_signal(signal.SIGHUP)  # a reload of the same file
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        rest = proc.stderr.read()
        assert "Traceback" not in seen + rest
        assert (tmp_path / "state" / "tocsin.sqlite3").exists()


# -- tocsin test --frames, golden files ----------------------------------------------------

ALL_PLUGINS = "builtin,eospark,ewallet,ckex,vite,bge,rules"
EOS_CONFIG = """
[sources.eos]
plugin = "eospark"
url = "ws://127.0.0.1:1/v1/ws"
api_key = "k3y-for-tests"
subscriptions = [{ account = "myaccount", contract = "eosio.token" }]

[[rules]]
name = "incoming transfer"
type = "action"
match = { "args.to" = "myaccount" }
title = "{{ args.quantity }} from {{ args.from }} at {{ event.time }}"
"""


def eos_frames(tmp_path: Path) -> Path:
    from tocsin_eospark.emulator import transaction, transfer
    from tocsin_eospark.protocol import data_frame, heartbeat_frame

    trx = transaction(
        [transfer("alice", "myaccount", "250.0000 EOS")],
        trx_id="ab" * 32,
        timestamp="2026-11-22T10:00:00.000",
    )
    lines = [
        json.dumps({"t": 1_763_805_600.5, "frame": data_frame(trx)}),
        "not json",
        json.dumps({"t": 1.0}),
        json.dumps({"t": 2.0, "frame": "{broken"}),
        json.dumps({"t": 3.0, "b64": "!!!"}),
        "",
        json.dumps({"t": 4.0, "b64": base64.b64encode(heartbeat_frame("x").encode()).decode()}),
        json.dumps({"t": 5.0, "frame": data_frame(trx)}),  # pushed again: no new event
    ]
    path = tmp_path / "frames.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_test_frames_replays_and_reports_bad_lines(tmp_path: Path) -> None:
    config = tmp_path / "t.toml"
    config.write_text(EOS_CONFIG)
    frames = eos_frames(tmp_path)
    run = tocsin(
        "test",
        "-c",
        str(config),
        "--frames",
        str(frames),
        "--source",
        "eos",
        TOCSIN_LOAD_PLUGINS="builtin,eospark",
    )
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    # Line 1's event, with the block time of the push; line 8 (the push again) makes none.
    assert lines[:2] == [
        f"{frames}:1: [firing] incoming transfer -> (no action)",
        "    title: 250.0000 EOS from alice at 2026-11-22T10:00:00.000Z",
    ]
    assert lines[-1] == "1 event(s), 1 alert(s) would be sent, 4 line(s) skipped"
    assert not any(line.startswith(f"{frames}:8") for line in lines)
    assert run.stderr.splitlines() == [
        f"{frames}:2: skipped: not JSON",
        f'{frames}:3: skipped: no "frame" (text) or "b64" (binary)',
        f"{frames}:4: skipped: malformed frame: not JSON",
        f'{frames}:5: skipped: "b64" is not base64',
    ]
    # The positional file with a bare --frames (SPEC section 6's form) reads the same.
    again = tocsin(
        "test",
        "-c",
        str(config),
        "--frames",
        "--source",
        "eos",
        str(frames),
        TOCSIN_LOAD_PLUGINS="builtin,eospark",
    )
    assert again.stdout == run.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["--frames", "F"], "--frames needs --source NAME"),
        (
            ["--frames", "F", "--source", "eso"],
            'has no source "eso": the configured sources are "eos"',
        ),
        (["--source", "eos", "E"], "--source goes with --frames"),
        ([], "test needs an EVENTS.jsonl file"),
        (["--frames", "F", "--source", "eos", "E"], "test --frames reads one file"),
        (["--expect", "G", "--write-golden", "G", "E"], "not allowed with argument"),
    ],
)
def test_test_usage_errors(tmp_path: Path, args: list[str], message: str) -> None:
    config = tmp_path / "t.toml"
    config.write_text(EOS_CONFIG)
    run = tocsin("test", "-c", str(config), *args, TOCSIN_LOAD_PLUGINS="builtin,eospark")
    assert run.returncode == 2
    assert message in run.stderr
    assert len(run.stderr.strip().splitlines()) == 1 and "Traceback" not in run.stderr


def test_test_frames_of_a_source_that_cannot_replay(tmp_path: Path) -> None:
    config = tmp_path / "t.toml"
    config.write_text(
        '[sources.feed]\nplugin = "testpush"\nurl = "ws://127.0.0.1:1/"\ntoken = "t"\n'
    )
    frames = tmp_path / "f.jsonl"
    frames.write_text('{"t": 1.0, "frame": "{}"}\n')
    # The tests' own source plugin has no frame parser; it is not an installed plugin, so
    # this CLI run gets the tests' registry.
    script = (
        "import sys; from support import make_registry; from tocsin import cli;"
        " cli._registry = make_registry; sys.exit(cli.main(sys.argv[1:]))"
    )
    run = subprocess.run(
        [
            sys.executable,
            "-c",
            script,
            "test",
            "-c",
            str(config),
            "--frames",
            str(frames),
            "--source",
            "feed",
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT / "tests")},
        timeout=60,
    )
    assert run.returncode == 2
    assert run.stderr.strip() == (
        'tocsin: source "feed" (plugin testpush) cannot replay recorded frames:'
        " its plugin has no frame parser"
    )


def test_golden_file_written_then_expected(tmp_path: Path) -> None:
    golden = tmp_path / "golden.jsonl"
    example = (str(ROOT / "rules.example.toml"), str(ROOT / "examples/events.jsonl"))
    env = {"TOCSIN_HOOK_SECRET": "s", "TOCSIN_LOAD_PLUGINS": ALL_PLUGINS}
    write = tocsin("test", "-c", example[0], example[1], "--write-golden", str(golden), **env)
    assert write.returncode == 0, write.stderr
    assert write.stdout.splitlines()[-1] == f"wrote 4 alert(s) to {golden}"
    alerts = [json.loads(line) for line in golden.read_text().splitlines()]
    assert list(alerts[0]) == ["rule", "status", "id", "event_id", "title", "body", "actions"]
    assert alerts[0]["title"] == "250.0000 EOS from alice"
    assert alerts[0]["actions"] == ["console", "hook"]

    same = tocsin("test", "-c", example[0], example[1], "--expect", str(golden), **env)
    assert same.returncode == 0, same.stderr
    assert same.stdout.splitlines()[-1] == f"{golden}: the 4 alert(s) are as expected"

    # Key order and spacing do not matter; a changed title and a missing alert do.
    alerts[0]["title"] = "250 EOS from alice"
    golden.write_text(
        "".join(json.dumps(a, sort_keys=True, indent=None) + "\n" for a in alerts[:3])
    )
    differ = tocsin("test", "-c", example[0], example[1], "--expect", str(golden), **env)
    assert differ.returncode == 1
    lines = differ.stdout.splitlines()
    start = lines.index(f"--- {golden}")
    assert lines[start + 1] == "+++ this run"
    assert [line[:1] for line in lines[start + 3 : -1]] == ["-", "+", " ", " ", "+"]
    assert '"title":"250 EOS from alice"' in lines[start + 3]
    assert '"title":"250.0000 EOS from alice"' in lines[start + 4]
    assert lines[-1].startswith(f"{golden}: the alerts differ (- expected, + this run)")

    golden.write_text("not json\n")
    broken = tocsin("test", "-c", example[0], example[1], "--expect", str(golden), **env)
    assert broken.returncode == 2 and f"{golden}:1: not JSON" in broken.stderr


def test_progress_bar_on_a_terminal_only(tmp_path: Path) -> None:
    line = '{"id": "%d", "source": "s", "type": "t", "data": {"x": %d}}\n'
    config, events = rules_and_events(
        tmp_path,
        '[[rules]]\nname = "any"\nmatch = { x = 1 }\n',
        "".join(line % (n, n % 2) for n in range(2000)),
    )
    env = {**os.environ, "TOCSIN_LOAD_PLUGINS": "builtin"}
    command = [sys.executable, "-m", "tocsin.cli", "test", "-c", str(config), str(events)]

    primary, secondary = os.openpty()
    # A terminal has a size; a new pty has none (0 columns), and a bar fits in none.
    fcntl.ioctl(secondary, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=secondary, env=env) as proc:
        os.close(secondary)
        assert proc.stdout is not None
        stdout, terminal = b"", b""
        streams = {proc.stdout.fileno(), primary}
        deadline = time.monotonic() + 30
        while streams:  # read both as they come: a full pty would block the process
            assert time.monotonic() < deadline, "the process did not finish"
            ready, _, _ = select.select(list(streams), [], [], 1)
            for fd in ready:
                try:
                    chunk = os.read(fd, 65536)
                except OSError:  # EIO: the terminal's other end is closed
                    chunk = b""
                if not chunk:
                    streams.discard(fd)
                elif fd == primary:
                    terminal += chunk
                else:
                    stdout += chunk
        os.close(primary)
        assert proc.wait(timeout=30) == 0
    assert b"%|" in terminal and b"B/s" in terminal  # tqdm's bar: "45%|####    | 61k/135k ..."
    assert b"%|" not in stdout
    assert stdout.splitlines()[-1] == b"2000 event(s), 1000 alert(s) would be sent"

    piped = tocsin("test", "-c", str(config), str(events))
    assert piped.returncode == 0
    assert piped.stderr == ""  # stderr a pipe: no bar, nothing at all
    assert piped.stdout.encode() == stdout


# -- tocsin explain -----------------------------------------------------------------------


def explain(tmp_path: Path, rule: str, line: int) -> subprocess.CompletedProcess[str]:
    event = tmp_path / "event.json"
    event.write_text((ROOT / "examples/events.jsonl").read_text().splitlines()[line - 1])
    return tocsin(
        "explain",
        "-c",
        str(ROOT / "rules.example.toml"),
        "--rule",
        rule,
        str(event),
        TOCSIN_HOOK_SECRET="s",
        TOCSIN_LOAD_PLUGINS=ALL_PLUGINS,
    )


def test_explain_a_rule_that_fires(tmp_path: Path) -> None:
    run = explain(tmp_path, "incoming transfer", 1)
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines() == [
        "rule 'incoming transfer' on event eos-3f1a-0 (action from eos, 2026-11-22T10:00:00.000Z)",
        '  ok    source: "eos" is "eos"',
        '  ok    type: "action" is "action"',
        '  ok    match action: wanted "transfer", got "transfer"',
        '  ok    match args.to: wanted "myaccount", got "myaccount"',
        '  ok    match contract: wanted "eosio.token", got "eosio.token"',
        "  ok    when: args.quantity | asset_amount >= 100 is true",
        "  ok    kind: match",
        "  ok    throttle: not throttled (one alert per 1m)",
        "fires: [firing] 250.0000 EOS from alice",
        "    to:    console, hook",
        "    body:  memo: invoice 42 (trx 3f1a9c)",
    ]


def test_explain_rules_that_do_not_fire(tmp_path: Path) -> None:
    other = explain(tmp_path, "incoming transfer", 5)
    assert other.returncode == 0, other.stderr
    assert '  FAIL  match args.to: wanted "myaccount", got "someoneelse"' in other.stdout
    assert other.stdout.splitlines()[-1] == (
        'does not fire: match args.to: wanted "myaccount", got "someoneelse"'
    )
    wallet = explain(tmp_path, "incoming transfer", 6)
    assert '  FAIL  source: "wallet" is not "eos"' in wallet.stdout
    assert '  FAIL  match contract: wanted "eosio.token", got missing' in wallet.stdout
    assert wallet.stdout.splitlines()[-1] == 'does not fire: source: "wallet" is not "eos"'
    small = explain(tmp_path, "whale deposits", 1)  # a threshold rule: its state is shown
    assert "  FAIL  when: args.quantity | asset_amount >= 900 is false" in small.stdout
    assert "  ok    kind: threshold: 0 of 2 within 30s" in small.stdout
    quiet = explain(tmp_path, "odds moved", 7)  # passes every check, yet the window decides
    assert quiet.stdout.splitlines()[-1] == (
        "does not fire: matched; change: 2.37 is the only value within 5m; fires on a move of 20%"
    )


def test_explain_usage_errors(tmp_path: Path) -> None:
    unknown = explain(tmp_path, "incoming transfers", 1)
    assert unknown.returncode == 2
    assert unknown.stderr.strip() == (
        f"tocsin: {ROOT / 'rules.example.toml'} has no rule 'incoming transfers'"
        " (did you mean 'incoming transfer'?)"
    )
    event = tmp_path / "bad.json"
    event.write_text('{"id": 1}')
    bad = tocsin(
        "explain",
        "-c",
        str(ROOT / "rules.example.toml"),
        "--rule",
        "incoming transfer",
        str(event),
        TOCSIN_HOOK_SECRET="s",
        TOCSIN_LOAD_PLUGINS=ALL_PLUGINS,
    )
    assert bad.returncode == 2
    assert "bad.json: not one event envelope (SPEC section 4): missing or non-string" in bad.stderr
    assert "Traceback" not in bad.stderr


# -- tocsin outbox ------------------------------------------------------------------------


def test_outbox_lists_a_readable_table(tmp_path: Path) -> None:
    from tocsin.store import DEAD, NewAlert, Store

    config = tmp_path / "t.toml"
    config.write_text('[daemon]\nstate_dir = "state"\n[actions.hook]\nplugin = "log"\n')
    long_rule = "a rule whose name goes on and on well past any column"
    store = Store.open(tmp_path / "state")
    try:
        for n, rule in enumerate(("short", long_rule, "dead one")):
            payload = {"id": f"a{n}", "rule": rule, "status": "firing", "title": "", "body": ""}
            store.call_sync(
                Store.commit_alerts,
                [
                    NewAlert(
                        f"a{n}", rule, f"e{n}", "firing", f"g{n}", payload, (("hook", "", "hook"),)
                    )
                ],
            )
        (first,) = store.call_sync(Store.fetch_ready, "hook", time.time() + 1, 1).deliveries
        store.call_sync(Store.reschedule, first.seq, time.time() + 90, "HTTP 503")
        third = store.call_sync(Store.list_deliveries, [0])[2]
        store.call_sync(Store.finish, third.seq, DEAD, "HTTP 400: " + "x" * 300)
    finally:
        store.close()

    run = tocsin("outbox", "-c", str(config))
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert lines[0] == "2 pending, 1 dead-lettered, 0 delivered"
    header, rows = lines[1], lines[2:]
    assert header.split() == [
        "#",
        "state",
        "tries",
        "queued",
        "next",
        "try",
        "action",
        "rule",
        "target",
        "last",
        "error",
    ]
    assert len(rows) == 3
    # Every column starts where its header does: sized to the content, not fixed.
    column = header.index("rule")
    assert [row[column:].split("  ")[0] for row in rows] == [
        "short",
        "a rule whose name goes on a…",
        "dead one",
    ]
    # Due in 90 s, to a human (less the time the CLI took to start on a loaded host).
    assert re.search(r"  in 1m([12]\d|30)s  ", rows[0])
    assert rows[0].rstrip().endswith("HTTP 503")
    assert re.search(r"  (now|\d+s ago)  ", rows[1])
    assert rows[2].split()[1] == "dead" and " - " in rows[2]
    assert rows[2].endswith("HTTP 400: " + "x" * 49 + "…")
    assert all(len(row) < 160 for row in rows)

    as_json = tocsin("outbox", "-c", str(config), "--json")
    assert as_json.returncode == 0, as_json.stderr
    document = json.loads(as_json.stdout)
    assert document["counts"]["pending"] == 2 and document["counts"]["dead"] == 1
    assert [d["rule"] for d in document["deliveries"]] == ["short", long_rule, "dead one"]
    assert document["deliveries"][2]["due_at"] is None
    assert document["deliveries"][2]["last_error"].startswith("HTTP 400: xxx")

    dead = tocsin("outbox", "-c", str(config), "--dead")
    assert dead.stdout.splitlines()[0] == "2 pending, 1 dead-lettered, 0 delivered"
    assert len(dead.stdout.splitlines()) == 3


def test_a_bad_log_level_in_the_environment_is_a_usage_error(tmp_path: Path) -> None:
    config = tmp_path / "t.toml"
    config.write_text('[daemon]\nstate_dir = "state"\n')
    run = tocsin("run", "-c", str(config), TOCSIN_LOG_LEVEL="verbose")
    assert run.returncode == 2
    assert run.stderr.strip() == (
        "tocsin: TOCSIN_LOG_LEVEL='verbose' is not a log level: use one of debug, info,"
        " warning, error"
    )


def test_emulate_on_a_busy_port_says_so_in_one_sentence() -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        run = tocsin("emulate", "eospark", "--port", str(port), TOCSIN_LOAD_PLUGINS="eospark")
    assert run.returncode == 2
    assert run.stderr.strip().splitlines() == [
        f"tocsin: cannot listen on 127.0.0.1:{port}: Address already in use"
    ]


def test_output_into_a_closed_pipe_ends_quietly(tmp_path: Path) -> None:
    config, events = rules_and_events(
        tmp_path,
        '[[rules]]\nname = "any"\nmatch = { x = 1 }\n',
        "".join(
            f'{{"id": "{i}", "source": "s", "type": "t", "data": {{"x": 1}}}}\n'
            for i in range(5000)
        ),
    )
    run = subprocess.Popen(
        [sys.executable, "-m", "tocsin.cli", "test", "-c", str(config), str(events)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "TOCSIN_LOAD_PLUGINS": "builtin"},
    )
    assert run.stdout is not None and run.stderr is not None
    assert run.stdout.readline().endswith(b"[firing] any -> (no action)\n")
    run.stdout.close()  # the reader goes away, as `| head -1` does
    assert run.wait(timeout=60) == 1
    with run.stderr:
        assert run.stderr.read() == b""


def test_test_and_explain_never_show_a_secret(tmp_path: Path) -> None:
    event = '{"id": "1", "source": "s", "type": "t", "data": {"args": {"memo": "m", "to": "x"}}}'
    config, events = rules_and_events(
        tmp_path,
        '[[rules]]\nname = "memo"\nmatch = { "args.memo" = { env = "S_MEMO" } }\n'
        '[[rules]]\nname = "to"\nwhen = { env = "S_WHEN" }\n',
        event + "\n",
    )
    secrets = {"S_MEMO": "SECRET_MEMO_42", "S_WHEN": "args.to == 'SECRET_WHEN_43'"}
    test = tocsin("test", "-c", str(config), str(events), **secrets)
    assert test.returncode == 0, test.stderr
    assert 'match args.memo is "m", not "***"' in test.stdout
    explain = tocsin("explain", "-c", str(config), "--rule", "to", str(events), **secrets)
    assert explain.returncode == 0, explain.stderr
    assert "FAIL  when: *** is false" in explain.stdout
    assert "SECRET" not in test.stdout + test.stderr + explain.stdout + explain.stderr


def test_record_takes_a_plain_number_of_seconds() -> None:
    from tocsin.cli import _duration

    assert _duration("30") == 30.0
    assert _duration("1.5") == 1.5
    assert _duration("2m") == 120.0


def test_outbox_drops_a_stuck_pending_delivery_by_number(tmp_path: Path) -> None:
    from tocsin.store import NewAlert, Store

    config = tmp_path / "t.toml"
    config.write_text('[daemon]\nstate_dir = "state"\n')
    store = Store.open(tmp_path / "state")
    alert = NewAlert("a1", "r", "e1", "firing", "g", {"title": "stuck"}, (("hook", "", "hook"),))
    (pending,) = store.call_sync(Store.commit_alerts, [alert])
    store.close()
    assert "0 deliveries dropped" in tocsin("outbox", "-c", str(config), "drop", "--all").stdout
    dropped = tocsin("outbox", "-c", str(config), "drop", str(pending.seq))
    assert dropped.returncode == 0, dropped.stderr
    assert dropped.stdout.startswith("1 delivery dropped;")
    listing = tocsin("outbox", "-c", str(config))
    assert listing.stdout.splitlines()[0] == "0 pending, 0 dead-lettered, 0 delivered, 1 dropped"
    # A number it cannot act on (dropped already, or none such) is named, with exit 1.
    again = tocsin("outbox", "-c", str(config), "drop", str(pending.seq), "99999")
    assert (again.returncode, again.stdout.split(";")[0]) == (1, "0 deliveries dropped")
    assert again.stderr == (
        f"tocsin: not undelivered, or no such delivery: {pending.seq}, 99999 (see tocsin outbox)\n"
    )
    retry = tocsin("outbox", "-c", str(config), "retry", "99999")
    assert retry.returncode == 1 and "not dead-lettered, or no such delivery: 99999" in retry.stderr
    listed = tocsin("outbox", "-c", str(config), "list", "5")
    assert listed.returncode == 2 and "outbox list takes no delivery numbers" in listed.stderr


def test_demo_away_from_the_source_tree_says_where_its_config_is(tmp_path: Path) -> None:
    run = tocsin("demo", cwd=tmp_path)
    assert run.returncode == 2
    assert run.stderr.strip() == (
        "tocsin: rules.example.toml is not here (it is in tocsin's source tree): run tocsin"
        " demo there, or give -c FILE, a config whose sources point at 127.0.0.1"
    )


def test_an_error_sentence_never_shows_a_secret(capsys: pytest.CaptureFixture[str]) -> None:
    from tocsin import SecretValue
    from tocsin.cli import _fail
    from tocsin.errors import PluginError

    SecretValue("pager-t0ken-5150")  # registered, as every resolved secret is
    _fail(PluginError("action 'pager' (plugin 'p') could not start: bad token pager-t0ken-5150"))
    assert capsys.readouterr().err == (
        "tocsin: action 'pager' (plugin 'p') could not start: bad token ***\n"
    )


def test_test_needs_no_secret_and_check_leaves_credentials_to_the_service(tmp_path: Path) -> None:
    # tocsin test sends nothing, so a secret it cannot read is not needed (the example's
    # own header said to run it without the webhook's secret, and it failed); tocsin check
    # in a shell cannot read the service's credentials, which the README recommends.
    config = tmp_path / "t.toml"
    config.write_text(
        '[actions.hook]\nplugin = "webhook"\nurl = "http://127.0.0.1:1/"\n'
        'secret = { credential = "hook-secret" }\n'
        '[actions.other]\nplugin = "webhook"\nurl = "http://127.0.0.1:1/"\n'
        'secret = { env = "UNSET_SECRET_VAR" }\n'
        '[[rules]]\nname = "r"\nactions = ["hook", "other"]\n'
    )
    events = tmp_path / "e.jsonl"
    events.write_text('{"id": "1", "source": "s", "type": "t", "data": {}}\n')
    test = tocsin("test", "-c", str(config), str(events))
    assert test.returncode == 0, test.stderr
    assert "[firing] r -> hook, other" in test.stdout
    assert (
        f"tocsin: note: {config}: actions.hook.secret: not checked here: credential" in test.stderr
    )
    assert (
        "actions.other.secret: not checked here: environment variable UNSET_SECRET_VAR"
        in test.stderr
    )
    check = tocsin("check", "-c", str(config))
    assert check.returncode == 2  # a variable check can read is checked...
    assert "actions.other.secret: environment variable UNSET_SECRET_VAR is not set" in check.stderr
    assert (
        "actions.hook.secret: not checked here: credential hook-secret" in check.stderr
    )  # ...a credential not


def test_test_reads_regular_files_and_passes_over_a_line_too_long(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # tocsin test /dev/zero grew to 1.35 GB and ended in a MemoryError traceback.
    from tocsin import replay

    config = tmp_path / "t.toml"
    config.write_text('[[rules]]\nname = "r"\n')
    zero = tocsin("test", "-c", str(config), "/dev/zero")
    assert (
        zero.returncode == 2
        and zero.stderr.strip() == "tocsin: cannot read /dev/zero: not a regular file"
    )
    monkeypatch.setattr(replay, "MAX_LINE", 100)
    events = tmp_path / "e.jsonl"
    good = '{"id": "1", "source": "s", "type": "t", "data": {}}'
    events.write_text(good + "\n" + "x" * 250 + "\n" + good.replace('"1"', '"2"') + "\n")
    skipped: list[tuple[str, str]] = []
    lines = list(replay.numbered_lines(events, too_long=lambda w, r: skipped.append((w, r))))
    assert [where for where, _ in lines] == [f"{events}:1", f"{events}:3"]
    assert skipped == [(f"{events}:2", "longer than 100 bytes")]
