"""A source in a process of its own (``[daemon] source_processes = true``).

The daemon's process spends most of its CPU per event on what every source does for
every frame: receiving, decoding, building events, asking the rule index. With the source
in a child process that work runs on another core, and the child hands over only the
events a rule may fire on (``EventFilter``, the rule index's keys), with counts of the
rest: 1% of a busy feed's events, where handing every event over would cost more than
it saves (docs/performance.md).

The two talk through the child's stdin and stdout, each message a 4-byte length and a
pickle (both ends are this module; nothing else writes these pipes). The parent's
``SourceRunner`` stays the source's context: the child's ``up``/``down``/``gap``,
cursors, rejects and log records come back to it in order, so states, counts, the log
(secrets scrubbed there) and cursors behave as they do in one process. The child's
stdout is the pipe alone (a plugin's ``print`` goes to stderr, which the parent logs).

The child ignores SIGINT, SIGTERM and SIGHUP: the daemon decides when it ends (it kills
it when the source stops or is reloaded away), and it exits by itself when its stdin
closes (the daemon is gone). A child that dies is started again with backoff, the source
``down`` meanwhile ("crashed: ..."), as a crashed source is in one process.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import importlib
import logging
import operator
import os
import pickle
import signal
import struct
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import anyio

from .events import Event, utc_iso
from .logs import quiet_libraries
from .rules import EventFilter
from .source import Backoff, EventFactory, Source, keep_running

if TYPE_CHECKING:
    from .daemon import SourceRunner

HEADER = struct.Struct(">I")
MAX_MESSAGE = 64 * 1024 * 1024
"""A message longer than this ends the child as crashed (a bug; events go in slices)."""
READ = 256 * 1024
"""Bytes read from a pipe at a time."""
SLICE = 1024
"""At most this many events per message."""
FLUSH_EVERY = 0.1
"""Counts of events no rule can fire on go to the daemon at least this often (seconds)."""
WRITE_AFTER = 0.002
"""The child's messages are written together, this long after the first waiting: a write
to the pipe costs more than the few events most messages carry (make bench: 0.8 us of the
child's CPU per event with a write per message)."""
WRITE_NOW = 256 * 1024
"""... or at once when this many bytes wait (and the source waits for the pipe)."""
STOP_WAIT = 5.0
_DAEMON_ONLY = frozenset(
    ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES")
)
STDERR_LINE = 2000
"""A line of the child's stderr is logged up to this many characters."""


def pack(message: object) -> bytes:
    """One message as it goes through a pipe."""
    body = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return HEADER.pack(len(body)) + body


class Unpacker:
    """Splits the bytes read from a pipe into messages."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[Any]:
        buffer = self._buffer
        buffer += data
        out = []
        start = 0
        while len(buffer) - start >= HEADER.size:
            (size,) = HEADER.unpack_from(buffer, start)
            if size > MAX_MESSAGE:
                raise ValueError(f"a message of {size} bytes from the source's process")
            end = start + HEADER.size + size
            if end > len(buffer):
                break
            # The pipe's other end is this module, in a process the daemon started.
            out.append(pickle.loads(memoryview(buffer)[start + HEADER.size : end]))  # noqa: S301
            start = end
        del buffer[:start]
        return out


def importable(cls: type) -> bool:
    """Whether a child process can import ``cls`` by its module and name."""
    return cls.__module__ != "__main__" and "<locals>" not in cls.__qualname__


# -- the daemon's side -------------------------------------------------------------------


def spawn(cls: type[Source]) -> subprocess.Popen[bytes]:
    """Start a process for a source of class ``cls``: it imports the plugin at once, and
    waits for the rest (``ChildProcess``). The daemon spawns its sources' processes before
    it compiles the rules, so that their start-up (0.4 s) and its own overlap."""
    # Not the daemon's systemd sockets: only the daemon talks to systemd.
    env = {k: v for k, v in os.environ.items() if k not in _DAEMON_ONLY}
    process = subprocess.Popen(  # this interpreter, this module
        [sys.executable, "-m", "tocsin.sourceproc"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    assert process.stdin is not None
    process.stdin.write(pack((list(sys.path), cls.__module__, cls.__qualname__)))
    process.stdin.flush()
    return process


async def _pipe_writer(pipe: Any) -> asyncio.StreamWriter:
    """A stream writer on the pipe file ``pipe`` (either end of a source's process)."""
    loop = asyncio.get_running_loop()
    transport, protocol = await loop.connect_write_pipe(asyncio.streams.FlowControlMixin, pipe)
    return asyncio.StreamWriter(transport, protocol, None, loop)


async def _pipe_reader(pipe: Any) -> tuple[asyncio.StreamReader, asyncio.BaseTransport]:
    """A stream reader on the pipe file ``pipe``, and its transport (to close)."""
    reader = asyncio.StreamReader(limit=MAX_MESSAGE)
    transport, _ = await asyncio.get_running_loop().connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reader), pipe
    )
    return reader, transport


