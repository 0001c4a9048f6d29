"""The control-channel wire format, shared by the host client and the guest agent.

Stdlib only: this file runs inside the guest on whatever Python the image has.

Messages are JSON objects, one per line (UTF-8, ``\\n``-terminated). A request carries an
``op``; the guest answers with ``{"ok": true, ...}`` or ``{"ok": false, "error": "..."}``.
Streaming operations (``exec``, ``console``) first send events (``{"event": "stdout",
"data": <base64>}``) and end with one ``{"ok": ..., "exit": N}`` reply. While one runs, the
host may send ``stdin``/``eof``/``resize`` messages on the same connection.

A guest ``write()`` to a virtio-serial port is capped at 32 KiB, so :func:`write_all` loops.
"""

from __future__ import annotations

import json
import os

TYPE_CHECKING = False  # not `from typing`: importing typing costs ~35 ms at boot under TCG

if TYPE_CHECKING:
    from typing import Any

#: virtio-serial port names. The event port is write-only from the guest (a host file).
CONTROL_PORT_PREFIX = "org.mvm.ctl."
EVENT_PORT = "org.mvm.events"
#: How many control ports each VM has; one client holds a port for the length of a request.
CONTROL_PORTS = 4
#: Serial of the raw disk that carries the per-boot runtime config.
CONFIG_DISK_SERIAL = "mvm-config"
CONFIG_DISK_BYTES = 64 * 1024
PROTOCOL_VERSION = 1

#: The only requests the agent answers. Anything else is refused.
OPS = frozenset({"ping", "status", "stats", "shutdown", "exec", "console", "copy", "configure", "refresh"})
#: Messages a client may send while a streaming op runs.
STREAM_INPUT = frozenset({"stdin", "eof", "resize"})


def encode(msg: dict[str, Any]) -> bytes:
    return json.dumps(msg, separators=(",", ":")).encode() + b"\n"


def decode(line: bytes) -> dict[str, Any]:
    msg = json.loads(line)
    if not isinstance(msg, dict):
        raise ValueError("message is not a JSON object")
    return msg


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


class LineBuffer:
    """Splits a byte stream into complete lines; keeps the partial tail."""

    def __init__(self, limit: int = 16 * 1024 * 1024) -> None:
        self._buf = bytearray()
        self._limit = limit

    def feed(self, data: bytes) -> list[bytes]:
        self._buf += data
        if b"\n" not in data:
            if len(self._buf) > self._limit:
                self._buf.clear()
                raise ValueError("line too long")
            return []
        *lines, rest = bytes(self._buf).split(b"\n")
        self._buf = bytearray(rest)
        return [line for line in lines if line.strip()]

    def reset(self) -> None:
        self._buf.clear()
