"""The host end of the control channel.

Each VM exposes ``CONTROL_PORTS`` unix sockets (QEMU chardevs wired to virtio-serial
ports). A client takes the first free one under a per-port ``flock``, so concurrent
``mvmctl`` commands (``logs -f`` beside ``exec`` beside ``ls``) never share a port. Every
request carries a random id and replies with another id are dropped, so a reply left over
from an interrupted client can never be mistaken for ours. Socket errors and timeouts are
translated here into :class:`~mvm.errors.AgentError` naming the VM.
"""

from __future__ import annotations

import base64
import fcntl
import os
import secrets
import socket
import time
from collections.abc import Callable, Iterator
from types import TracebackType
from typing import Any

from .. import _unixsock as unixsock
from ..errors import AgentError, AgentTimeout
from ..guest import protocol
from ..paths import VMFiles

DEFAULT_TIMEOUT = 10.0


class AgentSession:
    """One control port, held for the life of the session."""

    def __init__(self, files: VMFiles, vm: str, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.files = files
        self.vm = vm
        self.timeout = timeout
        self._lock_fd: int | None = None
        self._sock: socket.socket | None = None
        self._buf = protocol.LineBuffer()
        self._pending: list[bytes] = []
        self.rid = ""

    # -- connection ---------------------------------------------------------------------

    def __enter__(self) -> AgentSession:
        self.open()
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def open(self) -> None:
        deadline = time.monotonic() + self.timeout
        while True:
            for index in range(protocol.CONTROL_PORTS):
                if self._try_port(index):
                    return
            if time.monotonic() > deadline:
                raise AgentTimeout(self.vm, "every control port of the VM is busy",
                                   hint="other mvmctl commands are talking to it; retry")
            time.sleep(0.05)

    def _try_port(self, index: int) -> bool:
        path = self.files.control_lock(index)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise AgentError(self.vm, f"cannot open {path}: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        try:
            self._sock = unixsock.connect(self.files.control(index), self.timeout)
        except OSError as exc:
            os.close(fd)
            raise AgentError(self.vm, f"cannot connect to the VM's agent: {exc.strerror or exc}",
                             hint="is it running? see `mvmctl ls`") from None
        self._lock_fd = fd
        return True

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None

    # -- messages -----------------------------------------------------------------------

    def send(self, msg: dict[str, Any]) -> None:
        if self._sock is None:
            raise AgentError(self.vm, "the connection to the agent is closed")
        try:
            self._sock.sendall(protocol.encode(msg))
        except OSError as exc:
            raise AgentError(self.vm, f"lost the connection to the agent: {exc}") from None

    def receive(self, rid: str, timeout: float | None) -> dict[str, Any]:
        """The next message for request ``rid``; stale messages are skipped."""
        assert self._sock is not None
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            while self._pending:
                msg = _decode_or_none(self._pending.pop(0))
                if msg is not None and msg.get("id") == rid:
                    return msg
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise AgentTimeout(self.vm, f"the agent did not answer within {timeout:g}s")
            self._sock.settimeout(remaining)
            try:
                data = self._sock.recv(65536)
            except TimeoutError:
                continue
            except OSError as exc:
                raise AgentError(self.vm, f"lost the connection to the agent: {exc}") from None
            if not data:
                raise AgentError(self.vm, "the agent closed the connection (VM stopping?)")
            self._feed(data)

    def request(self, op: str, **args: Any) -> dict[str, Any]:
        rid = secrets.token_hex(6)
        self.send({"op": op, "id": rid, **args})
        reply = self.receive(rid, self.timeout)
        if not reply.get("ok"):
            raise AgentError(self.vm, f"the guest refused {op!r}: {reply.get('error', 'no reason given')}")
        return reply

    def start(self, op: str, **args: Any) -> str:
        """Send a streaming request; its events are read with :meth:`events` or :meth:`pending`."""
        self.rid = secrets.token_hex(6)
        self.send({"op": op, "id": self.rid, **args})
        return self.rid

    def events(self) -> Iterator[dict[str, Any]]:
        """The started request's events, ending with (and including) its final reply."""
        while True:
            msg = self.receive(self.rid, None)
            yield msg
            if "event" not in msg:
                return

    def fileno(self) -> int:
        assert self._sock is not None
        return self._sock.fileno()

    def pending(self, block: bool = False) -> list[dict[str, Any]]:
        """Messages for the started request that have arrived (reads once if ``block``)."""
        assert self._sock is not None
        if block:
            self._sock.settimeout(None)
            try:
                data = self._sock.recv(65536)
            except OSError as exc:
                raise AgentError(self.vm, f"lost the connection to the agent: {exc}") from None
            if not data:
                raise AgentError(self.vm, "the agent closed the connection")
            self._feed(data)
        msgs = [_decode_or_none(raw) for raw in self._pending]
        self._pending.clear()
        return [m for m in msgs if m is not None and m.get("id") == self.rid]

    def _feed(self, data: bytes) -> None:
        try:
            self._pending.extend(self._buf.feed(data))
        except ValueError as exc:
            raise AgentError(self.vm, f"the agent sent a malformed reply: {exc}") from None

    def send_input(self, kind: str, **fields: Any) -> None:
        self.send({"op": kind, "id": self.rid, **fields})

    def send_stdin(self, data: bytes) -> None:
        self.send_input("stdin", data=base64.b64encode(data).decode())


def _decode_or_none(raw: bytes) -> dict[str, Any] | None:
    """A line that is not a JSON object (say, the tail of a reply meant for an interrupted
    client) is skipped like any reply with another id."""
    try:
        return protocol.decode(raw)
    except ValueError:
        return None


def request(files: VMFiles, vm: str, op: str, timeout: float = DEFAULT_TIMEOUT, **args: Any) -> dict[str, Any]:
    with AgentSession(files, vm, timeout) as session:
        return session.request(op, **args)


def wait_ready(files: VMFiles, vm: str, timeout: float, alive: Callable[[], bool]) -> float:
    """Ping until the agent answers, then set the guest's clock; return the seconds it took.

    One ping waits in the socket until the guest opens its port, so the answer arrives as
    soon as the agent is up; ``alive()`` is polled meanwhile so a dead VM fails fast. The
    clock is set by a second ping, whose host time is a millisecond old when the guest reads
    it (the first one's can be seconds old).
    """
    started = time.monotonic()
    deadline = started + timeout
    while True:
        try:
            with AgentSession(files, vm, timeout=max(0.1, deadline - time.monotonic())) as session:
                rid = secrets.token_hex(6)
                session.send({"op": "ping", "id": rid, "time": time.time()})
                while True:
                    if not alive():
                        raise AgentError(vm, "the VM stopped while booting")
                    if time.monotonic() > deadline:
                        raise AgentTimeout(vm, f"the guest agent did not answer within {timeout:g}s")
                    try:
                        session.receive(rid, 0.1)
                    except AgentTimeout:
                        continue
                    # The first ping waited in the socket until the guest opened its port, so
                    # its time is stale: set the guest's clock now, one fresh round trip away.
                    session.request("ping", time=time.time())
                    return time.monotonic() - started
        except AgentTimeout:
            raise
        except AgentError:
            if not alive() or time.monotonic() > deadline:
                raise
            time.sleep(0.05)
