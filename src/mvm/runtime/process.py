"""Host process identity for a daemonless registry.

A pid alone can be reused by an unrelated process after the VM dies, so every recorded pid
is paired with its start time (``/proc/<pid>/stat`` field 22). Nothing is ever signalled
unless both match.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path


def start_time(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    # The command name (field 2) may contain spaces and parens: split after the last ')'.
    fields = stat[stat.rindex(")") + 2 :].split()
    return int(fields[19])


def pids_with_cwd(directory: Path) -> list[int]:
    """Processes running in ``directory``: QEMU runs with its VM dir as cwd, so this finds a
    VM's QEMU even when its recorded pid is lost."""
    found = []
    target = str(directory)
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.readlink(entry / "cwd") == target:
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2 :].split()[0] == "Z"


def alive(pid: int | None, started: int | None) -> bool:
    if not pid:
        return False
    now = start_time(pid)
    if now is None or is_zombie(pid):
        return False
    return started is None or now == started


def wait_gone(pid: int, started: int | None, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while alive(pid, started):
        _reap(pid)
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    _reap(pid)
    return True


def _reap(pid: int) -> None:
    """Collect the exit status if the process is our own child (it is after `up`)."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def signal_checked(pid: int, started: int | None, sig: int) -> bool:
    if not alive(pid, started):
        return False
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        return False
    return True


def terminate(pid: int, started: int | None, timeout: float = 5.0) -> str:
    """SIGTERM, wait, SIGKILL, wait. Returns what it took."""
    if not alive(pid, started):
        return "gone"
    signal_checked(pid, started, signal.SIGTERM)
    if wait_gone(pid, started, timeout):
        return "terminated"
    signal_checked(pid, started, signal.SIGKILL)
    wait_gone(pid, started, 10.0)
    return "killed"
