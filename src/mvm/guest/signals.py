"""Signals for PID 1, handled outside signal context.

A Python signal handler runs in the main thread between bytecodes, so a handler that takes
a lock (``Event.set``, ``Thread.start``) deadlocks if the signal lands while the main thread
holds that lock: a second SIGIO inside the first handler's ``Event.set`` did exactly that,
and PID 1 stopped reaping children. Here the handlers are no-ops: the interpreter's C-level
handler writes the signal number to a pipe (``signal.set_wakeup_fd``), and a dispatcher
thread reads it and calls the subscribers in ordinary thread context.
"""

from __future__ import annotations

import os
import signal
import threading
from collections import defaultdict
from collections.abc import Callable


class SignalDispatcher:
    def __init__(self) -> None:
        self._subscribers: dict[int, list[Callable[[], None]]] = defaultdict(list)
        self._read, write = os.pipe()
        os.set_blocking(write, False)
        signal.set_wakeup_fd(write, warn_on_full_buffer=False)
        threading.Thread(target=self._run, name="signals", daemon=True).start()

    def subscribe(self, signum: int, callback: Callable[[], None]) -> None:
        """Call ``callback`` (in the dispatcher thread) each time ``signum`` arrives."""
        self._subscribers[signum].append(callback)
        signal.signal(signum, _noop)  # installs the C handler that feeds the wakeup fd

    def _run(self) -> None:
        while True:
            data = os.read(self._read, 512)
            for signum in dict.fromkeys(data):  # coalesce repeats in one read
                for callback in list(self._subscribers.get(signum, ())):
                    callback()


def _noop(signum: int, frame: object) -> None:
    return None
