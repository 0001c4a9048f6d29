"""The guest's event stream: service log lines, service state and health transitions.

Events go, one JSON object per line, to the ``org.mvm.events`` virtio-serial port, which
the host backs with a plain file (``events.log`` in the VM's runtime dir). So logs need no
daemon on the host and survive the VM. A single writer thread keeps lines whole.

A standalone guest (KubeVirt: no mvm host, no event port) writes the same events to the
serial console instead, one readable line each, in the format of ``mvmctl logs``
(``12:00:01.250 hello | GET / 200``, ``12:00:02.000 [health hello] healthy (exit 0)``):
the console is what ``kubectl logs`` and ``virtctl console`` show.

A boot's first events would carry the clock the kernel read from the RTC: whole seconds, up
to one behind the host's, so ``logs`` showed a boot's first lines up to a second early. They
wait instead (at most :data:`CLOCK_HOLD` s) for the host's first ping, which sets the clock,
and go out with their times taken from it and their ``up`` (the monotonic clock, which the
setting leaves alone).
"""

from __future__ import annotations

import json
import os
import queue
import sys
import threading
import time

TYPE_CHECKING = False  # not `from typing`: importing typing costs ~35 ms at boot under TCG

if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

from .eventtext import event_line
from .protocol import write_all

CONSOLE_OUTPUT_LIMIT = 300
#: The longest a boot's events wait for the host to set the clock (its first ping comes
#: within a second or two of the services' start, under emulation too).
CLOCK_HOLD = 10.0
#: ... and the most bytes of them held (a service's flood of output at boot): past it, they go out.
CLOCK_HOLD_BYTES = 1 << 20
#: The most bytes waiting for the port or the console. A host that stops reading (its log shim
#: killed) blocks the writer: past this, events are dropped and counted, and once there is
#: room again a line says how many. (Unbounded, PID 1 grew by the services' output until the
#: guest hung.) The services are never held up by their logs.
QUEUE_LIMIT = 8 << 20


def _one_line(text: str) -> str:
    """Printable on a terminal, on one line: no control characters or escape sequences."""
    text = text.replace("\r\n", "\n").replace("\n", " / ")
    return "".join(ch if ch.isprintable() or ch == "\t" else "?" for ch in text)


def format_console(event: dict[str, Any]) -> str | None:
    """One console line for an event, as ``mvmctl logs`` shows it (mvm.guest.eventtext), or
    None for kinds the console does not show. Times are the guest's clock, UTC."""
    t = event.get("t")
    ts = "--:--:--.---"
    if isinstance(t, (int, float)):
        ts = time.strftime("%H:%M:%S", time.gmtime(t)) + f".{int((t % 1) * 1000):03d}"
    shown = event_line(event, ts, lambda value: _one_line(str(value)), CONSOLE_OUTPUT_LIMIT)
    return shown[1] if shown else None


def open_console(path: str = "/dev/console") -> int:
    """A write descriptor for the console; stderr (PID 1's is the console) if it won't open."""
    try:
        return os.open(path, os.O_WRONLY | os.O_NOCTTY)
    except OSError:
        return 2


