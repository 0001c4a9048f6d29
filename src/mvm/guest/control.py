"""The guest end of the control channel: one server thread per virtio-serial port.

The host has no daemon, so several ``mvmctl`` processes may talk to one VM at once; each
takes one of the ``CONTROL_PORTS`` ports for the length of its request. Only the verbs in
``protocol.OPS`` are answered.

While no host client is connected, the port polls as hung up; the thread then sleeps until
SIGIO (sent by the kernel when the host opens the port) or a short fallback timeout.
"""

from __future__ import annotations

import base64
import fcntl
import os
import pty
import select
import signal
import struct
import subprocess
import termios
import threading
import time
from collections.abc import Callable

TYPE_CHECKING = False  # not `from typing`: importing typing costs ~35 ms at boot under TCG

if TYPE_CHECKING:
    from typing import Any

from . import clone, protocol, system
from .reaper import Exit, Reaper
from .signals import SignalDispatcher
from .supervisor import Identity, base_env


class CannotStart(Exception):
    """The request names a user or directory the guest does not have: nothing was run."""


class Connection:
    """Serialises writes to one port; tracks the streaming op that owns it, if any."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.lock = threading.Lock()
        self.active: StreamOp | None = None

    def send(self, msg: dict[str, Any], rid: Any = None) -> None:
        if rid is not None:
            msg = {**msg, "id": rid}
        data = protocol.encode(msg)
        with self.lock:
            try:
                protocol.write_all(self.fd, data)
            except OSError:
                pass


class StreamOp:
    """A running ``exec`` (optionally on a pty) that streams output back to the host."""

    def __init__(self, conn: Connection, req: dict[str, Any], server: ControlServer) -> None:
        self.conn = conn
        self.req = req
        self.rid = req.get("id")
        self.server = server
        self.child: Exit | None = None
        self.stdin_fd: int | None = None
        self.pty_master: int | None = None
        self.timed_out = False
        #: its host client is gone: its output and reply go nowhere (see ControlServer._dispatch)
        self.abandoned = False
        self.done = threading.Event()
        # Input can arrive before the process exists; it is held until then.
        self._input_lock = threading.Lock()
        self._started = False
        self._early: list[dict[str, Any]] = []

    def start(self) -> None:
        threading.Thread(target=self._run, name="exec", daemon=True).start()

    def _build(self) -> tuple[list[str], dict[str, Any]]:
        req = self.req
        argv = req.get("argv")
        if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
            raise ValueError("argv must be a non-empty list of strings")
        user = req.get("user") or "root"
        try:
            ident = Identity(user)
        except KeyError:
            raise CannotStart(f"no user {user!r} in the guest (not in its /etc/passwd)") from None
        env = base_env(ident, self.server.path)
        env.update(self.server.env_overrides)
        extra = req.get("env") or {}
        if not isinstance(extra, dict):
            raise ValueError("env must be an object")
        env.update({str(k): str(v) for k, v in extra.items()})
        if req.get("tty"):
            env.setdefault("TERM", str(req.get("term") or "xterm"))
        cwd = req.get("cwd") or ident.home
        if not os.path.isdir(cwd):
            raise CannotStart(f"no directory {cwd!r} in the guest to run in")
        kwargs: dict[str, Any] = {"env": env, "cwd": cwd, "start_new_session": True}
        kwargs.update(ident.popen_args())
        return argv, kwargs

    def _run(self) -> None:
        try:
            self._start_and_finish()
        finally:
            self.done.set()

    def _start_and_finish(self) -> None:
        try:
            argv, kwargs = self._build()
            if self.req.get("tty"):
                self._run_tty(argv, kwargs)
            else:
                self._run_pipes(argv, kwargs)
        except CannotStart as exc:  # as `docker exec`: 126, the command itself was not tried
            self.conn.active = None
            self.conn.send({"ok": False, "error": str(exc), "exit": 126}, self.rid)
        except (OSError, ValueError, KeyError, subprocess.SubprocessError) as exc:
            self.conn.active = None
            self.conn.send({"ok": False, "error": f"cannot run {self.req.get('argv')!r}: {exc}",
                            "exit": 127}, self.rid)

    def _pump(self, fd: int, name: str) -> None:
        while True:
            try:
                data = os.read(fd, 32768)
            except OSError:
                data = b""
            if not data:
                break
            if not self.abandoned:
                self.conn.send({"event": name, "data": base64.b64encode(data).decode()}, self.rid)
        os.close(fd)

    def _run_pipes(self, argv: list[str], kwargs: dict[str, Any]) -> None:
        r_out, w_out = os.pipe()
        r_err, w_err = os.pipe()
        r_in, w_in = os.pipe()
        try:
            self.child = self.server.reaper.spawn(
                argv, stdin=r_in, stdout=w_out, stderr=w_err, close_fds=True, **kwargs
            )
        finally:
            os.close(w_out)
            os.close(w_err)
            os.close(r_in)
        self.stdin_fd = w_in
        self._mark_started()
        pumps = [threading.Thread(target=self._pump, args=(r_out, "stdout"), daemon=True),
                 threading.Thread(target=self._pump, args=(r_err, "stderr"), daemon=True)]
        for p in pumps:
            p.start()
        self._finish(pumps)

    def _run_tty(self, argv: list[str], kwargs: dict[str, Any]) -> None:
        master, slave = pty.openpty()
        rows, cols = int(self.req.get("rows") or 24), int(self.req.get("cols") or 80)
        fcntl.ioctl(master, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))

        def make_controlling_tty() -> None:
            fcntl.ioctl(0, termios.TIOCSCTTY, 0)

        try:
            self.child = self.server.reaper.spawn(
                argv, stdin=slave, stdout=slave, stderr=slave, close_fds=True,
                preexec_fn=make_controlling_tty, **kwargs,
            )
        finally:
            os.close(slave)
        self.pty_master = master
        self.stdin_fd = os.dup(master)
        self._mark_started()
        pump = threading.Thread(target=self._pump, args=(master, "stdout"), daemon=True)
        pump.start()
        self._finish([pump])

    def _finish(self, pumps: list[threading.Thread]) -> None:
        assert self.child is not None
        timeout = self.req.get("timeout")
        code = self.child.wait(float(timeout) if timeout else None)
        if code is None:
            self.timed_out = True
            self.kill()
            code = self.child.wait(5)
        for p in pumps:
            p.join(2)
        self._close_stdin()
        self.conn.active = None
        if self.abandoned:
            return
        if self.timed_out:
            self.conn.send({"ok": False, "exit": 124, "timed_out": True,
                            "error": f"timed out after {float(timeout or 0):g}s; process killed"}, self.rid)
        else:
            self.conn.send({"ok": True, "exit": code}, self.rid)

    def _close_stdin(self) -> None:
        if self.stdin_fd is not None:
            try:
                os.close(self.stdin_fd)
            except OSError:
                pass
            self.stdin_fd = None

    def abandon(self) -> None:
        self.abandoned = True  # its host client went away: send nothing more of it
        self.kill()

    def kill(self) -> None:
        if self.child is not None and not self.child.done:
            try:
                os.killpg(self.child.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def _mark_started(self) -> None:
        if self.abandoned:  # abandoned while it was being started
            self.kill()
        with self._input_lock:
            self._started = True
            early, self._early = self._early, []
        for msg in early:
            self._apply(msg)

    def feed(self, msg: dict[str, Any]) -> None:
        with self._input_lock:
            if not self._started:
                self._early.append(msg)
                return
        self._apply(msg)

    def _apply(self, msg: dict[str, Any]) -> None:
        kind = msg.get("op")
        if kind == "stdin" and self.stdin_fd is not None:
            try:
                protocol.write_all(self.stdin_fd, base64.b64decode(msg.get("data") or ""))
            except OSError:
                pass
        elif kind == "eof":
            self._close_stdin()
        elif kind == "resize" and self.pty_master is not None:
            packed = struct.pack("HHHH", int(msg.get("rows", 24)), int(msg.get("cols", 80)), 0, 0)
            fcntl.ioctl(self.pty_master, termios.TIOCSWINSZ, packed)



def usage(services: dict[str, Any]) -> dict[str, Any]:
    """CPU seconds and resident memory of each service (its whole session: the service and
    everything it started) and of the guest, for ``mvmctl stats``."""
    tick = os.sysconf("SC_CLK_TCK")
    page = os.sysconf("SC_PAGE_SIZE")
    by_session: dict[int, list[float]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        session, cpu, rss = int(fields[3]), (int(fields[11]) + int(fields[12])) / tick, int(fields[21]) * page
        total = by_session.setdefault(session, [0.0, 0.0])
        total[0] += cpu
        total[1] += rss
    meminfo: dict[str, int] = {}
    with open("/proc/meminfo") as f:
        for line in f:
            key, value = line.split(":", 1)
            meminfo[key] = int(value.split()[0]) * 1024
    out: dict[str, Any] = {}
    for name, svc in services.items():
        pid = svc.get("pid")
        used = by_session.get(pid, [0.0, 0.0]) if pid else [0.0, 0.0]
        out[name] = {"pid": pid, "cpu_seconds": round(used[0], 3), "memory_bytes": int(used[1])}
    return {"services": out, "memory_total": meminfo.get("MemTotal"),
            "memory_available": meminfo.get("MemAvailable"), "clock": time.monotonic()}


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
        shutdown: Callable[[], None],
        configure: Callable[[dict[str, Any]], str | None],
        env_overrides: dict[str, str],
        path: str,
        signals: SignalDispatcher,
    ) -> None:
        self.signals = signals
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
        if conn.active is not None and op in protocol.STREAM_INPUT:
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
        if op == "ping":
            host_time = req.get("time")
            if isinstance(host_time, (int, float)) and abs(time.time() - host_time) > 0.05:
                # The RTC gives whole seconds at boot; the host's clock makes log times exact.
                try:
                    time.clock_settime(time.CLOCK_REALTIME, float(host_time))
                except OSError:
                    pass
            conn.send({"ok": True, "pong": time.time(), "version": protocol.PROTOCOL_VERSION}, rid)
        elif op == "status":
            extra: dict[str, Any] = {}
            if req.get("debug"):
                import sys
                import traceback

                extra["threads"] = {
                    str(tid): "".join(traceback.format_stack(frame))
                    for tid, frame in sys._current_frames().items()
                }
            conn.send({"ok": True, **self.status(), **extra}, rid)
        elif op in ("configure", "refresh"):
            # A restored clone becomes its own machine: fresh RNG, machine-id, hostname.
            try:
                clone.reseed(str(req.get("seed") or ""))
                clone.new_machine_id()
                if isinstance(req.get("hostname"), str) and req["hostname"]:
                    system.set_hostname(req["hostname"])
            except (OSError, ValueError) as exc:
                conn.send({"ok": False, "error": f"cannot make this clone unique: {exc}"}, rid)
                return
            error = self.configure(req.get("config") or {}) if op == "configure" else None
            conn.send({"ok": error is None, **({"error": error} if error else {})}, rid)
        elif op == "stats":
            conn.send({"ok": True, **usage(self.status().get("services") or {})}, rid)
        elif op == "shutdown":
            conn.send({"ok": True}, rid)
            threading.Thread(target=self.shutdown, name="shutdown", daemon=True).start()
        elif op in ("exec", "console", "copy"):
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
                req = {"id": rid, "argv": [sys.executable, "-I", "-c", COPY_ENTRY, agent_root, *args],
                       "user": "root"}
            stream = StreamOp(conn, req, self)
            conn.active = stream
            stream.start()
