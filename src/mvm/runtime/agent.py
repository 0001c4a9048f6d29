"""The host end of the control channel.

Each VM exposes ``CONTROL_PORTS`` unix sockets (QEMU chardevs wired to virtio-serial
ports). A client takes the first free one under a per-port ``flock``, so concurrent
``mvmctl`` commands (``logs -f`` beside ``exec`` beside ``ls``) never share a port. Every
request carries a random id and replies with another id are dropped, so a reply left over
from an interrupted client can never be mistaken for ours. Socket errors and timeouts are
translated here into :class:`~mvm.errors.AgentError` naming the VM.

Everything the guest sends is untrusted input, with bounds: a line longer than
``LINE_LIMIT`` ends the session with an :class:`~mvm.errors.AgentError`, and so do more
than ``FOREIGN_LIMIT`` messages in a row that are not for the request (malformed, too
deeply nested, or another id); the output events of streaming requests are checked and
decoded here (:class:`Output`, :class:`Final`), and error text is made printable. Nothing
a guest sends makes a client raise anything but an ``AgentError``.
"""

from __future__ import annotations

import base64
import os
import secrets
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from .. import _unixsock as unixsock
from .._locks import try_flock
from .._untrusted import as_int, printable
from ..errors import AgentError, AgentTimeout
from ..guest import protocol
from ..paths import VMFiles

DEFAULT_TIMEOUT = 10.0
#: The longest line the host accepts from a guest agent (its largest real messages, output
#: events of 32 KiB in base64, are about 44 KB).
LINE_LIMIT = 1 << 20
#: How many messages in a row may be for someone else (or unreadable) while a client waits:
#: an interrupted client leaves a handful; a guest flooding the channel is cut off.
FOREIGN_LIMIT = 10_000
STREAMS = ("stdout", "stderr")


@dataclass(frozen=True)
class Output:
    """Output of a streaming request (``exec``, ``console``, ``copy``)."""

    stream: str  #: "stdout" or "stderr"
    data: bytes


@dataclass(frozen=True)
class Final:
    """The reply that ends a streaming request."""

    ok: bool
    exit: int
    error: str  #: printable, bounded
    timed_out: bool = False


class AgentSession:
    """One control port, held for the life of the session."""

    def __init__(self, files: VMFiles, vm: str, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.files = files
        self.vm = vm
        self.timeout = timeout
        self._lock_fd: int | None = None
        self._sock: socket.socket | None = None
        self._fresh = False  #: connected, nothing sent yet (see send)
        self._buf = protocol.LineBuffer(LINE_LIMIT)
        self._pending: list[bytes] = []
        self._foreign = 0
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
            fd = try_flock(path)
        except OSError as exc:
            raise AgentError(self.vm, f"cannot open {path}: {exc.strerror}") from None
        if fd is None:
            return False
        try:
            self._sock = unixsock.connect(self.files.control(index), self.timeout)
        except OSError as exc:
            os.close(fd)
            raise AgentError(self.vm, f"cannot connect to the VM's agent: {exc.strerror or exc}",
                             hint="is it running? see `mvmctl ls`") from None
        self._lock_fd = fd
        self._fresh = True
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
        data = protocol.encode(msg)
        if self._fresh:
            # A newline first ends whatever partial line the port's last client left when it was
            # cut off (Ctrl-C amid its input): glued to that, this request was a malformed line,
            # answered without an id, and this client waited for its reply for ever.
            data, self._fresh = b"\n" + data, False
        try:
            self._sock.sendall(data)
        except OSError as exc:
            raise AgentError(self.vm, f"lost the connection to the agent: {exc}") from None

    def receive(self, rid: str, timeout: float | None) -> dict[str, Any]:
        """The next message for request ``rid``; stale messages are skipped."""
        assert self._sock is not None
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            while self._pending:
                msg = self._ours(self._pending.pop(0), rid)
                if msg is not None:
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
        if reply.get("ok") is not True:
            why = printable(reply.get("error") or "no reason given", 500)
            raise AgentError(self.vm, f"the guest refused {op!r}: {why}")
        return reply

    def start(self, op: str, **args: Any) -> str:
        """Send a streaming request; its events are read with :meth:`events` or :meth:`pending`."""
        self.rid = secrets.token_hex(6)
        self.send({"op": op, "id": self.rid, **args})
        return self.rid

    def events(self) -> Iterator[Output | Final]:
        """The started request's output, ending with (and including) its final reply."""
        while True:
            msg = self._checked(self.receive(self.rid, None))
            yield msg
            if isinstance(msg, Final):
                return

    def fileno(self) -> int:
        assert self._sock is not None
        return self._sock.fileno()

    def pending(self, block: bool = False) -> list[Output | Final]:
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
        raws, self._pending = self._pending, []
        return [self._checked(msg) for raw in raws if (msg := self._ours(raw, self.rid)) is not None]

    def _feed(self, data: bytes) -> None:
        try:
            self._pending.extend(self._buf.feed(data))
        except ValueError as exc:
            raise AgentError(self.vm, f"the agent sent a malformed reply: {exc}") from None

    def _ours(self, raw: bytes, rid: str) -> dict[str, Any] | None:
        """The message in ``raw`` if it is for request ``rid``; None (counted) otherwise."""
        msg = _decode_or_none(raw)
        if msg is not None and msg.get("id") == rid:
            self._foreign = 0
            return msg
        self._foreign += 1
        if self._foreign > FOREIGN_LIMIT:
            raise AgentError(self.vm, f"the agent sent {FOREIGN_LIMIT} messages in a row that were not "
                             "replies to this request (a flooded or hostile control channel)")
        return None

    def _checked(self, msg: dict[str, Any]) -> Output | Final:
        """A streaming request's message, checked: output events must name a stream and
        carry base64 data."""
        if "event" not in msg:
            return Final(ok=msg.get("ok") is True, exit=as_int(msg.get("exit"), 1),
                         error=printable(msg.get("error") or "", 2000), timed_out=msg.get("timed_out") is True)
        stream, data = msg.get("event"), msg.get("data")
        if stream not in STREAMS or not isinstance(data, str):
            raise AgentError(self.vm, f"the agent sent a malformed output event ({printable(stream, 40)})")
        try:
            return Output(str(stream), base64.b64decode(data, validate=True))
        except ValueError:
            raise AgentError(self.vm, "the agent sent output that is not base64") from None

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


STOPPED_BOOTING = "the VM stopped while booting"


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
                # no time: it would be seconds old when the guest reads it, and the guest
                # would date its boot's first events by it (the second ping sets the clock)
                session.send({"op": "ping", "id": rid})
                while True:
                    if not alive():
                        raise AgentError(vm, STOPPED_BOOTING)
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
        except AgentError as exc:
            if not alive():  # a connection reset is how a killed QEMU often shows first: say what happened
                if exc.message.startswith(STOPPED_BOOTING):
                    raise
                raise AgentError(vm, f"{STOPPED_BOOTING} ({exc.message})") from None
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