class EventLog:
    """``path``: the event port (JSON lines). ``console``: a descriptor that gets each
    event as a readable line (standalone mode); it replaces the JSON fallback on stderr
    that a guest without an event port otherwise writes. ``hold``: the events wait that long
    at most for :meth:`clock_exact` (a boot with an mvm host, whose first ping sets the clock).
    ``wall`` and ``monotonic``: the clocks (tests give their own)."""

    def __init__(self, path: str | None, console: int | None = None, *, hold: float = 0.0,
                 wall: Callable[[], float] = time.time, monotonic: Callable[[], float] = time.monotonic) -> None:
        self._fd: int | None = None
        self._console = console
        self._wall, self._monotonic = wall, monotonic
        self._lock = threading.Lock()
        #: events waiting for the clock (None: not waiting); in order
        self._held: list[dict[str, Any]] | None = [] if hold > 0 else None
        self._held_bytes = 0  #: about how many bytes they make
        if path:
            try:
                self._fd = os.open(path, os.O_WRONLY | os.O_NOCTTY)
            except OSError as exc:
                print(f"mvm-init: cannot open event port {path}: {exc}", file=sys.stderr)
        # (data, for the console?) or None, which marks a flush
        self._queue: queue.SimpleQueue[tuple[bytes, bool] | None] = queue.SimpleQueue()
        self._queued = 0  #: bytes in the queue
        self._dropped = 0  #: events dropped since the last line that said so
        self._thread = threading.Thread(target=self._drain, name="events", daemon=True)
        self._thread.start()
        if self._held is not None:
            timer = threading.Timer(hold, self._release, kwargs={"exact": False})
            timer.daemon = True
            timer.start()

    def emit(self, kind: str, **fields: Any) -> None:
        event = self._stamped(kind, **fields)
        with self._lock:
            if self._held is not None:
                self._held_bytes += 128 + sum(len(v) for v in fields.values() if isinstance(v, str))
                if self._held_bytes <= CLOCK_HOLD_BYTES:
                    self._held.append(event)
                    return
                self._release_held(exact=False)
            self._put(event)

    def _stamped(self, kind: str, **fields: Any) -> dict[str, Any]:
        # t: wall clock (for people); up: seconds since boot (for boot timelines)
        return {"t": round(self._wall(), 3), "up": round(self._monotonic(), 3), "kind": kind, **fields}

    def clock_exact(self) -> None:
        """The host has just set the clock: the events held until now go out, their times
        taken from it (an event's ``up`` says how long before now it happened)."""
        self._release(exact=True)

    def _release(self, exact: bool) -> None:
        with self._lock:
            self._release_held(exact)

    def _release_held(self, exact: bool) -> None:
        """Send the held events (with times from the clock now if ``exact``); hold no more."""
        held, self._held = self._held or [], None
        if exact:
            boot = self._wall() - self._monotonic()  # the wall-clock time the boot began
            for event in held:
                event["t"] = round(boot + event["up"], 3)
        for event in held:
            self._put(event)

    def _put(self, event: dict[str, Any]) -> None:
        """Queue ``event`` for the port (and the console), or drop it if the queue is full.
        Called with the lock held."""
        data = json.dumps(event, separators=(",", ":")).encode() + b"\n"
        text = format_console(event) if self._console is not None else None
        line = (text + "\n").encode(errors="replace") if text is not None else b""
        size = len(data) + len(line)
        if self._dropped and self._queued + size + 256 <= QUEUE_LIMIT:
            self._note_dropped()
        if self._queued + size > QUEUE_LIMIT:
            self._dropped += 1
            return
        self._enqueue(data, False)
        if line:
            self._enqueue(line, True)

    def _note_dropped(self) -> None:
        """Queue a line saying how many were dropped, past the limit (with the lock held)."""
        note = self._stamped("init", msg=f"{self._dropped} log lines and events dropped: more than "
                             f"{QUEUE_LIMIT >> 20} MiB of them waited for the host (it was not reading, or they "
                             "came faster than it reads)")
        self._dropped = 0
        self._enqueue(json.dumps(note, separators=(",", ":")).encode() + b"\n", False)

    def _enqueue(self, data: bytes, for_console: bool) -> None:
        self._queued += len(data)  # the drain takes it off once written
        self._queue.put((data, for_console))

    def log(self, svc: str, stream: str, line: str) -> None:
        self.emit("log", svc=svc, stream=stream, line=line)

    def flush(self, timeout: float = 2.0) -> None:
        self._release(exact=False)
        with self._lock:
            if self._dropped:
                self._note_dropped()
        done = threading.Event()
        self._flushed = done
        self._queue.put(None)
        done.wait(timeout)

    def _drain(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                flushed = getattr(self, "_flushed", None)
                if flushed is not None:
                    flushed.set()
                continue
            data, for_console = item
            fd: int | None = self._console if for_console else self._fd
            if not for_console and self._fd is None and self._console is None:
                sys.stderr.buffer.write(data)
                sys.stderr.flush()
            if fd is not None:
                try:
                    write_all(fd, data)
                except OSError:
                    pass
            with self._lock:
                self._queued -= len(data)
