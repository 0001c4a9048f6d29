"""The guest's event stream: service log lines, service state and health transitions.

Events go, one JSON object per line, to the ``org.mvm.events`` virtio-serial port, which
the host backs with a plain file (``events.log`` in the VM's runtime dir). So logs need no
daemon on the host and survive the VM. A single writer thread keeps lines whole.
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
    from typing import Any

from .protocol import write_all


class EventLog:
    def __init__(self, path: str | None) -> None:
        self._fd: int | None = None
        if path:
            try:
                self._fd = os.open(path, os.O_WRONLY | os.O_NOCTTY)
            except OSError as exc:
                print(f"mvm-init: cannot open event port {path}: {exc}", file=sys.stderr)
        self._queue: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._drain, name="events", daemon=True)
        self._thread.start()

    def emit(self, kind: str, **fields: Any) -> None:
        # t: wall clock (for people); up: seconds since boot (for boot timelines)
        event = {"t": round(time.time(), 3), "up": round(time.monotonic(), 3), "kind": kind, **fields}
        self._queue.put(json.dumps(event, separators=(",", ":")).encode() + b"\n")

    def log(self, svc: str, stream: str, line: str) -> None:
        self.emit("log", svc=svc, stream=stream, line=line)

    def flush(self, timeout: float = 2.0) -> None:
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
            if self._fd is None:
                sys.stderr.buffer.write(item)
                sys.stderr.flush()
                continue
            try:
                write_all(self._fd, item)
            except OSError:
                pass
