"""Out of memory: telling an OOM kill apart from any other SIGKILL, and keeping PID 1 able to work.

When the guest runs out of memory, the kernel's OOM killer SIGKILLs the process it scores
worst (the largest, normally the one that ate the memory) and says so in the kernel log:
``Out of memory: Killed process 215 (python3) ...`` and ``oom-kill:...,task=python3,pid=215,uid=1000``.
The supervisor sees only the SIGKILL; :func:`oom_kill_of` finds the kernel's record in
``/dev/kmsg`` so ``status`` can say *why* (``reason``).

PID 1 (init, supervisor and agent in one process) is never chosen by the OOM killer: the
kernel exempts the global init (so an ``oom_score_adj`` of -1000 would add nothing, and its
children would inherit it). Locking PID 1's pages in memory (``mlockall``) and raising
``vm.min_free_kbytes`` were measured (tests/fixtures/oom, 256 MiB, TCG: a burst and a 50 MiB/s
leak, `exec true` every 0.5 s) and made no difference: the hog is killed within seconds,
`exec` never failed (worst 1.4 to 2.7 s right at the kill, with or without them), health
stayed healthy. So neither is done.
"""

from __future__ import annotations

import os
import re

TYPE_CHECKING = False  # not `from typing`: importing typing costs ~35 ms at boot under TCG

if TYPE_CHECKING:
    from typing import Any

_KILLED = re.compile(r"Killed process (\d+) \(([^)]*)\)")
_OOM_KILL = re.compile(r"oom-kill:.*?,task=([^,]*),pid=(\d+),uid=(\d+)")


def kernel_log(path: str = "/dev/kmsg") -> list[tuple[float, str]]:
    """(seconds since boot, message) of every record still in the kernel's log buffer."""
    records: list[tuple[float, str]] = []
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        return records
    try:
        while True:
            try:
                raw = os.read(fd, 8192)
            except BlockingIOError:
                break
            except OSError:  # EPIPE: a record was overwritten while we read; go on
                continue
            if not raw:
                break
            head, _, message = raw.decode(errors="replace").partition(";")
            fields = head.split(",")
            try:
                records.append((int(fields[2]) / 1e6, message.split("\n", 1)[0]))
            except (IndexError, ValueError):
                continue
    finally:
        os.close(fd)
    return records


def oom_kills(records: list[tuple[float, str]], since: float) -> list[dict[str, Any]]:
    """The OOM killer's victims logged at or after ``since`` (seconds since boot):
    ``{"pid", "name", "uid", "at"}`` (uid None when the kernel did not say)."""
    found: dict[int, dict[str, Any]] = {}
    for at, message in records:
        if at < since:
            continue
        match = _OOM_KILL.search(message)
        if match:
            pid = int(match.group(2))
            found.setdefault(pid, {"pid": pid, "name": match.group(1), "at": at})["uid"] = int(match.group(3))
            continue
        match = _KILLED.search(message)
        if match:
            pid = int(match.group(1))
            found.setdefault(pid, {"pid": pid, "name": match.group(2), "uid": None, "at": at})
    return list(found.values())


def oom_kill_of(pid: int, uid: int, code: int, since: float,
                records: list[tuple[float, str]] | None = None) -> str | None:
    """Why a service's run that ended with ``code`` was killed, if the OOM killer did it.

    ``pid`` is the service's own process and ``uid`` its user; ``since`` when it started
    (seconds since boot). It was OOM-killed when the kernel logged killing ``pid`` itself
    (it ends with -9), or, when its shell reports a child killed by SIGKILL (137), a
    process of the same user since it started. None otherwise."""
    if code not in (-9, 137):
        return None
    victims = oom_kills(kernel_log() if records is None else records, since - 1.0)
    victim = next((v for v in victims if v["pid"] == pid), None)
    if victim is None and code == 137:
        victim = next((v for v in victims if v["uid"] == uid), None)
    if victim is None:
        return None
    return f"out of memory: the kernel's OOM killer killed {victim['name']} (pid {victim['pid']})"
