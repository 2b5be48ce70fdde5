"""The ``tocsin`` command line (SPEC section 6). The only place that prints.

User errors (usage, config, state) exit 2 with a message and never a traceback.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, NoReturn

import anyio
import orjson

from . import __version__
from .config import DEFAULT_CONFIG, Config, load_config
from .errors import ConfigError, PluginError, ServeError, StateError, TocsinError, UsageError
from .events import Event
from .logs import LEVELS, setup_logging
from .notify import Notifier
from .plugins import Registry, build_registry, make_plugin_manager, plugin_versions
from .rules import Engine, PendingAlert, compile_rules
from .store import DEAD, PENDING, Store


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see '{self.prog} --help')")


def _config_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-c",
        "--config",
        metavar="FILE",
        help=f"config file (default: $TOCSIN_CONFIG, else {DEFAULT_CONFIG})",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="tocsin", description="Alerting daemon for WebSocket push APIs.")
    parser.add_argument("--version", action="version", version=f"tocsin {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    run = sub.add_parser("run", help="run the daemon in the foreground")
    _config_arg(run)
    run.add_argument(
        "--log-level", choices=LEVELS, default=os.environ.get("TOCSIN_LOG_LEVEL", "info")
    )
    run.add_argument("--log-format", choices=("text", "json"), default="text")

    check = sub.add_parser("check", help="validate the config and every rule")
    _config_arg(check)

    test = sub.add_parser("test", help="dry run: which rules fire for events in a JSONL file")
    _config_arg(test)
    test.add_argument("events", metavar="EVENTS.jsonl", help="one event envelope (JSON) per line")

    sub.add_parser("plugins", help="list plugins, versions and what each registers")

    demo = sub.add_parser("demo", help="the bundled emulators and the daemon on the example rules")
    demo.add_argument(
        "-c",
        "--config",
        metavar="FILE",
        default="rules.example.toml",
        help="config whose sources point at loopback (default: rules.example.toml)",
    )

    emulate = sub.add_parser("emulate", help="run one provider emulator standalone")
    emulate.add_argument("provider", help="e.g. eospark, ewallet, ckex (see tocsin plugins)")
    emulate.add_argument("--host", default="127.0.0.1", help="loopback address (default 127.0.0.1)")
    emulate.add_argument("--port", type=int, default=0, help="port (default: a free one)")

    init = sub.add_parser("init", help="write a starter config")
    init.add_argument(
        "path", nargs="?", default="tocsin.toml", help="where (default: ./tocsin.toml)"
    )
    init.add_argument("--force", action="store_true", help="overwrite an existing file")

    outbox = sub.add_parser("outbox", help="pending and dead-lettered deliveries")
    _config_arg(outbox)
    outbox.add_argument("verb", nargs="?", choices=("list", "retry", "drop"), default="list")
    outbox.add_argument("seq", nargs="*", type=int, help="delivery numbers (first column of list)")
    outbox.add_argument("--all", action="store_true", help="every dead-lettered delivery")
    outbox.add_argument("--dead", action="store_true", help="list only dead-lettered deliveries")
    return parser


def _config_path(args: argparse.Namespace) -> str:
    return str(args.config or os.environ.get("TOCSIN_CONFIG") or DEFAULT_CONFIG)


def _registry() -> Registry:
    return build_registry(make_plugin_manager())


def _load(args: argparse.Namespace, registry: Registry) -> tuple[Config, Engine]:
    config = load_config(_config_path(args), registry)
    return config, Engine(compile_rules(config, registry))


def cmd_check(args: argparse.Namespace) -> int:
    config, engine = _load(args, _registry())
    off = len(config.rules) - len(engine.rules)
    print(
        f"{config.path}: ok: {len(config.sources)} source(s), {len(config.actions)} action(s),"
        f" {len(engine.rules)} rule(s)" + (f" ({off} disabled)" if off else "")
    )
    return 0


def _event_clock(event: Event) -> float:
    try:
        return datetime.fromisoformat(event.time.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return event.received


def cmd_test(args: argparse.Namespace) -> int:
    _config, engine = _load(args, _registry())
    now = [0.0]
    # Throttles and windows follow the events' own times, so a file replays as it happened.
    engine.clock = engine.wall = lambda: now[0]
    path = Path(args.events)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as err:
        raise UsageError(f"cannot read {path}: {err.strerror}") from None
    events = fired = bad = 0

    def show(where: str, pending: PendingAlert) -> None:
        alert = pending.alert
        print(
            f"{where}: [{alert.status}] {alert.rule} -> {', '.join(pending.actions) or '(no action)'}"
        )
        print(f"    title: {alert.title}")
        for body_line in alert.body.splitlines() or [""]:
            print(f"    body:  {body_line}")

    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            event = Event.from_envelope(orjson.loads(line))
        except (orjson.JSONDecodeError, ValueError) as err:
            bad += 1
            print(f"{path}:{number}: skipped: {err}", file=sys.stderr)
            continue
        events += 1
        now[0] = max(now[0], _event_clock(event))  # never backwards, as in the daemon
        where = f"{path}:{number}"
        for pending in engine.tick():  # what time alone caused before this event
            fired += 1
            show(f"{where} (before)", pending)
        engine.suppressed.clear()
        alerts = engine.process(event)
        for pending in alerts:
            fired += 1
            show(where, pending)
        sent = {p.alert.rule for p in alerts}
        for rule, reason, state in engine.explain(event):
            if rule in sent:
                if state:
                    print(f"    {rule}: {state}")
                continue
            why = reason or engine.suppressed.get(rule) or state or "matched; no alert yet"
            print(f"{where}: no alert from {rule!r}: {why}")
    stats = engine.stats
    print(
        f"{events} event(s), {fired} alert(s) would be sent"
        + (f", {stats.throttled} throttled" if stats.throttled else "")
        + (f", {stats.duplicates} duplicate(s) skipped" if stats.duplicates else "")
        + (f", {bad} line(s) skipped" if bad else "")
    )
    return 0


def cmd_plugins(args: argparse.Namespace) -> int:
    pm = make_plugin_manager()
    registry = build_registry(pm)
    versions = plugin_versions(pm)
    for name in sorted(versions):
        print(f"{name} {versions[name]}")
        for label, table in (
            ("sources", registry.sources),
            ("actions", registry.actions),
            ("rule kinds", registry.rule_kinds),
            ("template filters", registry.filters),
            ("emulators", registry.emulators),
        ):
            names = sorted(k for k, r in table.items() if r.plugin == name)
            if names:
                print(f"  {label}: {', '.join(names)}")
    return 0


STARTER: dict[str, Any] = {
    "daemon": {"state_dir": "~/.local/state/tocsin"},
    "actions": {
        "console": {"plugin": "log", "level": "warning"},
        "hook": {
            "plugin": "webhook",
            "url": "http://127.0.0.1:8080/tocsin",
            "secret": {"env": "TOCSIN_HOOK_SECRET"},
        },
    },
    "rules": [
        {
            "name": "incoming transfer",
            "type": "action",
            "match": {"contract": "eosio.token", "action": "transfer", "args.to": "myaccount"},
            "when": "args.quantity | asset_amount >= 100",
            "actions": ["console"],
            "title": "{{ args.quantity }} from {{ args.from }}",
            "body": "memo: {{ args.memo }} (trx {{ trx_id }})",
            "throttle": "1m",
            "group_by": ["args.from"],
        }
    ],
}

STARTER_HEADER = """\
# tocsin starter config: see README.md and SPEC section 3 for every key.
# Add a [sources.NAME] table for each provider connection (`tocsin plugins` lists them),
# point actions.hook.url at your receiver, then: tocsin check -c THIS_FILE
# The webhook secret is read from $TOCSIN_HOOK_SECRET; remove "hook" if you have none.

