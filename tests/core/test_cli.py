"""The command line as a user runs it: real subprocesses, exit codes, no tracebacks."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
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


@pytest.mark.parametrize(
    "args, message",
    [
        ([], "a command is required"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
        (["check", "--nope"], "unrecognized arguments: --nope"),
        (["check", "-c", "/does/not/exist.toml"], "/does/not/exist.toml: no such file"),
        (["outbox", "retry", "-c", "x.toml"], "no such file"),
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
    assert "title: odds 2.10 on event 219 market 33753655" in run.stdout
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
    config = tmp_path / "t.toml"
    config.write_text('[[rules]]\nname = "any"\nmatch = { x = 1 }\n')
    events = tmp_path / "e.jsonl"
    events.write_text(
        '{"id": "1", "source": "s", "type": "t", "data": {"x": 1}}\nnot json\n{"id": 2}\n'
    )
    run = tocsin("test", "-c", str(config), str(events))
    assert run.returncode == 0
    assert "e.jsonl:2: skipped" in run.stderr and "e.jsonl:3: skipped" in run.stderr
    assert "1 event(s), 1 alert(s) would be sent, 2 line(s) skipped" in run.stdout


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
