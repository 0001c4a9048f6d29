"""Unix socket paths that may be longer than the kernel's 108-byte limit.

VM runtime dirs live under ``$MVM_HOME`` or the XDG state dir, which can be deep. QEMU is
started with the VM dir as its cwd and relative socket names; clients reach the same
sockets through ``/proc/self/fd/<dirfd>/<name>``, which is always short.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

LIMIT = 100


@contextmanager
def short_path(path: Path) -> Iterator[str]:
    if len(os.fsencode(path)) < LIMIT:
        yield str(path)
        return
    fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        yield f"/proc/self/fd/{fd}/{path.name}"
    finally:
        os.close(fd)


def connect(path: Path, timeout: float) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        with short_path(path) as short:
            sock.connect(short)
    except BaseException:
        sock.close()
        raise
    return sock
