"""A small blocking QMP session over ``qemu.qmp``, with errors translated at this boundary.

Used for what only the hypervisor can do: add host forwards, ``quit``, query state. QMP
errors, socket errors and timeouts all become :class:`~mvm.errors.VMError` naming the VM.
``human-monitor-command`` reports failures as text inside a successful reply (for example
``hostfwd_add``), so :meth:`QMP.hmp` returns that text for the caller to judge.
"""

from __future__ import annotations

import logging
from pathlib import Path
from types import TracebackType
from typing import Any

from .. import _unixsock as unixsock
from ..errors import VMError

log = logging.getLogger(__name__)


class QMP:
    def __init__(self, path: Path, vm: str, timeout: float = 5.0) -> None:
        self.path = path
        self.vm = vm
        self.timeout = timeout
        self._mon: Any = None

    def __enter__(self) -> QMP:
        from qemu.qmp.legacy import QEMUMonitorProtocol

        try:
            sock = unixsock.connect(self.path, self.timeout)
            self._mon = QEMUMonitorProtocol(sock)
            self._mon.settimeout(self.timeout)
            self._mon.connect()  # greeting + capabilities negotiation
        except Exception as exc:  # ConnectError, OSError, timeouts: all mean "no monitor"
            self.close()
            raise VMError(self.vm, f"cannot talk to QEMU's monitor ({self.path.name}): {exc}") from exc
        return self

    def command(self, name: str, **args: Any) -> Any:
        from qemu.qmp import QMPError

        try:
            return self._mon.cmd(name, **args)
        except (TimeoutError, QMPError, OSError) as exc:
            raise VMError(self.vm, f"QMP {name} failed: {exc}") from exc

    def send_fd(self, fd: int, name: str) -> None:
        """Hand QEMU an open descriptor under ``name`` (``getfd``), e.g. for ``migrate fd:NAME``."""
        try:
            self._mon.send_fd_scm(fd)
        except OSError as exc:
            raise VMError(self.vm, f"cannot pass a file to QEMU: {exc}") from exc
        self.command("getfd", fdname=name)

    def hmp(self, command_line: str) -> str:
        return str(self.command("human-monitor-command", **{"command-line": command_line}))

    def close(self) -> None:
        if self._mon is not None:
            try:
                self._mon.close()
            except Exception:  # closing a broken session must not mask the real error
                log.debug("closing QMP session failed", exc_info=True)
            self._mon = None

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
