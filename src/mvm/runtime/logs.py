"""Reading a VM's logs: the boot console and the guest's event stream.

Both are plain files in the VM dir, written by the VM's log shim (``mvm._logshim``: the
console, and the guest's ``org.mvm.events`` port), so reading them needs neither the guest nor
a daemon, and they remain readable after the VM died. The shim caps each file: past its cap
it renames it to ``NAME.1`` (the older part) and starts a new one; readers here read both.
Events are JSON lines; they are rendered here as ``TIME SERVICE | line`` for output,
and ``TIME [health NAME] state`` for transitions.

Both files hold what the guest wrote, so they are read as hostile input: in chunks of at most
``READ_CHUNK`` bytes (memory stays bounded whatever their size), lines longer than
``LINE_LIMIT`` are dropped (and the drop is shown), events nested too deeply or of the wrong
types are skipped or shown field by field as text, and every rendered line is made
printable (no terminal escape sequences reach the user's terminal).
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, BinaryIO

from .._logshim import rotated
from .._untrusted import as_float, printable
from ..guest import eventtext, protocol
from ..paths import VMFiles

#: The longest log line kept (an event line is JSON: a longer one is dropped, not cut).
LINE_LIMIT = 256 * 1024
#: The most read from a log file at once.
READ_CHUNK = 1 << 20
#: How much of the end of events.log is read for a failed service's last lines.
TAIL_BYTES = 4 << 20


@dataclass(frozen=True)
class LogLine:
    """One line of ``logs``: ``text`` as printed, and the guest's ``event`` it came from
    (None for a console line)."""

    source: str  # "console" | "service" | "health" | "init"
    text: str
    event: dict[str, Any] | None = None

    def _field(self, key: str) -> str | None:
        value = self.event.get(key) if self.event else None
        return printable(value) if isinstance(value, str) else None

    def as_json(self) -> dict[str, Any]:
        """The line for ``logs --json`` (docs/json.md): its time, service and check as fields,
        so a script need not parse ``text``. Every field the guest wrote is made printable."""
        return {"source": self.source, "time": as_float(self.event.get("t")) if self.event else None,
                "service": self._field("svc"), "check": self._field("check"), "text": self.text}


def _ts(t: object) -> str:
    seconds = as_float(t)
    if seconds is None:
        return ""
    try:
        return datetime.fromtimestamp(seconds).strftime("%H:%M:%S.%f")[:-3]
    except (OverflowError, OSError, ValueError):
        return ""


def _text(value: object) -> str:
    """A field of an event, as printable text (an absent field is empty)."""
    return "" if value is None else printable(value if isinstance(value, str) else str(value))


def format_event(ev: dict[str, Any]) -> LogLine | None:
    """The line ``logs`` shows for an event; None for kinds it does not show. Every field is
    the guest's: any type is accepted, and the text is made printable."""
    shown = eventtext.event_line(ev, _ts(ev.get("t")), _text)
    return LogLine(shown[0], shown[1], ev) if shown else None


def note(files: VMFiles, msg: str) -> None:
    """A line of mvm's own in the VM's event log (``[init] msg`` in ``logs``), as the log
    shim writes its notes."""
    with open(files.events_log, "a") as events:
        events.write(json.dumps({"t": round(time.time(), 3), "kind": "init", "msg": msg}) + "\n")


def parse_events(data: bytes | Iterable[bytes]) -> Iterator[dict[str, Any]]:
    """The events in ``data`` (bytes, or lines): what is not a JSON object of bounded size
    and nesting is skipped."""
    for raw in data.splitlines() if isinstance(data, bytes) else data:
        if len(raw) > LINE_LIMIT:
            continue
        try:
            yield protocol.decode(raw)
        except ValueError:
            continue


def rotated_path(path: Path) -> Path:
    """The older part of a log the shim rotated."""
    return path.with_name(rotated(path.name))


def _read_tail(path: Path, size: int) -> bytes:
    """The last ``size`` bytes of a log and its rotated part (from the first whole line in them)."""
    data, start = b"", 0
    for part in (path, rotated_path(path)):
        want = size - len(data)
        if want <= 0:
            break
        try:
            with open(part, "rb") as f:
                f.seek(0, os.SEEK_END)
                start = max(0, f.tell() - want)
                f.seek(start)
                data = f.read(want) + data
        except OSError:
            start = 0
            continue
    if start or len(data) >= size:
        data = data[data.find(b"\n") + 1 :] if b"\n" in data else b""
    return data