def end(process: subprocess.Popen[bytes]) -> None:
    """Kill a source's process (it keeps no state) and reap it."""
    if process.poll() is None:
        process.kill()
    process.wait()
    for pipe in (process.stdin, process.stdout, process.stderr):
        if pipe is not None:
            with contextlib.suppress(OSError):
                pipe.close()


class ChildProcess:
    """The daemon's end of one source's process: started, read, told, killed."""

    def __init__(self, runner: SourceRunner, spare: subprocess.Popen[bytes] | None = None) -> None:
        self.runner = runner
        self._spare = spare  # spawned at start-up, not yet told what to run
        self._writer: asyncio.StreamWriter | None = None
        self.pid: int | None = None
        self.rules_sent = 0  # how many times the rules changed while it ran
        self.rules_applied = 0  # ... and how many of those it said it applies

    async def send(self, message: object) -> None:
        """Send a message to the child; nothing if it is not running."""
        writer = self._writer
        if writer is None:
            return
        # If it is gone, the reader sees the end of its output and reports it.
        with contextlib.suppress(OSError):
            writer.write(pack(message))  # whole: nothing interleaves with rules_changed
            await writer.drain()

    def rules_changed(self, wanted: EventFilter) -> None:
        """The daemon's rules changed: the child filters with ``wanted`` from now on (once
        ``rules_applied`` has caught up with ``rules_sent``).

        Queued, not waited for: a reload must not hang on a child that reads slowly (the
        filter of 10,000 rules is larger than a pipe's buffer)."""
        writer = self._writer
        if writer is None:
            return  # the next child starts with the rules then in force
        self.rules_sent += 1
        with contextlib.suppress(OSError):
            writer.write(pack(("filter", self.rules_sent, wanted)))

    async def run(self, first: Any) -> None:
        """Start the child again and again (with backoff) until cancelled."""
        runner = self.runner
        backoff = Backoff(maximum=runner.config.max_backoff)
        try:
            while True:
                started = time.monotonic()
                try:
                    reason = await self._run_once(first)
                except Exception as err:  # cannot start it, or a message it should not send
                    runner.logger.exception("source %r: its process failed", runner.source)
                    reason = f"crashed: {type(err).__name__}"
                first.started()
                if time.monotonic() - started >= 60.0:
                    backoff.failures = 0
                if runner.daemon.stopping:
                    return
                runner.logger.error("source %r: %s", runner.source, reason)
                await runner.down(reason)
                await anyio.sleep(backoff.delay())
        finally:
            if self._spare is not None:
                end(self._spare)

    async def _run_once(self, first: Any) -> str:
        runner = self.runner
        process, self._spare = self._spare or spawn(runner.cls), None
        transports: list[asyncio.BaseTransport] = []
        try:
            assert process.stdin and process.stdout and process.stderr
            self._writer = await _pipe_writer(process.stdin)
            transports.append(self._writer.transport)
            stdout, transport = await _pipe_reader(process.stdout)
            transports.append(transport)
            stderr, transport = await _pipe_reader(process.stderr)
            transports.append(transport)
            self.pid = process.pid
            await self.send(
                (
                    runner.config,
                    runner.source,
                    logging.getLogger().getEffectiveLevel(),
                    runner.daemon.engine.index.filter(),
                )
            )
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._relay_stderr, stderr)
                try:
                    await self._read(stdout, first)
                except ValueError as err:
                    return f"crashed: {err}"
                finally:
                    tg.cancel_scope.cancel()
            with anyio.move_on_after(STOP_WAIT):
                code = await anyio.to_thread.run_sync(process.wait, abandon_on_cancel=True)
                return f"crashed: its process exited with code {code}"
            return "crashed: its process closed its output"
        finally:
            for transport in transports:  # before the writer goes, which checks its own
                transport.close()
            self._writer = None
            end(process)

    async def _read(self, stdout: asyncio.StreamReader, first: Any) -> None:
        runner = self.runner
        daemon = runner.daemon
        unpacker = Unpacker()
        source, provider = runner.source, runner.provider
        while data := await stdout.read(READ):
            for message in unpacker.feed(data):
                kind = message[0]
                if kind == "events":
                    _, counts, dropped, wanted = message
                    runner.events += sum(counts.values())
                    runner.types.update(counts)
                    runner.last_event = time.time()
                    daemon.engine.stats.events += dropped
                    if wanted:
                        await daemon.intake_many(
                            [
                                Event(i, source, provider, t, d, at, removed, received)
                                for i, t, d, at, removed, received in wanted
                            ]
                        )
                elif kind == "log":
                    _, name, level, text, exc_text = message
                    logger = logging.getLogger(name)
                    if logger.isEnabledFor(level):
                        record = logger.makeRecord(
                            name, level, "(source process)", 0, "%s", (text,), None
                        )
                        record.exc_text = exc_text
                        logger.handle(record)
                elif kind == "started":
                    first.started()
                elif kind == "filtering":
                    self.rules_applied = message[1]
                elif kind == "up":
                    await runner.up()
                elif kind == "down":
                    await runner.down(message[1])
                elif kind == "stale":
                    await runner.stale(message[1])
                elif kind == "gap":
                    _, reason, since, until, detail = message
                    await runner.gap(reason, since, until, detail=detail)
                elif kind == "reject":
                    runner.reject(message[1])
                elif kind == "load_cursor":
                    _, request, key = message
                    await self.send(("cursor", request, await runner.load_cursor(key)))
                elif kind == "save_cursor":
                    await runner.save_cursor(message[1], message[2])

    async def _relay_stderr(self, stderr: asyncio.StreamReader) -> None:
        """What the child writes to stderr (a plugin's print, a dying interpreter's last
        words) goes to the log as warnings, through the same scrubbing."""
        pending = b""
        while data := await stderr.read(READ):
            *lines, pending = (pending + data).split(b"\n")
            for line in lines:
                self._stderr_line(line)
            if len(pending) > STDERR_LINE:
                self._stderr_line(pending)
                pending = b""
        if pending:
            self._stderr_line(pending)

    def _stderr_line(self, line: bytes) -> None:
        text = line.decode("utf-8", "replace").rstrip()
        if text:
            runner = self.runner
            runner.logger.warning("source %r (its process): %s", runner.source, text[:STDERR_LINE])


