"""A Handoff that names what it is given instead of opening it: QEMU's argv as logic, with
no files (the real one is exercised in test_qemu_argv.py and by every e2e boot)."""

from __future__ import annotations

from pathlib import Path

from mvm.backends.qemu_handoff import Handoff


class NamingHandoff(Handoff):
    def __init__(self) -> None:
        super().__init__()
        self.sockets: dict[int, str] = {}

    def block(self, path: Path, *, writable: bool) -> str:
        self._sets += 1
        self.argv += ["-add-fd", f"fd=<{path}>,set={self._sets}"]
        return f"<{'rw' if writable else 'ro'}:{path}>"

    def file(self, path: Path) -> str:
        return str(path)

    def _socket(self, what: str) -> int:
        fd = 100 + len(self.sockets)
        self.sockets[fd] = what
        return fd

    def listener(self, path: Path) -> int:
        return self._socket(f"listen:{path.name}")

    def pair(self, name: str) -> int:
        return self._socket(f"pair:{name}")

    def connected(self, path: Path) -> int:
        return self._socket(f"connect:{path.name}")
