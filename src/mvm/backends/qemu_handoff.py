"""Everything QEMU uses, opened by mvm and handed over as descriptors.

QEMU may run as a user of the VM's own that can open nothing of mvm's by path
(:mod:`mvm.runtime.machine_users`), so it is given:

- disks as fdsets (``-add-fd``), named ``/dev/fdset/N`` in ``-blockdev``; QEMU takes the
  descriptor whose access mode matches (read-only disks get a read-only one);
- the kernel, the initrd and a RAM file as ``/proc/self/fd/N``: QEMU opens these anew
  through the descriptor, so the file's own mode must let its user (kernel and initrd are
  0644; template RAM files belong to the VMs' shared group);
- its monitor and control sockets already bound and listening (``fd=N``): mvm's sockets,
  in mvm's private dir;
- its console and event streams as one end of a socket pair, whose other end goes to the
  VM's log shim.

One way for every machine, whichever user runs it. :meth:`Handoff.close` after the spawn:
QEMU has its copies, and the log shim must see end-of-file when QEMU ends.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from types import TracebackType

from .. import _unixsock as unixsock


class Handoff:
    def __init__(self) -> None:
        self.fds: list[int] = []
        #: ``-add-fd`` options, one per fdset
        self.argv: list[str] = []
        #: our ends of the socket pairs, by stream name (for the log shim)
        self.peers: dict[str, int] = {}
        self._objects: list[socket.socket] = []
        self._sets = 0

    def _keep(self, fd: int) -> int:
        self.fds.append(fd)
        return fd

    def block(self, path: Path, *, writable: bool) -> str:
        """A disk image, as the filename a ``file`` blockdev node takes."""
        fd = self._keep(os.open(path, (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC))
        self._sets += 1
        self.argv += ["-add-fd", f"fd={fd},set={self._sets}"]
        return f"/dev/fdset/{self._sets}"

    def file(self, path: Path) -> str:
        """A file QEMU opens itself (kernel, initrd, RAM file)."""
        return f"/proc/self/fd/{self._keep(os.open(path, os.O_RDONLY | os.O_CLOEXEC))}"

    def listener(self, path: Path) -> int:
        """A server socket at ``path`` that QEMU accepts on."""
        sock = unixsock.listen(path)
        self._objects.append(sock)
        return self._keep(sock.fileno())

    def pair(self, name: str) -> int:
        """A connected stream: QEMU's end returned, ours kept in :attr:`peers`."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self._objects += [ours, theirs]
        self.peers[name] = ours.fileno()
        return self._keep(theirs.fileno())

    def connected(self, path: Path) -> int:
        """A connection to a server another process runs (virtiofsd), for QEMU to use."""
        sock = unixsock.connect(path, 5.0)
        sock.setblocking(True)
        self._objects.append(sock)
        return self._keep(sock.fileno())

    def close(self) -> None:
        owned = {s.fileno() for s in self._objects}
        for sock in self._objects:
            sock.close()
        for fd in self.fds:
            if fd not in owned:
                os.close(fd)
        self.fds, self.peers, self._objects = [], {}, []

    def __enter__(self) -> Handoff:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
