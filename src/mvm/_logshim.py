"""The per-VM log shim: the host end of a VM's console and event streams, with a cap.

QEMU writes to a file as fast as the guest writes to its serial or event port, and a guest
controls those ports: a cap inside the guest is no defence. So QEMU does not write files;
its two chardevs are socket pairs whose other ends this small process holds (one per VM,
started with QEMU, like conmon for a container). It appends to ``console.log`` and
``events.log`` and rotates each at its share of the VM's cap: the file becomes ``NAME.1``
(replacing the older one, whose bytes are dropped) and a new file starts with a line
saying how much was dropped. Disk use per VM is bounded whatever the guest writes.

It exits when both streams reach end-of-file: QEMU exited, or never started. Run as
``python -m mvm._logshim DIR CAP_BYTES CONSOLE_FD EVENTS_FD``; stdlib only, no mvm imports.
"""

from __future__ import annotations

import json
import os
import selectors
import socket
import sys
import time

#: stream -> (file name, share of the cap)
STREAMS = {"console": ("console.log", 0.25), "events": ("events.log", 0.75)}


def rotated(name: str) -> str:
    return name + ".1"


class Sink:
    """One stream's file, rotated when it reaches ``limit`` bytes (two files at most)."""

    def __init__(self, directory: str, stream: str, file_name: str, limit: int) -> None:
        self.path = os.path.join(directory, file_name)
        self.stream = stream
        self.limit = max(limit, 4096)
        self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self.size = os.fstat(self.fd).st_size
        self.pending = b""
        self.dropped = 0  #: bytes dropped by this shim (each rotation drops the older file)

    def write(self, data: bytes) -> None:
        data = self.pending + data
        cut = data.rfind(b"\n") + 1  # rotate only between lines
        self.pending = data[cut:]
        if len(self.pending) > 65536:  # a "line" without end: take it as it is
            cut, self.pending = len(data), b""
        whole = data[:cut]
        while whole:
            room = self.limit - self.size
            if room <= 0:
                self.rotate()
                continue
            chunk = whole[:room] if len(whole) > room else whole
            if len(whole) > room:  # keep lines whole where one fits
                end = chunk.rfind(b"\n") + 1
                chunk = chunk[:end] if end else chunk
            os.write(self.fd, chunk)
            self.size += len(chunk)
            whole = whole[len(chunk):]

    def rotate(self) -> None:
        old = rotated(self.path)
        try:
            dropped = os.stat(old).st_size
        except FileNotFoundError:
            dropped = 0
        os.close(self.fd)
        os.replace(self.path, old)
        self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        self.size = 0
        if dropped:
            os.write(self.fd, self.marker(dropped))
            self.size = os.fstat(self.fd).st_size

    def marker(self, dropped: int) -> bytes:
        self.dropped += dropped
        total = f"; {self.dropped} bytes in all" if self.dropped > dropped else ""
        text = f"{dropped} bytes of older {self.stream} output dropped (log cap{total})"
        if self.stream == "events":
            return json.dumps({"t": round(time.time(), 3), "kind": "init", "msg": text}).encode() + b"\n"
        return f"[mvm: {text}]\n".encode()

    def close(self) -> None:
        if self.pending:
            os.write(self.fd, self.pending)
        os.close(self.fd)


def serve(directory: str, cap: int, console_fd: int, events_fd: int) -> int:
    directory = os.path.abspath(directory)
    selector = selectors.DefaultSelector()
    for stream, fd in (("console", console_fd), ("events", events_fd)):
        file_name, share = STREAMS[stream]
        conn = socket.socket(fileno=fd)
        conn.setblocking(False)
        selector.register(conn, selectors.EVENT_READ, (conn, Sink(directory, stream, file_name, int(cap * share / 2))))
    os.chdir("/")  # only QEMU has the VM dir as its cwd: that is how mvm finds a VM's QEMU
    open_streams = len(STREAMS)
    while open_streams:
        for key, _ in selector.select():
            conn, sink = key.data
            try:
                data = conn.recv(65536)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            if data:
                sink.write(data)
            else:  # QEMU ended (or never started)
                selector.unregister(conn)
                conn.close()
                sink.close()
                open_streams -= 1
    return 0


if __name__ == "__main__":
    sys.exit(serve(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])))
