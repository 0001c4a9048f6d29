"""Process identity: a recorded pid is only ours while its start time matches.

A pid alone can be reused by an unrelated process after the VM dies, so every recorded pid
is paired with its start time (``/proc/<pid>/stat`` field 22), and nothing is ever signalled
unless both match (:func:`alive`, :func:`terminate`). Children that outlive the ``Popen``
that started them (QEMU and its helpers) are reaped here by pid (:func:`detach`).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path


def _stat(pid: int) -> list[str] | None:
    """``/proc/<pid>/stat`` from field 3 (the state) on; None once the process is gone.
    The command name (field 2) may contain spaces and parens: split after the last ')'."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2 :].split()


def start_time(pid: int) -> int | None:
    fields = _stat(pid)
    return int(fields[19]) if fields else None


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


def program(pid: int) -> str:
    """The file name of the program ``pid`` runs ("" if it cannot be read)."""
    try:
        return os.path.basename(os.readlink(f"/proc/{pid}/exe"))
    except OSError:
        return ""


def alive(pid: int | None, started: int | None) -> bool:
    """``pid`` runs and is the process that started at ``started``. A zombie is dead (and
    reaped, if it is our child: after ``up`` in this process, QEMU is)."""
    if not pid:
        return False
    fields = _stat(pid)
    if fields is None:
        return False
    if fields[0] == "Z":
        _reap(pid)
        reap_detached()  # the VM's helpers end with it
        return False
    return started is None or int(fields[19]) == started


def wait_gone(pid: int, started: int | None, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while alive(pid, started):
        _reap(pid)
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    _reap(pid)
    reap_detached()
    return True


#: children started here that outlive their Popen (see :func:`detach`), not yet reaped
_DETACHED: set[int] = set()


def detach(proc: subprocess.Popen[bytes]) -> None:
    """The child outlives its ``Popen`` (a VM's QEMU, its log shim and virtiofsd outlive the
    ``up`` that started them): tell the object so, or collecting it while the child runs
    raises a ResourceWarning ("subprocess N is still running"), an error under ``-W error``
    and in test suites that call the API in-process. The child is reaped by pid instead:
    QEMU by the status checks (:func:`alive`), the others once they end (:func:`reap_detached`,
    which those checks call too), so a long-lived process collects no zombies."""
    proc._child_created = False  # type: ignore[attr-defined]  # what Popen.__del__ checks
    _DETACHED.add(proc.pid)


def reap_detached() -> None:
    """Collect the exit status of every detached child that has ended."""
    for pid in list(_DETACHED):
        _reap(pid)


def _reap(pid: int) -> None:
    """Collect the exit status if the process is our own child (it is after `up`)."""
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        done = pid  # not (or no longer) ours to collect
    if done:  # once reaped, the pid may be reused: never wait on it again
        _DETACHED.discard(pid)


def signal_checked(pid: int, started: int | None, sig: int) -> bool:
    """Send ``sig`` if ``pid`` is still the process started at ``started``. False if it is
    gone; :class:`PermissionError` if it is ours by identity but not ours to signal."""
    if not alive(pid, started):
        return False
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        return False
    return True


class StillRunning(Exception):
    """A process survived SIGKILL, or this user may not signal it (the reason says which)."""


def terminate(pid: int, started: int | None, timeout: float = 5.0) -> str:
    """SIGTERM, wait, SIGKILL, wait. Returns what it took (``gone``, ``terminated`` or
    ``killed``); raises :class:`StillRunning` when the process outlives all of it."""
    if not alive(pid, started):
        return "gone"
    try:
        signal_checked(pid, started, signal.SIGTERM)
        if wait_gone(pid, started, timeout):
            return "terminated"
        signal_checked(pid, started, signal.SIGKILL)
    except PermissionError as exc:
        raise StillRunning(f"not permitted to signal pid {pid}: {exc.strerror}") from None
    if wait_gone(pid, started, 10.0):
        return "killed"
    raise StillRunning(f"pid {pid} is still running 10 s after SIGKILL")



def usage(pid: int) -> tuple[float, int]:
    """(CPU seconds used so far, resident bytes) of ``pid``; zeros once it is gone."""
    fields = _stat(pid)
    if fields is None:
        return 0.0, 0
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks, int(fields[21]) * os.sysconf("SC_PAGE_SIZE")