def read_events(files: VMFiles, tail: int = TAIL_BYTES) -> list[dict[str, Any]]:
    """The events of the last ``tail`` bytes of events.log (and its rotated part)."""
    return list(parse_events(_read_tail(files.events_log, tail)))


def service_tail(files: VMFiles, service: str, lines: int = 15) -> str:
    """The last output lines of one service (preStart included): the cause of its failure."""
    out = [line.text for ev in read_events(files)
           if ev.get("svc") == service and ev.get("kind") in ("log", "service")
           and (line := format_event(ev)) is not None]
    return "\n".join(out[-lines:])


class _Tail:
    """Incremental reader of a growing log, yielding complete lines: at most ``READ_CHUNK``
    bytes per read, and a line longer than ``LINE_LIMIT`` becomes ``DROPPED``. It follows the
    log shim's rotations: it starts with the rotated part (``NAME.1``), keeps the file it reads
    open, and when the path names a new file (a rotation), reads the old one to its end first."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.partial = b""
        self.skipping = False  #: inside a line too long to keep
        self.file: BinaryIO | None = None
        self.pending: list[Path] = [rotated_path(path), path]  #: files not opened yet, in order
        self.consumed = 0  #: bytes read so far, all parts together

    def _chunk(self) -> bytes:
        """The next bytes of the log, in order across its parts (empty: nothing new yet)."""
        while True:
            if self.file is None:
                if not self.pending:
                    return b""
                part = self.pending.pop(0)
                try:
                    self.file = open(part, "rb")  # noqa: SIM115 - kept open across reads, closed by close()
                except OSError:
                    if not self.pending:  # the live log does not exist (yet): try it again later
                        self.pending.append(part)
                        return b""
                    continue
            data = self.file.read(READ_CHUNK)
            if data:
                return data
            if self.pending:  # the rotated part is read: on to the live log
                self.close()
                continue
            try:
                rotated = os.stat(self.path).st_ino != os.fstat(self.file.fileno()).st_ino
            except OSError:
                rotated = False
            if not rotated:
                return b""
            data = self.file.read(READ_CHUNK)  # what was written before the rename
            if data:
                return data
            self.close()
            self.pending.append(self.path)

    def read(self) -> list[bytes]:
        data = self._chunk()
        self.consumed += len(data)
        out: list[bytes] = []
        if not data:
            return out
        if self.skipping:
            end = data.find(b"\n")
            if end < 0:
                return out
            self.skipping = False
            data = data[end + 1 :]
        data = self.partial + data
        *complete, self.partial = data.split(b"\n")
        out += [DROPPED if len(line) > LINE_LIMIT else line for line in complete]
        if len(self.partial) > LINE_LIMIT:
            out.append(DROPPED)
            self.partial, self.skipping = b"", True
        return out

    def read_all(self) -> Iterator[bytes]:
        """Every complete line written so far (bounded by the logs' sizes now, so a guest that
        keeps writing does not keep this going)."""
        budget = 0
        for part in (rotated_path(self.path), self.path):
            with contextlib.suppress(OSError):
                budget += part.stat().st_size
        start = self.consumed
        while self.consumed - start < budget:
            before = self.consumed
            lines = self.read()
            if self.consumed == before:  # nothing more to read now
                return
            yield from lines

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


#: Stands for a line that was too long to keep.
DROPPED = b"\0dropped"


@dataclass(frozen=True)
class LogFilter:
    """Which lines to show: one service only (its output and state changes), and/or only
    events at or after ``since`` (Unix time). The console has no times and no service, so
    either filter leaves it out."""

    service: str | None = None
    since: float | None = None

    def wants_console(self) -> bool:
        return self.service is None and self.since is None

    def wants(self, ev: dict[str, Any]) -> bool:
        if self.service is not None and ev.get("svc") != self.service:
            return False
        t = ev.get("t")
        return self.since is None or (isinstance(t, (int, float)) and t >= self.since)


def _render(kind: str, raw: bytes, keep: LogFilter) -> list[LogLine]:
    if raw == DROPPED:
        what = "a console" if kind == "console" else "an event"
        return [LogLine(kind if kind == "console" else "init",
                        f"[mvm] {what} line longer than {LINE_LIMIT // 1024} KiB was left out")]
    if kind == "console":
        return [LogLine("console", printable(raw.decode(errors="replace").rstrip("\r")))]
    return [line for ev in parse_events([raw]) if keep.wants(ev) and (line := format_event(ev)) is not None]


def stream(
    files: VMFiles,
    *,
    console: bool = True,
    services: bool = True,
    lines: int | None = None,
    follow: bool = False,
    keep: LogFilter = LogFilter(),
    keep_going: Callable[[], bool] = lambda: True,
    poll: float = 0.2,
) -> Iterator[LogLine]:
    """What was logged so far (the last ``lines`` of each part), then, with ``follow``, new
    lines as they are written until ``keep_going()`` is false. Following continues exactly
    where the first read stopped, so no line is lost or shown twice. Memory stays bounded
    (by ``lines`` lines, or one read) whatever the size of the logs."""
    tails: list[tuple[str, _Tail]] = []
    if console and keep.wants_console():
        tails.append(("console", _Tail(files.console_log)))
    if services:
        tails.append(("events", _Tail(files.events_log)))
    try:
        for kind, tail in tails:
            rendered = (line for raw in tail.read_all() for line in _render(kind, raw, keep))
            if lines is None:
                yield from rendered
            elif lines > 0:
                yield from deque(rendered, maxlen=lines)
            else:
                deque(rendered, maxlen=0)
        while follow:
            got = False
            for kind, tail in tails:
                for raw in tail.read():
                    got = True
                    yield from _render(kind, raw, keep)
            if not got:
                if not keep_going():
                    return
                time.sleep(poll)
    finally:
        for _, tail in tails:
            tail.close()


# --- logs of VMs that are down ---------------------------------------------------------

#: The logs ``down`` keeps, per VM name; beyond this total the oldest go first.
RETAINED_CAP_BYTES = 256 * 1024 * 1024
RETAINED = ("console.log", rotated("console.log"), "events.log", rotated("events.log"), "qemu.log")


def retain(files: VMFiles, dest: Path, cap: int = RETAINED_CAP_BYTES) -> None:
    """Move a downed VM's logs to ``dest`` (replacing older ones of the same name), then
    drop the oldest retained logs until all of them fit in ``cap``."""
    import shutil

    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True, mode=0o700)
    for name in RETAINED:
        try:
            os.rename(files.root / name, dest / name)
        except FileNotFoundError:
            pass
    prune(dest.parent, cap)


def prune(root: Path, cap: int) -> None:
    import shutil

    def size(d: Path) -> int:
        return sum(f.stat().st_size for f in d.iterdir() if f.is_file())

    dirs = sorted((d for d in root.iterdir() if d.is_dir()), key=lambda d: d.stat().st_mtime)
    total = sum(size(d) for d in dirs)
    for d in dirs:
        if total <= cap:
            break
        total -= size(d)
        shutil.rmtree(d, ignore_errors=True)


#: The guest kernel's last word when it powers the machine off (``poweroff -f``, sysrq o).
KERNEL_POWER_DOWN = "reboot: Power down"


def _init_powered_off(files: VMFiles) -> bool:
    """mvm's init said it was powering off, having stopped the services first."""
    try:
        with open(files.events_log, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 4096))
            tail = f.read().decode(errors="replace")
    except OSError:
        return False
    return '"msg":"powering off"' in tail


