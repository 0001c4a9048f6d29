"""A small blocking QMP session over ``qemu.qmp``, with errors translated at this boundary.

Used for what only the hypervisor can do: add host forwards, ``quit``, save and restore,
query state. QMP errors, socket errors and timeouts all become :class:`~mvm.errors.VMError`
naming the VM. Every step is bounded by the session's timeout, the greeting included: a
QEMU that accepts the connection but never speaks (frozen, stopped, wedged) must not hang
``down``. ``human-monitor-command`` reports failures as text inside a successful reply
(for example ``hostfwd_add``), so :meth:`QMP.hmp` returns that text for the caller to judge.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Awaitable
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

from .. import _unixsock as unixsock
from ..errors import VMError

if TYPE_CHECKING:
    import asyncio

log = logging.getLogger(__name__)
T = TypeVar("T")

_quiet_lock = threading.Lock()
_quiet_sessions = 0
_level_before = logging.NOTSET


def _quiet_qmp_logs(entering: bool) -> None:
    """qemu.qmp logs each failure it raises at ERROR; mvm reports it (a VMError), once. So
    while any session is open (and the root logger is not at DEBUG, as ``--debug`` sets it)
    its logger is quiet, and its own level comes back when the last one closes: an
    application that configures qemu.qmp's logging keeps what it set."""
    global _quiet_sessions, _level_before
    qmp_log = logging.getLogger("qemu.qmp")
    with _quiet_lock:
        if entering:
            if _quiet_sessions == 0 and not logging.getLogger().isEnabledFor(logging.DEBUG):
                _level_before = qmp_log.level
                qmp_log.setLevel(logging.CRITICAL)
            _quiet_sessions += 1
        else:
            _quiet_sessions -= 1
            if _quiet_sessions == 0 and qmp_log.level == logging.CRITICAL:
                qmp_log.setLevel(_level_before)


class QMP:
    def __init__(self, path: Path, vm: str, timeout: float = 5.0) -> None:
        self.path = path
        self.vm = vm
        self.timeout = timeout
        self._loop: asyncio.AbstractEventLoop | None = None
        self._client: Any = None
        self._cut_short = False

    def _run(self, step: Awaitable[T]) -> T:
        import asyncio  # here, not at the top: `status` and `ls` import this module but never speak QMP

        assert self._loop is not None
        try:
            return self._loop.run_until_complete(asyncio.wait_for(step, self.timeout))
        except BaseException as exc:
            if not isinstance(exc, Exception):  # Ctrl-C: the step's task is left pending (see close)
                self._cut_short = True
            raise

    def __enter__(self) -> QMP:
        import asyncio

        from qemu.qmp import QMPClient

        _quiet_qmp_logs(True)
        self._loop = asyncio.new_event_loop()
        try:
            sock = unixsock.connect(self.path, self.timeout)
            self._client = QMPClient(self.vm)
            self._run(self._client.connect(sock))  # greeting + capabilities negotiation
        except BaseException as exc:  # ConnectError, OSError, timeouts: all mean "no monitor"
            self.close()
            if isinstance(exc, Exception):
                raise VMError(self.vm, f"cannot talk to QEMU's monitor ({self.path.name}): "
                              f"{exc or type(exc).__name__}") from exc
            raise
        return self

    def command(self, name: str, **args: Any) -> Any:
        from qemu.qmp import QMPError

        try:
            return self._run(self._client.execute(name, args or None))
        except (TimeoutError, QMPError, OSError) as exc:
            raise VMError(self.vm, f"QMP {name} failed: {exc or type(exc).__name__}") from exc

    def send_fd(self, fd: int, name: str) -> None:
        """Hand QEMU an open descriptor under ``name`` (``getfd``), e.g. for ``migrate fd:NAME``."""
        try:
            self._client.send_fd_scm(fd)
        except OSError as exc:
            raise VMError(self.vm, f"cannot pass a file to QEMU: {exc}") from exc
        self.command("getfd", fdname=name)

    def add_fd(self, fd: int, fdset: int) -> None:
        """Put an open descriptor in fdset ``fdset`` (``add-fd``): ``/dev/fdset/N`` names it."""
        try:
            self._client.send_fd_scm(fd)
        except OSError as exc:
            raise VMError(self.vm, f"cannot pass a file to QEMU: {exc}") from exc
        self.command("add-fd", **{"fdset-id": fdset})

    def hmp(self, command_line: str) -> str:
        return str(self.command("human-monitor-command", **{"command-line": command_line}))

    def close(self) -> None:
        """Disconnect and close the loop. A step cut short (Ctrl-C in the middle of the
        greeting) leaves its task pending: it is cancelled and collected first, or its
        failure would print as "Task exception was never retrieved" with a traceback. (Not
        otherwise: cancelling qemu.qmp's own reader would leave its stream unclosed.)"""
        if self._loop is not None:
            import asyncio

            try:
                if self._cut_short and (pending := asyncio.all_tasks(self._loop)):
                    for task in pending:
                        task.cancel()
                    self._loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
                if self._client is not None:
                    self._loop.run_until_complete(asyncio.wait_for(self._client.disconnect(), 2.0))
            except Exception:  # closing a broken session must not mask the real error
                log.debug("closing QMP session failed", exc_info=True)
            finally:
                self._loop.close()
                _quiet_qmp_logs(False)
        self._client = None
        self._loop = None

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
