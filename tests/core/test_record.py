"""``tocsin record`` as a user runs it: a subprocess recording the EOSPark emulator, then
``tocsin test --frames`` replaying what it saved through the rules."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import anyio
import tomli_w
from tocsin_eospark import EOSParkEmulator
from tocsin_eospark.emulator import action, transaction, transfer

from support import wait_for

KEY = "k3y-recorded-0123456789"
ME = "myaccount"
RULE = {
    "name": "incoming transfer",
    "type": "action",
    "match": {"contract": "eosio.token", "action": "transfer", "args.to": ME},
    "when": "args.quantity | asset_amount >= 100",
    "title": "{{ args.quantity }} from {{ args.from }}",
    "body": "memo: {{ args.memo }} (trx {{ trx_id }})",
}


def environment() -> dict[str, str]:
    return {**os.environ, "TOCSIN_LOAD_PLUGINS": "builtin,eospark", "EOSPARK_KEY": KEY}


def write_config(tmp_path: Path, url: str) -> Path:
    config = {
        "daemon": {"state_dir": "state"},
        "sources": {
            "eos": {
                "plugin": "eospark",
                "url": url,
                "api_key": {"env": "EOSPARK_KEY"},
                "subscriptions": [{"account": ME, "contract": "eosio.token"}],
                "max_backoff": "1s",
            }
        },
        "actions": {"console": {"plugin": "log"}},
        "rules": [RULE],
    }
    path = tmp_path / "tocsin.toml"
    path.write_text(tomli_w.dumps(config), encoding="utf-8")
    return path


def tocsin(*args: str) -> list[str]:
    return [sys.executable, "-m", "tocsin.cli", *args]


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        tocsin(*args), capture_output=True, text=True, env=environment(), timeout=60, check=False
    )


def records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


async def test_record_count_then_replay_through_the_rules(tmp_path: Path) -> None:
    big = transaction([transfer("alice", ME, "250.0000 EOS", "invoice 7")], trx_id="ab" * 32)
    multi = transaction(
        [
            transfer("bob", ME, "120.0000 EOS", "second"),
            action("eosio.token", "issue", "eosio", {"to": ME, "quantity": "5.0000 EOS"}),
            transfer("carol", ME, "1.0000 EOS"),
        ],
        trx_id="cd" * 32,
    )
    out = tmp_path / "frames.jsonl"
    # No heartbeat within the test: the frames are the subscribe ack and three pushes.
    async with EOSParkEmulator(
        api_keys=[KEY], heartbeat_interval=60, first_heartbeat=60
    ) as emulator:
        config = write_config(tmp_path, emulator.url)
        done: dict[str, subprocess.CompletedProcess[bytes]] = {}

        async def run() -> None:
            done["record"] = await anyio.run_process(
                tocsin(
                    "record",
                    "-c",
                    str(config),
                    "--source",
                    "eos",
                    "--out",
                    str(out),
                    "--count",
                    "4",
                ),
                env=environment(),
                check=False,
            )

        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                tg.start_soon(run)
                await wait_for(lambda: emulator.subscribed, within=25, what="the subscription")
                await emulator.push_transaction(big, times=2)  # a re-push: one event only
                await emulator.push_transaction(multi)
    result = done["record"]
    stdout, stderr = result.stdout.decode(), result.stderr.decode()
    assert result.returncode == 0, stderr
    assert stdout.strip() == f"recorded 4 frame(s), 4 event(s) from 'eos' to {out}"
    assert "is up" in stderr and "Traceback" not in stderr
    assert KEY not in stdout + stderr + out.read_text(encoding="utf-8")

    saved = records(out)
    assert len(saved) == 4
    assert all(isinstance(r["t"], float) and isinstance(r["frame"], str) for r in saved)
    assert json.loads(saved[0]["frame"])["msg_type"] == "subscribe"
    assert json.loads(saved[1]["frame"]) == json.loads(saved[2]["frame"])  # the re-push

    replay = cli("test", "-c", str(config), "--frames", str(out), "--source", "eos")
    assert replay.returncode == 0, replay.stderr
    lines = replay.stdout.splitlines()
    assert f"{out}:2: [firing] incoming transfer -> console" in lines
    assert "    title: 250.0000 EOS from alice" in lines
    assert "    title: 120.0000 EOS from bob" in lines
    assert (
        f'{out}:4: no alert from \'incoming transfer\': match action is "issue", not "transfer"'
        in lines
    )
    assert f"{out}:4: no alert from 'incoming transfer': when is false" in lines
    assert lines[-1] == "4 event(s), 2 alert(s) would be sent"
    assert replay.stderr == ""


async def test_record_until_sigterm_keeps_every_frame(tmp_path: Path) -> None:
    out = tmp_path / "frames.jsonl"
    async with EOSParkEmulator(
        api_keys=[KEY], heartbeat_interval=60, first_heartbeat=60
    ) as emulator:
        config = write_config(tmp_path, emulator.url)
        with anyio.fail_after(30):
            async with await anyio.open_process(
                tocsin("record", "-c", str(config), "--source", "eos", "--out", str(out)),
                env=environment(),
            ) as process:
                await wait_for(lambda: emulator.subscribed, within=25, what="the subscription")
                await emulator.push_transaction(transaction([transfer("alice", ME, "1.0000 EOS")]))
                # Each line is flushed as it comes: the file shows it while recording goes on.
                await wait_for(lambda: out.exists() and len(records(out)) == 2, what="two lines")
                process.send_signal(signal.SIGTERM)
                assert await process.wait() == 0
                assert process.stdout is not None
                stdout = (await process.stdout.receive()).decode()
    assert stdout.strip() == f"recorded 2 frame(s), 1 event(s) from 'eos' to {out}"


def test_record_usage_errors(tmp_path: Path) -> None:
    config = write_config(tmp_path, "ws://127.0.0.1:1/v1/ws")
    out = str(tmp_path / "f.jsonl")
    unknown = cli("record", "-c", str(config), "--source", "eso", "--out", out)
    assert unknown.returncode == 2
    assert unknown.stderr.strip() == (
        f'tocsin: {config} has no source "eso": the configured sources are "eos"'
    )
    for bad, message in (
        (["--count", "0"], "above 0"),
        (["--count", "\u00b2"], "above 0"),  # a digit to str.isdigit, not to int()
        (["--duration", "soon"], "duration"),
    ):
        run = cli("record", "-c", str(config), "--source", "eos", "--out", out, *bad)
        assert run.returncode == 2 and message in run.stderr and "Traceback" not in run.stderr
    missing = cli("record", "-c", str(config), "--out", out)
    assert missing.returncode == 2 and "--source" in missing.stderr


def test_record_for_a_duration_with_the_provider_down(tmp_path: Path) -> None:
    config = write_config(tmp_path, "ws://127.0.0.1:1/v1/ws")  # nothing listens there
    out = tmp_path / "f.jsonl"
    earlier = '{"t": 1763805600.0, "frame": "{}"}'  # a recording a crash cut: no newline
    out.write_text(earlier)
    run = cli(
        "record", "-c", str(config), "--source", "eos", "--out", str(out), "--duration", "300ms"
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == f"recorded 0 frame(s), 0 event(s) from 'eos' to {out}"
    assert "is down" in run.stderr
    assert out.read_text() == earlier + "\n"  # appended to, never erased; lines kept apart


def test_a_source_that_cannot_replay_is_recorded_with_a_warning(tmp_path: Path) -> None:
    config = tmp_path / "t.toml"
    config.write_text(
        '[sources.feed]\nplugin = "testpush"\nurl = "ws://127.0.0.1:1/"\ntoken = "t"\n'
    )
    out = tmp_path / "f.jsonl"
    # The tests' own source plugin has no frame parser; not being installed, it reaches the
    # CLI through the tests' registry.
    script = (
        "import sys; from support import make_registry; from tocsin import cli;"
        " cli._registry = make_registry; sys.exit(cli.main(sys.argv[1:]))"
    )
    args = [
        "record",
        "-c",
        str(config),
        "--source",
        "feed",
        "--out",
        str(out),
        "--duration",
        "200ms",
    ]
    run = subprocess.run(
        [sys.executable, "-c", script, *args],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])},
        timeout=60,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    assert run.stderr.splitlines()[0] == (
        "tocsin: warning: plugin testpush has no frame parser: these frames can be kept"
        " but not replayed by tocsin test --frames"
    )
    assert run.stdout.strip() == f"recorded 0 frame(s), 0 event(s) from 'feed' to {out}"


def test_record_needs_no_secret_of_another_table_but_its_source_s(tmp_path: Path) -> None:
    # Recording connects to one source and sends nothing: an action's secret that is not
    # set here was a config error, and no frame could be recorded (the plugin audit).
    config = write_config(tmp_path, "ws://127.0.0.1:1/v1/ws")
    text = config.read_text().replace("[[rules]]\n", '[[rules]]\nactions = ["console", "oncall"]\n')
    text += (
        '\n[actions.oncall]\nplugin = "webhook"\nurl = "https://example.invalid/hook"\n'
        'secret = { env = "ONCALL_SECRET" }\n'
    )
    config.write_text(text)
    assert 'actions = ["console", "oncall"]' in text
    out = tmp_path / "f.jsonl"
    run = cli(
        "record", "-c", str(config), "--source", "eos", "--out", str(out), "--duration", "200ms"
    )
    assert run.returncode == 0, run.stderr
    assert "note:" in run.stderr and "actions.oncall.secret: not checked here" in run.stderr
    # The source's own secret is needed: without it, the config error says which.
    env = {k: v for k, v in environment().items() if k != "EOSPARK_KEY"}
    missing = subprocess.run(
        tocsin("record", "-c", str(config), "--source", "eos", "--out", str(out)),
        capture_output=True, text=True, env=env, timeout=60, check=False,
    )  # fmt: skip
    assert missing.returncode == 2
    assert "sources.eos.api_key: environment variable EOSPARK_KEY is not set" in missing.stderr
