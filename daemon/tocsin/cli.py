"""The ``tocsin`` command line (SPEC section 6). The only place that prints.

User errors (usage, config, state) exit 2 with a message and never a traceback.
"""

from __future__ import annotations

import argparse
import difflib
import functools
import gc
import itertools
import os
import re
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NoReturn

import anyio
import orjson
from tqdm import tqdm

from . import __version__
from .config import DEFAULT_CONFIG, Config, load_config, load_daemon_config
from .errors import ConfigError, PluginError, ServeError, StateError, TocsinError, UsageError
from .events import Event
from .fields import SecretUnavailable, parse_duration, secret_registry
from .logs import LEVELS, setup_logging
from .notify import Notifier
from .outbox_view import outbox_json, outbox_lines
from .plugins import Registry, build_registry, make_plugin_manager, plugin_versions
from .record import configured_source, frame_parser, record
from .replay import (
    ReplayFactory,
    Skip,
    envelopes,
    frames,
    golden_diff,
    golden_line,
    numbered_lines,
    read_golden,
    write_golden,
)
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


DEMO_CONFIG = "rules.example.toml"


def _port(text: str) -> int:
    """An ``--port`` value: 0 (any free port) to 65535."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not a port number (0 to 65535)")
    return port


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
    test.add_argument(
        "events", metavar="EVENTS.jsonl", nargs="?", help="one event envelope (JSON) per line"
    )
    test.add_argument(
        "--frames",
        metavar="FRAMES.jsonl",
        nargs="?",
        const="",
        help="read raw frames saved by 'tocsin record' instead of events (needs --source)",
    )
    test.add_argument("--source", metavar="NAME", help="the [sources.NAME] the frames came from")
    golden = test.add_mutually_exclusive_group()
    golden.add_argument(
        "--expect", metavar="GOLDEN.jsonl", help="exit 1, with a diff, unless the alerts match"
    )
    golden.add_argument(
        "--write-golden", metavar="GOLDEN.jsonl", help="write the alerts as a golden file"
    )

    explain = sub.add_parser("explain", help="why a rule does or does not fire for one event")
    _config_arg(explain)
    explain.add_argument("--rule", metavar="NAME", required=True, help="the rule's name")
    explain.add_argument("event", metavar="EVENT.json", help="one event envelope ('-': stdin)")

    record = sub.add_parser("record", help="save the raw frames of one source to a file")
    _config_arg(record)
    record.add_argument("--source", metavar="NAME", required=True, help="a [sources.NAME]")
    record.add_argument("--out", metavar="FRAMES.jsonl", required=True, help="where to write")
    record.add_argument("--count", type=_positive, metavar="N", help="stop after N frames")
    record.add_argument(
        "--duration", type=_duration, metavar="D", help='stop after D (e.g. "30s", "5m")'
    )

    sub.add_parser("plugins", help="list plugins, versions and what each registers")

    demo = sub.add_parser("demo", help="the bundled emulators and the daemon on the example rules")
    demo.add_argument(
        "-c",
        "--config",
        metavar="FILE",
        default=DEMO_CONFIG,
        help=f"config whose sources point at loopback (default: {DEMO_CONFIG})",
    )

    emulate = sub.add_parser("emulate", help="run one provider emulator standalone")
    emulate.add_argument("provider", help="e.g. eospark, ewallet, ckex (see tocsin plugins)")
    emulate.add_argument("--host", default="127.0.0.1", help="loopback address (default 127.0.0.1)")
    emulate.add_argument("--port", type=_port, default=0, help="port (default: a free one)")
    emulate.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="an emulator setting, e.g. refusal=403 for ckex (repeatable; a wrong name lists them)",
    )

    init = sub.add_parser("init", help="write a starter config")
    init.add_argument(
        "path", nargs="?", default="tocsin.toml", help="where (default: ./tocsin.toml)"
    )
    init.add_argument("--force", action="store_true", help="overwrite an existing file")

    outbox = sub.add_parser("outbox", help="pending and dead-lettered deliveries")
    _config_arg(outbox)
    outbox.add_argument("verb", nargs="?", choices=("list", "retry", "drop"), default="list")
    outbox.add_argument("seq", nargs="*", type=int, help="delivery numbers (first column of list)")
    outbox.add_argument(
        "--all",
        action="store_true",
        help="every dead-lettered delivery (drop also takes pending ones, by number)",
    )
    outbox.add_argument("--dead", action="store_true", help="list only dead-lettered deliveries")
    outbox.add_argument("--json", action="store_true", help="list as JSON (one document)")
    return parser


def _positive(text: str) -> int:
    if not (text.isascii() and text.isdigit()) or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number above 0, not {text!r}")
    return int(text)


def _duration(text: str) -> float:
    """A command-line duration: ``"30s"``, ``"5m"``..., or a plain number of seconds."""
    try:
        seconds = parse_duration(float(text) if re.fullmatch(r"\d+(\.\d+)?", text) else text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    if seconds <= 0:
        raise argparse.ArgumentTypeError("expected a duration above 0")
    return seconds


def _config_path(args: argparse.Namespace) -> str:
    return str(args.config or os.environ.get("TOCSIN_CONFIG") or DEFAULT_CONFIG)


def _registry() -> Registry:
    return build_registry(make_plugin_manager())


def _load(
    args: argparse.Namespace,
    registry: Registry,
    unchecked: Callable[[str, ValueError], bool] | None = None,
) -> tuple[Config, Engine]:
    try:
        config = load_config(_config_path(args), registry, unchecked=unchecked)
    except ConfigError as err:
        _notes(err.notes)
        raise
    _notes(config.notes)
    return config, Engine(compile_rules(config, registry))


def _notes(notes: Iterable[object]) -> None:
    for note in notes:  # (never a secret: it names the reference, not the value)
        print(f"tocsin: note: {note}", file=sys.stderr)


def _credential_outside_systemd(path: str, error: ValueError) -> bool:
    """``tocsin check`` in a shell: the service's credentials are not there to read."""
    return isinstance(error, SecretUnavailable) and error.kind == "credential"


