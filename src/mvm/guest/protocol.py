"""The control-channel wire format, shared by the host client and the guest agent.

Stdlib only: this file runs inside the guest on whatever Python the image has.

Messages are JSON objects, one per line (UTF-8, ``\\n``-terminated). A request carries an
``op``; the guest answers with ``{"ok": true, ...}`` or ``{"ok": false, "error": "..."}``.
Streaming operations (``exec``, ``console``) first send events (``{"event": "stdout",
"data": <base64>}``) and end with one ``{"ok": ..., "exit": N}`` reply. While one runs, the
host may send ``stdin``/``eof``/``resize`` messages on the same connection.

A guest ``write()`` to a virtio-serial port is capped at 32 KiB, so :func:`write_all` loops.

The host treats every byte from the guest as hostile input: :func:`decode` refuses
messages nested deeper than ``MAX_DEPTH`` (deep nesting makes ``json.loads`` raise
``RecursionError``, which is not a ``ValueError``), and :class:`LineBuffer` refuses lines
longer than its limit and skips the rest of such a line instead of taking its tail for a
message. Both raise ``ValueError`` only.
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
#: Where every image has the init (PID 1): the kernel's ``init=`` on every machine mvm makes.
INIT_PATH = "/usr/lib/mvm/init"
#: mvm's own trees in every image: the agent and its config (no spec's file or volume goes there).
MVM_TREES = ("/usr/lib/mvm", "/etc/mvm")
#: Where the init mounts a file system at boot (mvm.guest.system.mount_early), hiding what the
#: image holds there.
BOOT_MOUNTS = ("/proc", "/sys", "/dev", "/run", "/tmp")
#: Serial of the raw disk that carries the per-boot runtime config.
CONFIG_DISK_SERIAL = "mvm-config"
CONFIG_DISK_BYTES = 64 * 1024
PROTOCOL_VERSION = 1

#: The only requests the agent answers. Anything else is refused.
OPS = frozenset({"ping", "status", "stats", "shutdown", "exec", "console", "copy", "configure", "refresh"})
#: Messages a client may send while a streaming op runs.
STREAM_INPUT = frozenset({"stdin", "eof", "resize"})
#: What ``sh -c`` exits with when it cannot find (127) or run (126) the program: a service's
#: short run ending so carries a reason, and the host counts it failing from that run on.
SHELL_CANNOT_RUN = frozenset({126, 127})
#: Seconds services get between SIGTERM and SIGKILL when the guest stops, unless the host's
#: ``shutdown`` says otherwise (its ``grace``: `down --timeout` less what the rest needs).
STOP_GRACE = 5.0
MAX_STOP_GRACE = 3600.0


def encode(msg: dict[str, Any]) -> bytes:
    return json.dumps(msg, separators=(",", ":")).encode() + b"\n"


#: How deeply a message may nest objects and arrays (real ones nest 4 levels at most).
MAX_DEPTH = 32
_BRACKETS = b"[]{}"
_NOT_BRACKETS = bytes(b for b in range(256) if b not in _BRACKETS)


def nesting(line: bytes) -> int:
    """How deeply the JSON text ``line`` nests arrays and objects (brackets inside strings
    do not count). Cheap when a line holds few brackets, linear otherwise."""
    opens = line.count(b"[") + line.count(b"{")
    if opens <= MAX_DEPTH:
        return opens
    import re

    stripped = re.sub(rb'"(?:[^"\\]|\\.)*"', b"", line)
    depth = deepest = 0
    for ch in stripped.translate(None, _NOT_BRACKETS):
        if ch in (0x5B, 0x7B):  # [ {
            depth += 1
            if depth > deepest:
                deepest = depth
        else:
            depth -= 1
    return deepest


def decode(line: bytes, max_depth: int = MAX_DEPTH) -> dict[str, Any]:
    """One message: a JSON object. ``ValueError`` for anything else, including text nested
    deeper than ``max_depth`` (never ``RecursionError``)."""
    if nesting(line) > max_depth:
        raise ValueError(f"message nested deeper than {max_depth} levels")
    try:
        msg = json.loads(line)
    except RecursionError:
        raise ValueError("message nested too deeply") from None
    if not isinstance(msg, dict):
        raise ValueError("message is not a JSON object")
    return msg


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


class LineBuffer:
    """Splits a byte stream into complete lines; keeps the partial tail, up to ``limit``.

    A line longer than ``limit`` raises ``ValueError`` (the other lines of that ``feed`` are
    lost with it), and the rest of it, up to its newline, is skipped: its tail is never
    taken for a line of its own. The buffer never holds more than ``limit`` bytes.
    """

    def __init__(self, limit: int = 16 * 1024 * 1024) -> None:
        self._buf = bytearray()
        self._limit = limit
        self._skipping = False

    def feed(self, data: bytes) -> list[bytes]:
        if self._skipping:
            end = data.find(b"\n")
            if end < 0:
                return []
            self._skipping = False
            data = data[end + 1 :]
        if b"\n" not in data:
            if len(self._buf) + len(data) > self._limit:
                self._overflow()
            self._buf += data
            return []
        head, _, rest = data.rpartition(b"\n")
        lines = (bytes(self._buf) + head).split(b"\n")
        self._buf = bytearray()
        if len(rest) > self._limit:
            self._overflow()
        self._buf += rest
        if any(len(line) > self._limit for line in lines):
            raise ValueError(f"line longer than {self._limit} bytes")
        return [line for line in lines if line.strip()]

    def _overflow(self) -> None:
        self._buf.clear()
        self._skipping = True
        raise ValueError(f"line longer than {self._limit} bytes")

    def reset(self) -> None:
        self._buf.clear()
        self._skipping = False
