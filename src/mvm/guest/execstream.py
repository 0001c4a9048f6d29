"""A command the host runs in the guest (``exec``, ``console``, ``copy``), streamed over one
control port: its output as events, its input fed as it comes, its exit code as the reply.

A :class:`Connection` is one port; the :class:`StreamOp` running on it owns the port until
its command ends (:mod:`.control` decides what a request meanwhile means).
"""

from __future__ import annotations

import base64
import errno
import fcntl
import os
import pty
import queue
import select
import signal
import struct
import subprocess
import termios
import threading

TYPE_CHECKING = False  # not `from typing`: importing typing costs ~35 ms at boot under TCG

if TYPE_CHECKING:
    from typing import Any

    from .control import ControlServer

from . import protocol
from .reaper import Exit
from .supervisor import Identity, base_env, signal_group

#: Input messages (each at most a host read, 64 KiB) waiting for the command to read them:
#: the bound is what holds the host back, through the port, from a command that reads slowly.
INPUT_QUEUE = 32
#: How often a wait for the command to take input looks whether it, or its client, is gone.
INPUT_POLL = 0.25
#: Seconds a command ended by its timeout or by its client going away has to exit on SIGTERM.
KILL_GRACE = 2.0


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
        self.pty_master: int | None = None
        self.timed_out = False
        #: its host client is gone: its output and reply go nowhere (see ControlServer._dispatch)
        self.abandoned = False
        self.done = threading.Event()
        # Input, in arrival order, for the one thread that writes it (see :meth:`feed`). It
        # can arrive before the process exists: it waits here until then.
        self._input: queue.Queue[dict[str, Any]] = queue.Queue(INPUT_QUEUE)
        self._input_over = threading.Event()  # the command ended: the writer stops
        self._output_over = threading.Event()  # and, its reply sent, its output pumps
        self._writer: threading.Thread | None = None
        self._kill_lock = threading.Lock()
        self._killing = False

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
        except Exception as exc:  # a bug here must not leave the port held by a dead op
            self.kill()
            self._end_input()
            self.conn.active = None
            self.conn.send({"ok": False, "error": f"the guest agent failed running this: {exc!r}", "exit": 127},
                           self.rid)
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
            why, code = self._why_not(exc)
            self.conn.send({"ok": False, "error": why, "exit": code}, self.rid)

    def _why_not(self, exc: BaseException) -> tuple[str, int]:
        """Why the program did not start, and the exit code, in a shell's words: 127 for one
        that is not there, 126 for one that is there and cannot be run."""
        argv = self.req.get("argv")
        program = argv[0] if isinstance(argv, list) and argv and isinstance(argv[0], str) else None
        if program and getattr(exc, "filename", None) == program:
            if isinstance(exc, FileNotFoundError):
                where = "no such file" if "/" in program else "not on the guest's PATH"
                return f"{program}: command not found ({where}; is its package in the spec's packages?)", 127
            if isinstance(exc, PermissionError):
                return f"{program}: permission denied (is it executable, and readable by the user?)", 126
            if getattr(exc, "errno", None) == errno.ENOEXEC:
                return (f"{program}: cannot execute: not a program for this guest (a script needs a #! line; "
                        "a binary, the guest's architecture)", 126)
        return f"cannot run {argv!r}: {exc}", 127

    def _pump(self, fd: int, name: str) -> None:
        while True:
            try:
                data = os.read(fd, 32768)
            except BlockingIOError:  # a pty's master: non-blocking for the input writer's sake
                _wait(fd, select.POLLIN, None)
                continue
            except OSError:
                data = b""
            if not data or self._output_over.is_set():
                # Ended, or its reply sent: a process it left in the background (`sh -c 'x &'`)
                # that still writes gets EPIPE now, as after an ssh session; its output used to
                # go on, under this op's id, to every later client of the port.
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
        except BaseException:  # not started: PID 1 must not keep the other ends (15 fds per 5 tries)
            for fd in (r_out, r_err, w_in):
                os.close(fd)
            raise
        finally:
            os.close(w_out)
            os.close(w_err)
            os.close(r_in)
        pumps = [threading.Thread(target=self._pump, args=(r_out, "stdout"), daemon=True),
                 threading.Thread(target=self._pump, args=(r_err, "stderr"), daemon=True)]
        for p in pumps:  # before the held input goes in: a command that echoes it must not block
            p.start()
        self._start_input(w_in)
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
        pump = threading.Thread(target=self._pump, args=(master, "stdout"), daemon=True)
        pump.start()  # before the held input, as for pipes
        self._start_input(os.dup(master))
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
        self._output_over.set()
        self._end_input()
        self.conn.active = None
        if self.abandoned:
            return
        if self.timed_out:
            self.conn.send({"ok": False, "exit": 124, "timed_out": True,
                            "error": f"timed out after {float(timeout or 0):g}s; process ended"}, self.rid)
        else:
            self.conn.send({"ok": True, "exit": code}, self.rid)

    def abandon(self) -> None:
        self.abandoned = True  # its host client went away: send nothing more of it
        self.kill()

    def kill(self) -> None:
        """End the command: SIGTERM to its process group, SIGKILL :data:`KILL_GRACE` s later if
        it still runs (so that a `cp` cut short removes its hidden partial file, and any
        command may clean up, as `timeout` and `docker stop` allow)."""
        child = self.child
        with self._kill_lock:
            if child is None or child.done or self._killing:
                return  # once: a second SIGTERM means "quit now, skip the clean-up" to many programs
            self._killing = True
        signal_group(child.pid, signal.SIGTERM)

        def kill_now() -> None:  # the whole group, even if its leader has gone (a member may ignore SIGTERM)
            signal_group(child.pid, signal.SIGKILL)

        timer = threading.Timer(KILL_GRACE, kill_now)
        timer.daemon = True
        timer.start()

    def _start_input(self, fd: int) -> None:
        """Start writing input to the command's ``fd`` (which the writer then owns, and closes)."""
        if self.abandoned:  # abandoned while it was being started
            self.kill()
        os.set_blocking(fd, False)
        self._writer = threading.Thread(target=self._write_input, args=(fd,), name="exec-input", daemon=True)
        self._writer.start()

    def _end_input(self) -> None:
        """The command ended: its writer stops (dropping input it did not take) and closes its input."""
        self._input_over.set()
        try:
            self._input.put_nowait({"op": "over"})  # wakes a writer waiting for input
        except queue.Full:
            pass  # it is writing: it sees the end within INPUT_POLL
        if self._writer is not None:
            self._writer.join(2 * INPUT_POLL + 1)

    def feed(self, msg: dict[str, Any]) -> None:
        """Queue input for the command (called by the port's reader, in arrival order).

        A full queue holds the reader, and so the host, back. It used to write here itself: a
        command that never read its input (`exec -i VM -- sleep 100 < big`) held the reader in
        that write for good, its port dead, `--timeout` never firing. Now the reader waits only
        while the command runs and its client is there: input for an ended command is dropped,
        and a client gone (the port hung up) ends the command, as it would if the reader saw it.
        """
        while not (self.done.is_set() or self._input_over.is_set() or self.abandoned):
            try:
                self._input.put(msg, timeout=INPUT_POLL)
                return
            except queue.Full:
                if self._client_gone():
                    self.abandon()
                    return

    def _client_gone(self) -> bool:
        hung_up = select.poll()
        hung_up.register(self.conn.fd, select.POLLHUP)
        return any(mask & select.POLLHUP for _, mask in hung_up.poll(0))

    def _write_input(self, fd: int) -> None:
        """The writer: applies queued input in order until the command ends; closes ``fd``.
        Only this thread writes to or closes ``fd`` (closing it under a write would let the
        number be reused, and the rest of the input go to another file)."""
        is_open = True  # until end of input, or the command closes its side: the rest is dropped
        try:
            while not self._input_over.is_set():
                msg = self._input.get()
                kind = msg.get("op")
                try:
                    if kind == "stdin" and is_open:
                        is_open = self._write(fd, base64.b64decode(msg.get("data") or "", validate=True))
                    elif kind == "eof" and is_open:
                        is_open = False
                        os.close(fd)
                    elif kind == "resize" and is_open and self.pty_master is not None:
                        # through the writer's own descriptor (a dup of the master): the pump
                        # closes the master itself when the terminal's other side goes
                        packed = struct.pack("HHHH", int(msg.get("rows", 24)), int(msg.get("cols", 80)), 0, 0)
                        fcntl.ioctl(fd, termios.TIOCSWINSZ, packed)
                except (ValueError, TypeError, struct.error, OSError):
                    continue  # a malformed message (bad base64, a size out of range) is dropped, not the writer
        finally:
            if is_open:
                os.close(fd)

    def _write(self, fd: int, data: bytes) -> bool:
        """Write ``data`` as the command takes it, until it ends; False if its input is closed
        (then ``fd`` is closed too)."""
        view = memoryview(data)
        while view and not self._input_over.is_set():
            try:
                view = view[os.write(fd, view):]
            except BlockingIOError:
                _wait(fd, select.POLLOUT, INPUT_POLL)
            except OSError:  # EPIPE: no reader; EIO: the pty's other side is closed
                os.close(fd)
                return False
        return True


def _wait(fd: int, events: int, timeout: float | None) -> None:
    """Until ``fd`` is ready for ``events`` (or hung up), or ``timeout`` seconds pass."""
    poller = select.poll()
    poller.register(fd, events)
    poller.poll(None if timeout is None else timeout * 1000)
