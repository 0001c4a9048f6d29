"""Unix socket paths that may be longer than the kernel's 108-byte limit.

VM runtime dirs live under ``$MVM_HOME`` or the XDG state dir, which can be deep. mvm binds
a VM's sockets (and hands them to QEMU as descriptors) and connects to them through
``/proc/self/fd/<dirfd>/<name>``, which is always short.
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


def listen(path: Path) -> socket.socket:
    """A listening socket at ``path`` (replacing a stale one), readable by its owner only."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with short_path(path) as short:
            try:
                os.unlink(short)
            except FileNotFoundError:
                pass
            sock.bind(short)
            os.chmod(short, 0o600)  # in a private dir anyway
        sock.listen(4)
    except BaseException:
        sock.close()
        raise
    return sock
