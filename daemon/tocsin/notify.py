"""The systemd notify protocol in plain Python, and the watchdog's idea of progress.

``Notifier`` sends datagrams to ``$NOTIFY_SOCKET`` (a path, or ``@name`` in the abstract
namespace): ``READY=1``, ``STATUS=...``, ``WATCHDOG=1``, ``RELOADING=1`` (with the
``MONOTONIC_USEC=`` systemd 253+ asks for) and ``STOPPING=1``. It never blocks the event
loop: the socket is non-blocking and a datagram that does not fit is dropped.

``Watchdog`` decides, without I/O, whether the daemon still makes progress; the daemon
sends ``WATCHDOG=1`` (at least every half of ``$WATCHDOG_USEC``) only when it does.
Progress means all of:

- the event loop turns: the pings come from a task on it, so a blocked loop sends none;
- the state database answers: the store's one writer thread, which every commit, outbox
  read and delivery outcome goes through, answered the last probe (the status query)
  within the watchdog timeout. An error is an answer: a full disk or a lock held by
  another process is a state the daemon reports and retries, and a restart would not
  cure it;
- the engine keeps up: while events wait in the intake stream, or while it holds a batch
  it has not finished, it takes more off, or it is paused on a commit failure it reports (intake pauses on a full disk by design, and a
  restart would drop the events waiting in memory).

The delivery workers are not checked on their own: they wait only on the event loop, the
store (both checked) and their receivers, and a hanging receiver is bounded by the
action's ``timeout``, not a reason to restart.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

log = logging.getLogger(__name__)


def monotonic_usec() -> int:
    """``CLOCK_MONOTONIC`` in microseconds, as ``MONOTONIC_USEC=`` wants it."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


class Notifier:
    """Sends notify messages when run under systemd (``$NOTIFY_SOCKET`` set); else nothing.

    ``address`` overrides ``$NOTIFY_SOCKET`` (``""`` turns notifications off); ``environ``
    overrides ``os.environ`` for ``$NOTIFY_SOCKET``, ``$WATCHDOG_USEC`` and ``$WATCHDOG_PID``.
    """

    def __init__(
        self, address: str | None = None, environ: Mapping[str, str] | None = None
    ) -> None:
        env = os.environ if environ is None else environ
        raw = address if address is not None else env.get("NOTIFY_SOCKET", "")
        self.address = ""
        if raw.startswith("@"):
            self.address = "\0" + raw[1:]  # the abstract namespace
        elif raw.startswith("/"):
            self.address = raw
        elif raw:
            log.warning("NOTIFY_SOCKET=%r is not a path or an @abstract name: not notifying", raw)
        self.watchdog_interval = _watchdog_interval(env) if self.address else None
        self._failed = False

    @property
    def enabled(self) -> bool:
        """Whether there is a socket to notify."""
        return bool(self.address)

    def send(self, *fields: str) -> bool:
        """Send ``fields`` (``"READY=1"``, ``"STATUS=..."``) as one datagram; False if not sent."""
        if not self.address:
            return False
        text = "\n".join(f.replace("\n", " ") for f in fields)
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.setblocking(False)
                sock.sendto(text.encode("utf-8", "replace"), self.address)
        except OSError as err:
            # Warn once: a vanished socket would otherwise log twice a second.
            level = logging.DEBUG if self._failed else logging.WARNING
            self._failed = True
            log.log(level, "systemd notify failed (%s): %s", fields[0], err)
            return False
        self._failed = False
        return True

    def ready(self, status: str) -> bool:
        """Start-up (or a reload) is complete."""
        return self.send("READY=1", f"STATUS={status}")

    def reloading(self) -> bool:
        """A reload starts; ``ready()`` ends it."""
        return self.send("RELOADING=1", f"MONOTONIC_USEC={monotonic_usec()}")

    def stopping(self, status: str) -> bool:
        """Shutdown starts."""
        return self.send("STOPPING=1", f"STATUS={status}")

    def status(self, status: str) -> bool:
        return self.send(f"STATUS={status}")

    def watchdog(self) -> bool:
        return self.send("WATCHDOG=1")


def _watchdog_interval(env: Mapping[str, str]) -> float | None:
    """Seconds between ``WATCHDOG=1`` pings (half of ``$WATCHDOG_USEC``), or None."""
    pid = env.get("WATCHDOG_PID", "")
    if pid and pid != str(os.getpid()):
        return None  # meant for another process (we were started by one that had it)
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    return usec / 2_000_000 if usec > 0 else None


@dataclass(frozen=True, slots=True)
class Progress:
    """What the watchdog looks at, sampled at each tick."""

    taken: int
    """Events and cursors the engine has taken off the intake stream since start."""
    waiting: int
    """Events and cursors waiting in the intake stream now."""
    paused: bool
    """The engine is retrying a commit that failed (reported in ``STATUS=``)."""
    probe_age: float | None
    """How long the store probe in flight has waited (seconds), None when none is."""
    busy: bool = False
    """The engine holds a batch it has not finished evaluating and committing."""


class Watchdog:
    """Whether the daemon made progress (see the module docstring); pure, no I/O.

    ``timeout`` is how long a part may be stuck before the pings stop: the whole
    ``$WATCHDOG_USEC``, so systemd restarts a daemon stuck for one to one and a half of it.
    """

    def __init__(self, timeout: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.timeout = timeout
        self.clock = clock
        self._taken = -1
        self._engine_ok = clock()

    def stalled(self, progress: Progress) -> str:
        """Why no ``WATCHDOG=1`` should be sent now; ``""`` when everything made progress."""
        now = self.clock()
        idle = not progress.waiting and not progress.busy
        if progress.taken != self._taken or idle or progress.paused:
            self._engine_ok = now
        self._taken = progress.taken
        if progress.probe_age is not None and progress.probe_age >= self.timeout:
            return f"the state database has not answered for {progress.probe_age:.1f}s"
        stuck = now - self._engine_ok
        if stuck >= self.timeout:
            held = ", a batch in hand" if progress.busy else ""
            return f"the engine has taken no event for {stuck:.1f}s with {progress.waiting} waiting{held}"
        return ""