def _any_unavailable(path: str, error: ValueError) -> bool:
    """``tocsin test`` and ``explain`` send nothing: secrets they cannot read are not needed."""
    return isinstance(error, SecretUnavailable)


def _outside_source(name: str) -> Callable[[str, ValueError], bool]:
    """``tocsin record`` connects to one source: other tables' secrets are not needed."""
    table = f"sources.{name}"

    def unchecked(path: str, error: ValueError) -> bool:
        inside = path == table or path.startswith((f"{table}.", f"{table}["))
        return isinstance(error, SecretUnavailable) and not inside

    return unchecked


def cmd_check(args: argparse.Namespace) -> int:
    config, engine = _load(args, _registry(), _credential_outside_systemd)
    off = len(config.rules) - len(engine.rules)
    print(
        f"{config.path}: ok: {len(config.sources)} source(s), {len(config.actions)} action(s),"
        f" {len(engine.rules)} rule(s)" + (f" ({off} disabled)" if off else "")
    )
    return 0


MAX_WAKES_PER_GAP = 100_000
"""``tocsin test`` ticks at most this many times between two events (then at the second)."""


def _event_clock(event: Event) -> float:
    """When an event of an events file happened: its ``time`` (UTC when it names no zone,
    as the rule kinds read it), else when it was received."""
    try:
        moment = datetime.fromisoformat(event.time.replace("Z", "+00:00"))
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
        return moment.timestamp()
    except (ValueError, OverflowError, OSError):
        return event.received


def _receipt_clock(event: Event) -> float:
    """When a recorded frame's event was received (its ``t``): the live daemon's clock."""
    return event.received


