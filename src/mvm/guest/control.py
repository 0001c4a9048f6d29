"""The guest end of the control channel: one server thread per virtio-serial port.

The host has no daemon, so several ``mvmctl`` processes may talk to one VM at once; each
takes one of the ``CONTROL_PORTS`` ports for the length of its request. Only the verbs in
``protocol.OPS`` are answered.

While no host client is connected, the port polls as hung up; the thread then sleeps until
SIGIO (sent by the kernel when the host opens the port) or a short fallback timeout.
"""

from __future__ import annotations

import fcntl
import os
import select
import signal
import threading
import time
from collections.abc import Callable

TYPE_CHECKING = False  # not `from typing`: importing typing costs ~35 ms at boot under TCG

if TYPE_CHECKING:
    from typing import Any

from . import clone, protocol, system
from .execstream import Connection, StreamOp
from .reaper import Reaper
from .signals import SignalDispatcher
from .usage import usage

#: How the agent's own Python runs mvm.guest.copy: its package dir on sys.path, isolated (-I).
COPY_ENTRY = ("import sys; sys.path.insert(0, sys.argv.pop(1)); from mvm.guest.copy import main; "
              "sys.exit(main(sys.argv[1:]))")


class ControlServer:
    def __init__(
        self,
        ports: list[str],
        *,
        reaper: Reaper,
        status: Callable[[], dict[str, Any]],
        shutdown: Callable[[float], None],
        configure: Callable[[dict[str, Any]], str | None],
        env_overrides: dict[str, str],
        path: str,
        signals: SignalDispatcher,
        clock_set: Callable[[], None] = lambda: None,
    ) -> None:
        self.signals = signals
        self.clock_set = clock_set  # the host set the clock exactly (mvm.guest.clock.Keeper learns from it)
        self.ports = ports
        self.reaper = reaper
        self.status = status
        self.shutdown = shutdown
        self.configure = configure
        self.env_overrides = env_overrides
        self.path = path
        self._wakeups: list[threading.Event] = []

    def _on_sigio(self) -> None:
        for event in self._wakeups:
            event.set()

    def start(self) -> None:
        self.signals.subscribe(signal.SIGIO, self._on_sigio)
        for dev in self.ports:
            threading.Thread(target=self._serve, args=(dev,), name=f"ctl-{dev}", daemon=True).start()

    def _serve(self, dev: str) -> None:
        fd = os.open(dev, os.O_RDWR | os.O_NOCTTY)
        fcntl.fcntl(fd, fcntl.F_SETOWN, os.getpid())
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_ASYNC)
        conn = Connection(fd)
        wakeup = threading.Event()
        self._wakeups.append(wakeup)
        buf = protocol.LineBuffer()
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        while True:
            events = poller.poll(10_000)  # data or a hang-up wakes it; the timeout is a safety net
            if not events:
                continue
            mask = events[0][1]
            data = b""
            if mask & select.POLLIN:
                try:
                    data = os.read(fd, 65536)
                except OSError:
                    data = b""
            if not data:
                # Host side closed (or never opened): drop the session, wait for a client.
                buf.reset()
                if conn.active is not None and self._stays_closed(poller, wakeup):
                    # its client is gone: end its command (a new client's request would too)
                    conn.active.kill()
                # SIGIO wakes us when the host opens the port; the timeout is only a safety net
                # (polling every 0.25 s on four ports was most of an idle guest's CPU).
                wakeup.wait(5.0)
                wakeup.clear()
                continue
            try:
                lines = buf.feed(data)
            except ValueError:
                conn.send({"ok": False, "error": "request too large"})
                continue
            for line in lines:
                self._dispatch(conn, line)

    @staticmethod
    def _stays_closed(poller: select.poll, wakeup: threading.Event) -> bool:
        """Whether the port is still closed a moment after it read as closed: that news travels
        apart from the data, so it can come after the next client's request (whose command
        must not be killed for it)."""
        wakeup.wait(1.0)  # SIGIO: the host opened the port again
        wakeup.clear()
        events = poller.poll(0)
        return bool(events) and not events[0][1] & select.POLLIN and bool(events[0][1] & select.POLLHUP)

    def _dispatch(self, conn: Connection, line: bytes) -> None:
        try:
            req = protocol.decode(line)
        except ValueError:
            conn.send({"ok": False, "error": "malformed request: not a JSON object"})
            return
        op, rid = req.get("op"), req.get("id")
        try:
            if op in protocol.STREAM_INPUT:
                # input for the command running now; any other is the tail of a command that
                # has ended (`yes | exec -i ... head -1`): dropped without a word, since an
                # answer to each would flood the next client with replies not its own
                if conn.active is not None and rid == conn.active.rid:
                    conn.active.feed(req)
                return
            if conn.active is not None:
                # One host client holds a port at a time (a host lock) and asks anew only once its
                # command ended: this one's client went away (`exec ... | head`) before the port
                # read as closed. It is ended, its output dropped: the new client gets its own only.
                stale = conn.active
                stale.abandon()
                stale.done.wait(5.0)
                if conn.active is not None:
                    conn.send({"ok": False, "error": f"{op!r} not allowed while a command runs"}, rid)
                    return
            if op not in protocol.OPS:
                conn.send({"ok": False, "error": f"unknown op {op!r}; allowed: {sorted(protocol.OPS)}"}, rid)
                return
            getattr(self, f"_op_{op}")(conn, req, rid)
        except Exception as exc:  # a bug or an odd request must not end this port's thread: it would never answer again
            conn.send({"ok": False, "error": f"the guest agent failed on {op!r}: {exc!r}"}, rid)

    def _op_ping(self, conn: Connection, req: dict[str, Any], rid: Any) -> None:
        host_time = req.get("time")
        if isinstance(host_time, (int, float)):
            try:
                if abs(time.time() - host_time) > 0.05:
                    # The RTC gives whole seconds at boot; the host's clock makes log times exact.
                    time.clock_settime(time.CLOCK_REALTIME, float(host_time))
                self.clock_set()
            except OSError:
                pass
        conn.send({"ok": True, "pong": time.time(), "version": protocol.PROTOCOL_VERSION}, rid)

    def _op_status(self, conn: Connection, req: dict[str, Any], rid: Any) -> None:
        extra: dict[str, Any] = {}
        if req.get("debug"):
            import sys
            import traceback

            extra["threads"] = {str(tid): "".join(traceback.format_stack(frame))
                                for tid, frame in sys._current_frames().items()}
        conn.send({"ok": True, **self.status(), **extra}, rid)

    def _op_refresh(self, conn: Connection, req: dict[str, Any], rid: Any) -> None:
        """A restored clone becomes its own machine: fresh RNG, machine-id, hostname (and, with
        ``configure``, its volumes and config, after which its services start)."""
        try:
            clone.reseed(str(req.get("seed") or ""))
            clone.new_machine_id()
            if isinstance(req.get("hostname"), str) and req["hostname"]:
                system.set_hostname(req["hostname"])
        except (OSError, ValueError) as exc:
            conn.send({"ok": False, "error": f"cannot make this clone unique: {exc}"}, rid)
            return
        error = self.configure(req.get("config") or {}) if req.get("op") == "configure" else None
        conn.send({"ok": error is None, **({"error": error} if error else {})}, rid)

    _op_configure = _op_refresh

    def _op_stats(self, conn: Connection, req: dict[str, Any], rid: Any) -> None:
        conn.send({"ok": True, **usage(self.status().get("services") or {})}, rid)

    def _op_shutdown(self, conn: Connection, req: dict[str, Any], rid: Any) -> None:
        """Power off; ``grace``: the seconds services get between SIGTERM and SIGKILL (the host's
        `down --timeout` less what the rest of the shutdown needs)."""
        grace = req.get("grace", protocol.STOP_GRACE)
        if not isinstance(grace, (int, float)) or isinstance(grace, bool) or not 0 <= grace <= protocol.MAX_STOP_GRACE:
            conn.send({"ok": False, "error": f"grace {grace!r}: seconds from 0 to {protocol.MAX_STOP_GRACE:g}"}, rid)
            return
        conn.send({"ok": True}, rid)
        threading.Thread(target=self.shutdown, args=(float(grace),), name="shutdown", daemon=True).start()

    def _op_stream(self, conn: Connection, req: dict[str, Any], rid: Any) -> None:
        """``exec``, ``console`` and ``copy``: a command whose output streams back."""
        op = req.get("op")
        if op == "console":
            shell = "/bin/bash" if os.path.exists("/bin/bash") else "/bin/sh"
            # on a terminal unless the host's input is not one (`mvmctl console < script`):
            # then, as ssh does, the shell reads the script from a pipe and ends with it
            req = {**req, "argv": [shell, "-l"], "tty": req.get("tty", True) is not False}
        elif op == "copy":  # a tar stream in or out (mvm.guest.copy), as root, by the agent's Python
            import sys

            args = req.get("args")
            if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
                conn.send({"ok": False, "error": "copy needs args: a list of strings"}, rid)
                return
            agent_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
            req = {"id": rid, "argv": [sys.executable, "-I", "-c", COPY_ENTRY, agent_root, *args], "user": "root"}
        stream = StreamOp(conn, req, self)
        conn.active = stream
        stream.start()

    _op_exec = _op_console = _op_copy = _op_stream
