"""PID 1's child reaping, done in one place.

As PID 1 we inherit every orphan, so something must ``waitpid(-1)``. If that were mixed
with ``Popen.wait()``, the two would steal each other's exit statuses. Instead all waiting
happens here, and callers get the status of the children they started through
:meth:`Reaper.watch`.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time


class Exit:
    """The future exit status of one child."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self.proc = proc
        self.pid = proc.pid
        self.code: int | None = None
        self._done = threading.Event()

    def _set(self, code: int) -> None:
        self.code = code
        self.proc.returncode = code  # keeps Popen from waiting (or warning) itself
        self._done.set()

    def wait(self, timeout: float | None = None) -> int | None:
        self._done.wait(timeout)
        return self.code

    @property
    def done(self) -> bool:
        return self._done.is_set()


class Reaper:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._watched: dict[int, Exit] = {}
        self._unclaimed: dict[int, tuple[int, float]] = {}
        self._spawned = threading.Event()

    def spawn(self, *args: object, **kwargs: object) -> Exit:
        """``subprocess.Popen(*args, **kwargs)`` whose exit this reaper reports."""
        proc = subprocess.Popen(*args, **kwargs)  # type: ignore[call-overload]  # noqa: S603
        return self.watch(proc)

    def watch(self, proc: subprocess.Popen[bytes]) -> Exit:
        ex = Exit(proc)
        with self._lock:
            early = self._unclaimed.pop(proc.pid, None)
            if early is None:
                self._watched[proc.pid] = ex
        if early is not None:
            ex._set(early[0])
        self._spawned.set()  # after the fork, so an idle loop() finds the child
        return ex

    def loop(self) -> None:
        """Reap forever. Runs in the main thread so signal handlers stay responsive."""
        while True:
            try:
                pid, status = os.waitpid(-1, 0)
            except ChildProcessError:
                self._spawned.wait(0.5)
                self._spawned.clear()
                continue
            code = os.waitstatus_to_exitcode(status)
            with self._lock:
                ex = self._watched.pop(pid, None)
                if ex is None:
                    now = time.monotonic()
                    self._unclaimed[pid] = (code, now)
                    if len(self._unclaimed) > 256:  # orphans nobody will claim
                        self._unclaimed = {
                            p: v for p, v in self._unclaimed.items() if now - v[1] < 30
                        }
            if ex is not None:
                ex._set(code)