# -- the child's side --------------------------------------------------------------------


class ChildContext(EventFactory):
    """The ``SourceContext`` of a source in its own process: everything goes to the
    daemon's ``SourceRunner`` through the pipe, events only when a rule may fire on them."""

    def __init__(
        self,
        source: str,
        provider: str,
        rules: EventFilter,
        writer: asyncio.StreamWriter,
    ) -> None:
        self.source = source
        self.provider = provider
        self.logger = logging.getLogger(f"tocsin.source.{source}")
        self.rules = rules
        self._writer = writer
        self._counts: Counter[str] = Counter()
        self._dropped = 0
        self._requests: dict[int, asyncio.Future[str | None]] = {}
        self._next_request = 0
        self._out: list[bytes] = []
        self._waiting = 0  # bytes in _out
        self._timer: asyncio.TimerHandle | None = None

    # What goes to the daemon.

    def write(self, message: object) -> None:
        """Queue a message for the daemon; written within ``WRITE_AFTER``."""
        data = pack(message)
        self._out.append(data)
        self._waiting += len(data)
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(WRITE_AFTER, self._write_out)

    def _write_out(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._out:
            self._writer.write(b"".join(self._out))
            self._out.clear()
            self._waiting = 0

    async def _drain(self) -> None:
        """Wait while the pipe is full (the daemon is behind): the source reads no more."""
        if self._waiting >= WRITE_NOW:
            self._write_out()
        await self._writer.drain()

    async def _send(self, message: object) -> None:
        self._flush_counts()
        self.write(message)
        self._write_out()
        await self._writer.drain()

    def _flush_counts(self) -> None:
        if self._counts:
            self.write(("events", dict(self._counts), self._dropped, []))
            self._counts.clear()
            self._dropped = 0

    async def flush_every(self, seconds: float) -> None:
        """Send the counts of dropped events at least every ``seconds``."""
        while True:
            await asyncio.sleep(seconds)
            self._flush_counts()

    # SourceContext.

    async def emit(self, event: Event) -> None:
        await self.emit_many((event,))

    async def emit_many(self, events: Iterable[Event]) -> None:
        sift = self.sift  # counts what it drops
        wanted = [
            (event.id, event.type, event.data, event.time, event.removed, event.received)
            for event in events
            if event.removed or sift(event.type, event.data)
        ]
        if not wanted:
            return
        counts = self._counts
        counts.update(map(_type_of_wanted, wanted))
        for start in range(0, len(wanted), SLICE):
            self.write(("events", dict(counts), self._dropped, wanted[start : start + SLICE]))
            counts.clear()
            self._dropped = 0
        await self._drain()

    async def up(self) -> None:
        await self._send(("up",))

    async def down(self, reason: str) -> None:
        await self._send(("down", reason))

    async def stale(self, reason: str) -> None:
        await self._send(("stale", reason))

    async def gap(
        self,
        reason: str,
        since: str,
        until: str = "",
        *,
        detail: Mapping[str, str | int] | None = None,
    ) -> None:
        await self._send(("gap", reason, since, until or utc_iso(), dict(detail or {})))

    def sift(self, type: str, data: dict[str, Any]) -> bool:
        if self._may_fire(self.source, type, data):
            return True
        self._counts[type] += 1
        self._dropped += 1
        return False

    @property
    def rules(self) -> EventFilter:
        """What a rule may fire on, as the daemon last sent it."""
        return self._rules

    @rules.setter
    def rules(self, rules: EventFilter) -> None:
        self._rules = rules
        self._may_fire = rules.may_fire  # bound once: sift runs for every event

    def reject(self, reason: str) -> None:
        self.write(("reject", reason))

    def received(self, frame: str | bytes) -> None:
        pass  # only ``tocsin record`` keeps raw frames

    async def load_cursor(self, key: str) -> str | None:
        self._next_request += 1
        request = self._next_request
        answer: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()
        self._requests[request] = answer
        try:
            await self._send(("load_cursor", request, key))
            return await answer
        finally:
            self._requests.pop(request, None)

    async def save_cursor(self, key: str, value: str) -> None:
        await self._send(("save_cursor", key, value))

    def started(self, value: object = None) -> None:
        """The source's ``task_status.started()``."""
        self.write(("started",))
        self._write_out()

    # What comes from the daemon.

    def answer(self, message: Any) -> None:
        kind = message[0]
        if kind == "filter":
            _, generation, self.rules = message
            self.write(("filtering", generation))
        elif kind == "cursor":
            answer = self._requests.get(message[1])
            if answer is not None and not answer.done():
                answer.set_result(message[2])


_type_of_wanted = operator.itemgetter(1)  # of emit_many's tuples


class PipeHandler(logging.Handler):
    """The child's log records go to the daemon, which logs them as its own."""

    def __init__(self, ctx: ChildContext, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__()
        self._ctx = ctx
        self._loop = loop
        self._formatter = logging.Formatter()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            exc_text = record.exc_text
            if record.exc_info and not exc_text:
                exc_text = self._formatter.formatException(record.exc_info)
            message = ("log", record.name, record.levelno, record.getMessage(), exc_text)
            try:
                running = asyncio.get_running_loop()
            except RuntimeError:
                running = None
            if running is self._loop:
                self._ctx.write(message)
            else:
                self._loop.call_soon_threadsafe(self._ctx.write, message)
        except Exception:
            self.handleError(record)


def _read_message(fd: int) -> Any:
    """One message from ``fd``, blocking (the child's first: what to run)."""

    def exactly(n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = os.read(fd, n - len(data))
            if not chunk:
                raise SystemExit(0)  # the daemon is gone before telling us anything
            data += chunk
        return data

    (size,) = HEADER.unpack(exactly(HEADER.size))
    return pickle.loads(exactly(size))  # noqa: S301  # from the daemon that started us


async def _child(out: int, cls: type[Source], init: tuple[Any, ...]) -> None:
    config, source, level, wanted = init
    writer = await _pipe_writer(os.fdopen(out, "wb", buffering=0))
    reader, _ = await _pipe_reader(os.fdopen(0, "rb", buffering=0))
    ctx = ChildContext(source, cls.name, wanted, writer)
    root = logging.getLogger()
    root.handlers[:] = [PipeHandler(ctx, asyncio.get_running_loop())]
    root.setLevel(level)
    quiet_libraries(level <= logging.DEBUG)
    # As the daemon does (cli.py): what start-up built stays out of the collector's way,
    # and the youngest generation is collected after 50,000 allocations, not 700.
    gc.freeze()
    gc.set_threshold(50_000, *gc.get_threshold()[1:])

    async def listen() -> None:
        unpacker = Unpacker()
        while data := await reader.read(READ):
            for message in unpacker.feed(data):
                ctx.answer(message)
        os._exit(0)  # the daemon is gone: so is its source

    async with anyio.create_task_group() as tg:
        tg.start_soon(listen)
        tg.start_soon(ctx.flush_every, FLUSH_EVERY)
        await keep_running(cls, config, ctx, Backoff(maximum=config.max_backoff), ctx)


def main() -> None:
    """``python -m tocsin.sourceproc``: run the source the daemon sends on stdin."""
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.SIG_IGN)
    # The pipe to the daemon is a private copy of stdout; fd 1 becomes stderr, so that a
    # plugin's print() cannot break the messages.
    out = os.dup(1)
    os.dup2(2, 1)
    path, module, qualname = _read_message(0)
    for entry in path:
        if entry not in sys.path:
            sys.path.append(entry)
    # The plugin is imported before the rest arrives (spawn): if that fails, the traceback
    # goes to stderr, which the daemon logs, and the exit code says it crashed.
    found: Any = importlib.import_module(module)
    for part in qualname.split("."):
        found = getattr(found, part)
    anyio.run(_child, out, found, _read_message(0))


if __name__ == "__main__":
    main()
