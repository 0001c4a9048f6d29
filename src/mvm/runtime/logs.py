"""Reading a VM's logs: the boot console and the guest's event stream.

Both are plain files in the VM dir, written by QEMU (the console, and the guest's
``org.mvm.events`` port), so reading them needs neither the guest nor a daemon, and they
remain readable after the VM died. Events are JSON lines; they are rendered here as
``TIME SERVICE | line`` for output, and ``TIME [health NAME] state`` for transitions.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from ..paths import VMFiles


@dataclass(frozen=True)
class LogLine:
    source: str  # "console" | "service" | "health" | "init"
    text: str
    event: dict[str, Any] | None = None


def _ts(t: float | None) -> str:
    if t is None:
        return ""
    return datetime.fromtimestamp(t).strftime("%H:%M:%S.%f")[:-3]


def format_event(ev: dict[str, Any]) -> LogLine | None:
    kind = ev.get("kind")
    ts = _ts(ev.get("t"))
    if kind == "log":
        stream = ev.get("stream", "stdout")
        tag = ev.get("svc", "?") if stream in ("stdout", "stderr") else f"{ev.get('svc')} {stream}"
        return LogLine("service", f"{ts} {tag} | {ev.get('line', '')}", ev)
    if kind == "service":
        detail = []
        for key in ("pid", "exit", "delay", "reason"):
            if ev.get(key) is not None:
                detail.append(f"{key} {ev[key]}")
        suffix = f" ({', '.join(detail)})" if detail else ""
        return LogLine("service", f"{ts} [service {ev.get('svc')}] {ev.get('state')}{suffix}", ev)
    if kind == "health":
        out = f": {ev.get('output')}" if ev.get("output") else ""
        return LogLine("health", f"{ts} [health {ev.get('check')}] {ev.get('state')} (exit {ev.get('exit')}){out}", ev)
    if kind == "init":
        return LogLine("init", f"{ts} [init] {ev.get('msg')}", ev)
    return None


def parse_events(data: bytes) -> Iterator[dict[str, Any]]:
    for raw in data.splitlines():
        try:
            ev = json.loads(raw)
        except ValueError:
            continue
        if isinstance(ev, dict):
            yield ev


def read_whole(path: Path) -> bytes:
    """A log and its rotated part (``NAME.1``, older, written by the log shim), in order."""
    out = b""
    for part in (rotated_path(path), path):
        try:
            out += part.read_bytes()
        except OSError:
            continue
    return out


def rotated_path(path: Path) -> Path:
    return path.with_name(path.name + ".1")


def read_events(files: VMFiles) -> list[dict[str, Any]]:
    return list(parse_events(read_whole(files.events_log)))


def service_tail(files: VMFiles, service: str, lines: int = 15) -> str:
    """The last output lines of one service (preStart included): the cause of its failure."""
    out = [line.text for ev in read_events(files)
           if ev.get("svc") == service and ev.get("kind") in ("log", "service")
           and (line := format_event(ev)) is not None]
    return "\n".join(out[-lines:])


class _Tail:
    """Incremental reader of a growing log, yielding complete lines, across the log shim's
    rotations: it starts with the rotated part (``NAME.1``), keeps the file it reads open,
    and when the path names a new file (a rotation), reads the old one to its end first."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.partial = b""
        self.file: Any = None
        self.pending_rotated: Path | None = rotated_path(path)

    def _open(self, path: Path) -> bool:
        try:
            self.file = open(path, "rb")  # noqa: SIM115 - kept open across reads, closed on switch
        except OSError:
            return False
        return True

    def read(self) -> list[bytes]:
        data = b""
        if self.pending_rotated is not None:  # first read: the older part, if there is one
            if self._open(self.pending_rotated):
                data += self.file.read()
                self.file.close()
            self.pending_rotated, self.file = None, None
        if self.file is None and not self._open(self.path):
            return []
        data += self.file.read()
        try:
            if os.stat(self.path).st_ino != os.fstat(self.file.fileno()).st_ino:  # rotated meanwhile
                data += self.file.read()
                self.file.close()
                if self._open(self.path):
                    data += self.file.read()
                else:
                    self.file = None
        except OSError:
            pass
        data = self.partial + data
        *complete, self.partial = data.split(b"\n")
        lines: list[bytes] = complete
        return lines

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


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
    if kind == "console":
        return [LogLine("console", raw.decode(errors="replace"))]
    return [line for ev in parse_events(raw) if keep.wants(ev) and (line := format_event(ev)) is not None]


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
    where the first read stopped, so no line is lost or shown twice."""
    tails: list[tuple[str, _Tail]] = []
    if console and keep.wants_console():
        tails.append(("console", _Tail(files.console_log)))
    if services:
        tails.append(("events", _Tail(files.events_log)))
    try:
        for kind, tail in tails:
            part = [line for raw in tail.read() for line in _render(kind, raw, keep)]
            yield from part if lines is None else part[max(0, len(part) - lines):]
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
RETAINED = ("console.log", "console.log.1", "events.log", "events.log.1", "qemu.log")


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


def clean_poweroff(files: VMFiles) -> bool:
    """The guest said it was powering off (as opposed to QEMU being killed, or a panic)."""
    try:
        with open(files.events_log, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 4096))
            tail = f.read().decode(errors="replace")
    except OSError:
        return False
    return '"msg":"powering off"' in tail


def exit_reason(files: VMFiles) -> str:
    """A short human reason for a VM that is no longer running."""
    if clean_poweroff(files):
        return "powered off"
    try:
        console = files.console_log.read_bytes()[-8192:].decode(errors="replace")
    except OSError:
        console = ""
    if "Kernel panic" in console:
        line = next((ln for ln in console.splitlines() if "Kernel panic" in ln), "kernel panic")
        return line.split("] ", 1)[-1].strip()
    if "boot failed" in console:
        return "guest init failed to boot"
    return "QEMU exited unexpectedly (killed?)"