class _Output:
    """Prints results, with a progress bar on stderr while stderr is a terminal.

    The bar (tqdm, redrawn at most 10 times a second) follows the bytes read. A line
    printed to a terminal the bar is on clears the bar first, so they never mix.
    """

    def __init__(self, total: int) -> None:
        self.bar: tqdm[NoReturn] | None = None
        self._around_bar: set[int] = set()  # the streams printed through the bar
        if sys.stderr.isatty():
            self._around_bar = {2} | ({1} if sys.stdout.isatty() else set())
            self.bar = tqdm(
                total=total,
                unit="B",
                unit_scale=True,
                mininterval=0.1,
                leave=False,
                file=sys.stderr,
                dynamic_ncols=True,
            )

    def advance(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def line(self, text: str, *, err: bool = False) -> None:
        text = secret_registry.scrub(text)  # a match value or when may come from a secret
        stream = sys.stderr if err else sys.stdout
        if self.bar is not None and (2 if err else 1) in self._around_bar:
            self.bar.write(text, file=stream)
        else:
            print(text, file=stream)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _test_input(
    args: argparse.Namespace, config: Config, registry: Registry
) -> tuple[Path, Callable[[Iterable[tuple[str, bytes]], Skip], Iterator[tuple[str, Event]]]]:
    """The file ``tocsin test`` reads, and what turns its lines into events."""
    if args.frames is None:
        if args.source:
            raise UsageError("--source goes with --frames (events name their own source)")
        if not args.events:
            raise UsageError("test needs an EVENTS.jsonl file, or --frames FILE --source NAME")
        return Path(args.events), envelopes
    name = args.frames or args.events
    if not name or (args.frames and args.events):
        raise UsageError("test --frames reads one file: --frames FRAMES.jsonl --source NAME")
    if not args.source:
        raise UsageError("--frames needs --source NAME, the [sources.NAME] that was recorded")
    parse, factory = frame_parser(config, registry, args.source)
    return Path(name), lambda lines, skip: frames(lines, parse, factory, skip)


def cmd_test(args: argparse.Namespace) -> int:
    registry = _registry()
    config, engine = _load(args, registry, _any_unavailable)
    path, read = _test_input(args, config, registry)
    golden = Path(args.expect) if args.expect else None
    expected = read_golden(golden) if golden else None  # a bad golden file stops us first
    now = [0.0]
    # Throttles and windows follow the events' own times, so a file replays as it happened:
    # an envelope's time, or, for frames, when each was received (the daemon's clock).
    clock_of = _receipt_clock if args.frames is not None else _event_clock
    engine.clock = engine.wall = lambda: now[0]
    events = fired = bad = 0
    sent: list[str] = []
    # The firing alerts of each event, the latest per rule and group, as the daemon's
    # outbox reads them: a removal of the event (removed = true) retracts them.
    firing: dict[str, dict[tuple[str, str], str]] = {}
    try:
        size = path.stat().st_size
    except OSError:
        size = 0  # numbered_lines says why it cannot be read

    def skip(where: str, reason: str) -> None:
        nonlocal bad
        bad += 1
        out.line(f"{where}: skipped: {reason}", err=True)

    lines = numbered_lines(path, too_long=skip)  # before the bar: it may refuse the file
    out = _Output(size)

    def show(where: str, pending: PendingAlert) -> None:
        nonlocal fired
        fired += 1
        sent.append(golden_line(pending))
        alert = pending.alert
        if alert.status == "firing":
            firing.setdefault(pending.event_id, {})[(alert.rule, pending.group)] = alert.id
        out.line(
            f"{where}: [{alert.status}] {alert.rule} -> {', '.join(pending.actions) or '(no action)'}"
        )
        if where.endswith("(before)"):  # caused by time alone: when
            out.line(f"    at:    {alert.fired_at}")
        out.line(f"    title: {alert.title}")
        for body_line in alert.body.splitlines() or [""]:
            out.line(f"    body:  {body_line}")

    def counted(lines: Iterable[tuple[str, bytes]]) -> Iterator[tuple[str, bytes]]:
        for where, line in lines:
            out.advance(len(line))
            yield where, line

    try:
        for where, event in read(counted(lines), skip):
            events += 1
            # What time alone caused before this event, at each time a kind wakes (a repeat
            # due between two events hours apart); never backwards, as in the daemon.
            until = max(now[0], clock_of(event))
            if events == 1:
                now[0] = until  # the replay's time starts at its first event
            for wakes in itertools.count():
                for pending in engine.tick():
                    show(f"{where} (before)", pending)
                if now[0] == until:
                    break
                due = engine.wakes_at()
                if due is None or not now[0] < due < until or wakes >= MAX_WAKES_PER_GAP:
                    due = until  # nothing due before the event (or too many wakes)
                now[0] = due
            engine.suppressed.clear()
            if event.removed:  # as the daemon does: retract what the fact fired, nothing else
                engine.discard(event)  # and stop counting it
                fired_before = firing.pop(event.id, {})
                for (rule, group), alert_id in fired_before.items():
                    retraction = engine.retraction(rule, alert_id, group, event)
                    if retraction is None:
                        out.line(f'{where}: no alert from {rule!r}: on_removed = "ignore"')
                    else:
                        show(where, retraction)
                if not fired_before:
                    out.line(f"{where}: a removal of a fact that fired nothing: no alert")
                continue
            alerts = engine.process(event)
            explained = engine.explain(event)
            states = {rule: state for rule, _, state in explained if state}
            for pending in alerts:
                show(where, pending)
                rule = pending.alert.rule
                if rule in states:  # under the rule's (first) alert
                    out.line(f"    {rule}: {states.pop(rule)}")
            rules_sent = {p.alert.rule for p in alerts}
            for rule, reason, state in explained:
                if rule in rules_sent:
                    continue
                why = reason or engine.suppressed.get(rule) or state or "matched; no alert yet"
                out.line(f"{where}: no alert from {rule!r}: {why}")
    finally:
        out.close()
    stats = engine.stats
    print(
        f"{events} event(s), {fired} alert(s) would be sent"
        + (f", {stats.throttled} throttled" if stats.throttled else "")
        + (f", {stats.duplicates} duplicate(s) skipped" if stats.duplicates else "")
        + (f", {bad} line(s) skipped" if bad else "")
    )
    if args.write_golden:
        write_golden(Path(args.write_golden), sent)
        print(f"wrote {len(sent)} alert(s) to {args.write_golden}")
    if golden is None or expected is None:
        return 0
    diff = golden_diff(expected, sent, golden)
    if not diff:
        print(f"{golden}: the {len(sent)} alert(s) are as expected")
        return 0
    for line in diff:
        print(line)
    print(f"{golden}: the alerts differ (- expected, + this run); --write-golden to accept them")
    return 1


def _say(text: str) -> None:
    """A line of ``tocsin explain``: it quotes ``match`` and ``when``, which may hold secrets."""
    print(secret_registry.scrub(text))


def cmd_explain(args: argparse.Namespace) -> int:
    config, engine = _load(args, _registry(), _any_unavailable)
    name = args.rule
    entry = next((e for e in config.rules if e.config.name == name), None)
    if entry is None:
        close = difflib.get_close_matches(name, [e.config.name for e in config.rules], n=3)
        hint = f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""
        raise UsageError(f"{config.path} has no rule {name!r}{hint}")
    if name not in engine.rules:
        _say(f"rule {name!r} is disabled (enabled = false): it fires for no event")
        return 0
    event = _read_event(args.event)
    now = _event_clock(event)
    engine.clock = engine.wall = lambda: now
    rule = engine.rules[name]
    _say(f"rule {name!r} on event {event.id} ({event.type} from {event.source}, {event.time})")
    steps = engine.trace(rule, event)
    for step in steps:
        _say(f"  {'ok' if step.ok else 'FAIL':<4}  {step.what}: {step.detail}")
    alerts = [p for p in engine.process(event) if p.alert.rule == name]
    for pending in alerts:
        alert = pending.alert
        _say(f"fires: [{alert.status}] {alert.title}")
        _say(f"    to:    {', '.join(pending.actions) or '(no action)'}")
        for body_line in alert.body.splitlines() or [""]:
            _say(f"    body:  {body_line}")
    if alerts:
        return 0
    failed = next((s for s in steps if not s.ok), None)
    if failed is not None:
        why = f"{failed.what}: {failed.detail}"
    else:  # every check held: the kind (a window not full yet) or a duplicate kept it
        state = rule.kind.explain(rule.group_key(event), now)
        why = engine.suppressed.get(name) or (
            f"matched; {rule.config.kind}: {state}" if state else "matched; no alert"
        )
    _say(f"does not fire: {why}")
    return 0


def _read_event(name: str) -> Event:
    try:
        text = sys.stdin.buffer.read() if name == "-" else Path(name).read_bytes()
    except OSError as err:
        raise UsageError(f"cannot read {name}: {err.strerror}") from None
    try:
        return Event.from_envelope(orjson.loads(text))
    except ValueError as err:
        raise UsageError(f"{name}: not one event envelope (SPEC section 4): {err}") from None


def _ends_mid_line(path: Path) -> bool:
    """Whether ``path`` is a file whose last line has no newline (cut by a crash)."""
    with path.open("rb") as fh:
        if fh.seek(0, os.SEEK_END) == 0:
            return False
        fh.seek(-1, os.SEEK_END)
        return fh.read(1) != b"\n"


def cmd_record(args: argparse.Namespace) -> int:
    setup_logging("info")
    registry = _registry()
    try:
        config = load_config(_config_path(args), registry, unchecked=_outside_source(args.source))
    except ConfigError as err:
        _notes(err.notes)
        raise
    _notes(config.notes)
    cls = configured_source(config, registry, args.source)
    source_config = config.sources[args.source]
    try:
        replayable = cls.frame_parser(source_config, ReplayFactory(args.source, cls.name))
    except Exception:  # a parser that cannot even be built cannot replay either
        replayable = None
    if replayable is None:
        print(
            f"tocsin: warning: plugin {cls.name} has no frame parser: these frames can be"
            " kept but not replayed by tocsin test --frames",
            file=sys.stderr,
        )
    out = Path(args.out)
    try:
        handle = out.open("ab")  # a second recording adds to the first, never erases it
        if _ends_mid_line(out):  # a crash cut the last line: start on a line of our own
            handle.write(b"\n")
    except OSError as err:
        raise UsageError(f"cannot write {out}: {err.strerror}") from None
    with handle:
        seen = anyio.run(
            functools.partial(
                record,
                source_config,
                cls,
                args.source,
                handle,
                count=args.count,
                duration=args.duration,
            )
        )
    print(
        f"recorded {seen.frames} frame(s), {seen.events} event(s)"
        + (f", {seen.rejected} frame(s) rejected" if seen.rejected else "")
        + f" from {args.source!r} to {out}"
    )
    if seen.error:
        print(f"tocsin: stopped: cannot write {out}: {seen.error}", file=sys.stderr)
        return 1
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
# tocsin starter config: see README.md and docs/SPEC.md section 3 for every key.
# Add a [sources.NAME] table for each provider connection (`tocsin plugins` lists them),
# point actions.hook.url at your receiver, then: tocsin check -c THIS_FILE
# The webhook secret is read from $TOCSIN_HOOK_SECRET; remove "hook" if you have none.
# State (alerts, outbox, cursors) goes to $STATE_DIRECTORY under systemd, else to
# ~/.local/state/tocsin; set [daemon] state_dir only to put it elsewhere.

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
    print(
        f"wrote {path}; set TOCSIN_HOOK_SECRET (the webhook's signing secret) or remove"
        f" [actions.hook], then check it with: tocsin check -c {path}"
    )
    return 0


def cmd_outbox(args: argparse.Namespace) -> int:
    daemon = load_daemon_config(_config_path(args), _registry())
    store = Store.open(daemon.resolved_state_dir(), fsync=daemon.fsync)
    try:
        if args.verb == "list":
            if args.seq:
                raise UsageError(
                    "outbox list takes no delivery numbers (they are for retry and drop)"
                )
            states = [DEAD] if args.dead else [PENDING, DEAD]
            rows = store.call_sync(Store.list_deliveries, states)
            counts = store.call_sync(Store.counts)
            if args.json:
                print(orjson.dumps(outbox_json(rows, counts)).decode())
            else:
                for line in outbox_lines(rows, counts, dead_only=args.dead, now=time.time()):
                    print(line)
            return 0
        if not args.seq and not args.all:
            raise UsageError(f"outbox {args.verb} needs delivery numbers or --all")
        seqs = None if args.all else args.seq
        if args.verb == "retry":
            done = store.call_sync(Store.retry, seqs)
            n = len(done)
            print(
                f"{n} dead-lettered deliver{'y' if n == 1 else 'ies'} queued again;"
                " a running daemon picks them up within 5 s"
            )
            return _not_done(seqs, done, "dead-lettered")
        # By number, a pending delivery can be dropped too (one stuck at the head of its
        # group); --all drops the dead letters only.
        done = store.call_sync(Store.drop, seqs, seqs is None)
        n = len(done)
        print(
            f"{n} deliver{'y' if n == 1 else 'ies'} dropped"
            + ("" if seqs is None else "; a running daemon may still finish one it had begun")
        )
        return _not_done(seqs, done, "undelivered")
    finally:
        store.close()


def _not_done(asked: list[int] | None, done: list[int], what: str) -> int:
    """Exit status of ``outbox retry``/``drop``: 1, saying which, when a number asked for
    was not a delivery it could act on."""
    missed = sorted(set(asked or ()) - set(done))
    if not missed:
        return 0
    numbers = ", ".join(str(seq) for seq in missed)
    print(
        f"tocsin: not {what}, or no such delivery: {numbers} (see tocsin outbox)",
        file=sys.stderr,
    )
    return 1


def cmd_run(args: argparse.Namespace) -> int:
    from .daemon import Daemon

    if args.log_level not in LEVELS:  # from $TOCSIN_LOG_LEVEL, which argparse does not check
        raise UsageError(
            f"TOCSIN_LOG_LEVEL={args.log_level!r} is not a log level: use one of {', '.join(LEVELS)}"
        )
    setup_logging(args.log_level, args.log_format)
    # Until the signal receiver below is in place, a SIGHUP (systemctl reload, a logrotate
    # hook) would end the process: ignore it meanwhile.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    # The state writer is a thread: while the event loop is busy it waits for the GIL up to
    # the switch interval (5 ms by default) at every commit and outbox read, and an alert
    # waits on two or three of those. 1 ms keeps that off the alert's latency (make bench).
    sys.setswitchinterval(0.001)
    # The collector's youngest generation is collected after 700 net allocations of
    # containers, fewer than one engine batch holds (512 events of a few dicts each): so
    # it ran every few hundred events and walked every event still waiting in the intake,
    # promoting them into generation 1, whose collections then walked them again. In make
    # bench that was 0.14 s of collection per 100,000 events (1.4 us/event, measured with
    # gc.callbacks); with 50,000 it is one collection. Reference counting frees nearly all
    # of these objects anyway; what waits longer is cyclic garbage, at most 50,000 objects.
    gc.set_threshold(50_000, *gc.get_threshold()[1:])
    daemon = Daemon(_config_path(args), _registry(), notifier=Notifier())

    async def main() -> None:
        async with anyio.create_task_group() as tg:
            reload_waiting = False

            async def reload_once_ready() -> None:
                # A SIGHUP during start-up reloads once the daemon is READY: reloading
                # midway would announce READY=1 before the sources are started.
                nonlocal reload_waiting
                await daemon.ready.wait()
                reload_waiting = False
                await daemon.reload()

            async def signals() -> None:
                nonlocal reload_waiting
                with anyio.open_signal_receiver(
                    signal.SIGTERM, signal.SIGINT, signal.SIGHUP
                ) as received:
                    async for signum in received:
                        if signum != signal.SIGHUP:
                            daemon.stop()
                        elif daemon.ready.is_set():
                            await daemon.reload()
                        elif not reload_waiting:
                            reload_waiting = True
                            tg.start_soon(reload_once_ready)

            tg.start_soon(signals)
            await daemon.run()
            tg.cancel_scope.cancel()

    _run(main)
    return 0


def _run(func: Callable[..., Awaitable[object]], *args: object) -> None:
    """``anyio.run``, with a tocsin error unwrapped from its task groups.

    Start-up errors (the state database, an address in use) come out of the task groups
    wrapped; the user reads the one sentence, not a traceback.
    """
    try:
        anyio.run(func, *args)
    except BaseExceptionGroup as group:
        error: BaseException = group
        while isinstance(error, BaseExceptionGroup) and len(error.exceptions) == 1:
            error = error.exceptions[0]
        if isinstance(error, TocsinError):
            raise error from None
        raise


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import printer, run_demo

    setup_logging("warning")
    if args.config == DEMO_CONFIG and not Path(DEMO_CONFIG).exists():
        raise UsageError(
            f"{DEMO_CONFIG} is not here (it is in tocsin's source tree): run tocsin demo"
            " there, or give -c FILE, a config whose sources point at 127.0.0.1"
        )
    # rules.example.toml signs its webhook with $TOCSIN_HOOK_SECRET, and runs as it is:
    # the demo's own receiver checks the signature, so any secret will do.
    os.environ.setdefault("TOCSIN_HOOK_SECRET", "demo-secret")
    _run(run_demo, str(args.config), _registry(), printer())
    return 0


def cmd_emulate(args: argparse.Namespace) -> int:
    from .demo import printer, run_emulator

    setup_logging("info")
    _run(run_emulator, _registry(), args.provider, args.host, args.port, printer(), args.set)
    return 0


COMMANDS = {
    "demo": cmd_demo,
    "emulate": cmd_emulate,
    "run": cmd_run,
    "check": cmd_check,
    "test": cmd_test,
    "explain": cmd_explain,
    "record": cmd_record,
    "plugins": cmd_plugins,
    "init": cmd_init,
    "outbox": cmd_outbox,
}


def _fail(err: TocsinError) -> None:
    """The one sentence of an error, every secret masked (a plugin's message may quote one)."""
    print(secret_registry.scrub(f"tocsin: {err}"), file=sys.stderr)


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
        _fail(err)
        return 2
    except TocsinError as err:
        _fail(err)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (``tocsin test ... | head``): stop quietly, and keep Python's
        # own flush at exit from failing on the same pipe.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