def services_killed_at_stop(files: VMFiles) -> list[str]:
    """The services the guest's last shutdown killed, having waited its grace after SIGTERM
    in vain (``stop: service NAME did not end ...`` events, from mvm.guest.supervisor)."""
    killed: list[str] = []
    for ev in read_events(files):
        if ev.get("kind") != "init":
            continue
        if ev.get("msg") == "shutting down":
            killed = []
        elif str(ev.get("msg", "")).startswith("stop: service ") and isinstance(ev.get("service"), str):
            killed.append(printable(ev["service"], 64))
    return killed


def clean_poweroff(files: VMFiles) -> bool:
    """The guest powered the machine off (as opposed to QEMU being killed, or a panic): its
    init said so, or its kernel did (a power-off that bypassed init)."""
    return _init_powered_off(files) or KERNEL_POWER_DOWN in _read_tail(files.console_log, 2048).decode(
        errors="replace")


def exit_reason(files: VMFiles) -> str:
    """A short human reason for a VM that is no longer running."""
    if _init_powered_off(files):
        return "powered off"
    console = _read_tail(files.console_log, 8192).decode(errors="replace")
    if KERNEL_POWER_DOWN in console[-2048:]:
        return "powered off by its kernel (the services were not stopped first)"
    if "Kernel panic" in console:
        line = next((ln for ln in console.splitlines() if "Kernel panic" in ln), "kernel panic")
        return printable(line.split("] ", 1)[-1].strip(), 300)
    if "boot failed" in console:
        return "guest init failed to boot"
    return "QEMU exited unexpectedly (killed?)"