"""


def cmd_init(args: argparse.Namespace) -> int:
    import tomli_w

    path = Path(args.path)
    if path.exists() and not args.force:
        raise UsageError(f"{path} exists; use --force to overwrite it")
    try:
        path.write_text(STARTER_HEADER + tomli_w.dumps(STARTER), encoding="utf-8")
    except OSError as err:
        raise UsageError(f"cannot write {path}: {err.strerror}") from None
    print(f"wrote {path}; check it with: tocsin check -c {path}")
    return 0


def _when(ts: float) -> str:
    return datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")


def cmd_outbox(args: argparse.Namespace) -> int:
    config = load_config(_config_path(args), _registry())
    store = Store.open(config.daemon.resolved_state_dir(), fsync=config.daemon.fsync)
    try:
        if args.verb == "list":
            states = [DEAD] if args.dead else [PENDING, DEAD]
            rows = store.call_sync(Store.list_deliveries, states)
            counts = store.call_sync(Store.counts)
            print(
                f"{counts['pending']} pending, {counts['dead']} dead-lettered, {counts['done']} delivered"
            )
            if rows:
                print(
                    f"{'#':>6}  {'state':<7} {'tries':>5}  {'next/last':<19}  {'action':<12} {'rule':<24} target / last error"
                )
            for d in rows:
                payload = orjson.loads(d.payload)
                when = _when(d.due_at if d.state == PENDING else d.created_at)
                print(
                    f"{d.seq:>6}  {d.state_name:<7} {d.attempts:>5}  {when:<19}  {d.action:<12} {payload['rule'][:24]:<24} {d.label}"
                )
                if d.last_error:
                    print(f"{'':>42}last error: {d.last_error[:200]}")
            return 0
        if not args.seq and not args.all:
            raise UsageError(f"outbox {args.verb} needs delivery numbers or --all")
        seqs = None if args.all else args.seq
        op = Store.retry if args.verb == "retry" else Store.drop
        n = store.call_sync(op, seqs)
        done = "queued again" if args.verb == "retry" else "dropped"
        print(
            f"{n} dead-lettered deliver{'y' if n == 1 else 'ies'} {done}"
            + ("; a running daemon picks them up within 5 s" if args.verb == "retry" else "")
        )
        return 0
    finally:
        store.close()


def cmd_run(args: argparse.Namespace) -> int:
    from .daemon import Daemon

    setup_logging(args.log_level, args.log_format)
    daemon = Daemon(_config_path(args), _registry(), notifier=Notifier())

    async def main() -> None:
        async with anyio.create_task_group() as tg:

            async def signals() -> None:
                with anyio.open_signal_receiver(
                    signal.SIGTERM, signal.SIGINT, signal.SIGHUP
                ) as received:
                    async for signum in received:
                        if signum == signal.SIGHUP:
                            await daemon.reload()
                        else:
                            daemon.stop()

            tg.start_soon(signals)
            await daemon.run()
            tg.cancel_scope.cancel()

    try:
        anyio.run(main)
    except BaseExceptionGroup as group:
        # Start-up errors (the state database, the http address) come out of the task
        # groups wrapped; the user reads the one sentence, not a traceback.
        error: BaseException = group
        while isinstance(error, BaseExceptionGroup) and len(error.exceptions) == 1:
            error = error.exceptions[0]
        if isinstance(error, TocsinError):
            raise error from None
        raise
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import printer, run_demo

    setup_logging("warning")
    anyio.run(run_demo, str(args.config), _registry(), printer())
    return 0


def cmd_emulate(args: argparse.Namespace) -> int:
    from .demo import printer, run_emulator

    setup_logging("info")
    anyio.run(run_emulator, _registry(), args.provider, args.host, args.port, printer())
    return 0


COMMANDS = {
    "demo": cmd_demo,
    "emulate": cmd_emulate,
    "run": cmd_run,
    "check": cmd_check,
    "test": cmd_test,
    "plugins": cmd_plugins,
    "init": cmd_init,
    "outbox": cmd_outbox,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``tocsin`` command."""
    try:
        args = build_parser().parse_args(argv)
        if args.command is None:
            raise UsageError("a command is required (see 'tocsin --help')")
        return COMMANDS[args.command](args)
    except ConfigError as err:
        for problem in err.problems:
            print(problem, file=sys.stderr)
        count = len(err.problems)
        print(f"{count} problem{'s' if count != 1 else ''}; nothing was started", file=sys.stderr)
        return 2
    except (UsageError, PluginError, StateError, ServeError) as err:
        print(f"tocsin: {err}", file=sys.stderr)
        return 2
    except TocsinError as err:
        print(f"tocsin: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
