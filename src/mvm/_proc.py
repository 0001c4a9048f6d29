"""The one way mvm runs host processes.

Every child process (mmdebstrap, mkfs.ext4, nix, qemu) goes through a :class:`Runner`, so
logic above it can be unit-tested with a fake, and so every failure carries the same
things: a human description of the step, the full argv, the exit code and the output tail.
Nothing here ever goes through a shell: argv lists only. A missing tool is a
:class:`~mvm.errors.ToolMissing` that says how to install it (:data:`INSTALL_HINTS`).

Besides: long-lived children (QEMU, its log shim, virtiofsd) started detached by
:meth:`Runner.spawn`, optionally as another user; :func:`interactive` for a child on our
terminal. Process identity (a recorded pid is only ours while its start time matches) is
:mod:`mvm._pids`'s job; running the tools that parse guest-written images unprivileged is
:mod:`mvm._confine`'s.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import signal
import subprocess
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Protocol

from . import _pids
from ._untrusted import printable
from .errors import CommandFailed, DiskFull, MvmError, ToolMissing

log = logging.getLogger(__name__)

#: How to install each external tool mvm may need, keyed by executable name.
INSTALL_HINTS: dict[str, str] = {
    "qemu-system-x86_64": "apt-get install qemu-system-x86",
    "qemu-system-aarch64": "apt-get install qemu-system-arm",
    "arch-test": "apt-get install arch-test qemu-user-static binfmt-support",
    "qemu-img": "apt-get install qemu-utils",
    "mmdebstrap": "apt-get install mmdebstrap",
    "mkfs.ext4": "apt-get install e2fsprogs",
    "resize2fs": "apt-get install e2fsprogs",
    "e2fsck": "apt-get install e2fsprogs",
    "debugfs": "apt-get install e2fsprogs",
    "dumpe2fs": "apt-get install e2fsprogs",
    "busybox": "apt-get install busybox-static",
    "apt-get": "run mvm on Debian or Ubuntu, or use the Nix front end (--flake)",
    "dpkg-deb": "apt-get install dpkg",
    "depmod": "apt-get install kmod",
    "lz4": "apt-get install lz4",
    "zstd": "apt-get install zstd",
    "lzop": "apt-get install lzop",
    "nix": "see https://nixos.org/download (Debian/Ubuntu: apt-get install nix-bin), or use "
    "`mvmctl dev`, which gives you a shell with nix in a microVM",
    "virtiofsd": "apt-get install qemu-system-common (Debian 12) or virtiofsd",
    "unshare": "apt-get install util-linux",
    "setpriv": "apt-get install util-linux",
}

OUTPUT_TAIL_LINES = 40
#: What a child says when it runs out of disk space; the error then says so, with a hint.
DISK_FULL = ("No space left on device", "Disk quota exceeded")


@dataclass
class Completed:
    argv: list[str]
    returncode: int
    output: str


def find_tool(name: str) -> str | None:
    """Absolute path of ``name``: on PATH, or in sbin (mkfs.ext4 and friends live there,
    and sbin is not on every user's PATH)."""
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")


def require_tool(name: str) -> str:
    """Absolute path of ``name``, or a ToolMissing that says how to install it."""
    found = find_tool(name)
    if not found:
        hint = INSTALL_HINTS.get(name)
        raise ToolMissing(
            f"`{name}` is not installed or not on PATH",
            hint=f"install it: {hint}" if hint else None,
        )
    return found


def start_failed(args: Sequence[str], exc: OSError, cwd: Path | None, user: RunAs | None = None) -> MvmError:
    """Why a child did not start, as an mvm error: its directory missing or unreadable; the
    program gone (with how to install it) or not runnable by the user it runs as; or what
    the kernel said (too many open files, arguments too long)."""
    name = os.path.basename(args[0])
    if cwd is not None and exc.filename is not None and os.fspath(exc.filename) == os.fspath(cwd):
        return MvmError(f"cannot run {name} in {cwd}: {exc.strerror}",
                        hint="the directory must exist and be readable by the user mvm runs it as")
    if exc.errno == errno.ENOENT:
        hint = INSTALL_HINTS.get(name)
        return ToolMissing(f"`{args[0]}` could not be started: {exc.strerror}",
                           hint=f"reinstall it: {hint}" if hint else "is it installed, and its interpreter too?")
    if exc.errno in (errno.EACCES, errno.ENOEXEC):
        who = f"uid {user.uid}" if user is not None else "this user"
        return MvmError(f"`{args[0]}` could not be started: {exc.strerror}",
                        hint=f"it must be an executable program that {who} may read and run")
    return MvmError(f"`{args[0]}` could not be started: {exc.strerror}")


@dataclass(frozen=True)
class RunAs:
    """The user a spawned child runs as (set before it runs, so it never holds root)."""

    uid: int
    gid: int
    groups: tuple[int, ...] = ()


class Runner(Protocol):
    def run(
        self,
        argv: Sequence[str | os.PathLike[str]],
        *,
        desc: str,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        on_line: Callable[[str], None] | None = None,
        error: type[CommandFailed] = CommandFailed,
        hint: str | None = None,
        ok_codes: Sequence[int] = (0,),
    ) -> Completed: ...

    def spawn(
        self,
        argv: Sequence[str | os.PathLike[str]],
        *,
        stdout: IO[bytes] | int,
        cwd: Path | None = None,
        env: Mapping[str, str] | None = None,
        pass_fds: Sequence[int] = (),
        user: RunAs | None = None,
    ) -> subprocess.Popen[bytes]: ...


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stop_gracefully(proc: subprocess.Popen[bytes], grace: float = 15.0) -> None:
    """SIGTERM the child's whole process group, give it ``grace`` seconds to clean up
    (mmdebstrap unmounts and deletes its chroot), then SIGKILL whatever is left of it."""
    pgid = proc.pid  # children are started as process-group leaders
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            pass
    deadline = time.monotonic() + 5.0
    while _group_alive(pgid) and time.monotonic() < deadline:
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)
    proc.wait()


class SubprocessRunner:
    """Runs children with stderr merged into stdout; keeps the tail for the error."""

    def run(
        self,
        argv: Sequence[str | os.PathLike[str]],
        *,
        desc: str,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        on_line: Callable[[str], None] | None = None,
        error: type[CommandFailed] = CommandFailed,
        hint: str | None = None,
        ok_codes: Sequence[int] = (0,),
    ) -> Completed:
        args = [os.fspath(a) for a in argv]
        args[0] = require_tool(args[0]) if "/" not in args[0] else args[0]
        log.debug("run (%s): %s", desc, args)
        full_env = None if env is None else {**os.environ, **env}
        try:
            proc = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                cwd=cwd,
                env=full_env,
                process_group=0,  # so an interrupt can stop the child and all it started
            )
        except OSError as exc:
            raise start_failed(args, exc, cwd) from exc
        lines: list[str] = []
        tail: deque[str] = deque(maxlen=OUTPUT_TAIL_LINES)
        try:
            assert proc.stdout is not None
            for raw_b in proc.stdout:
                raw = raw_b.decode(errors="replace").rstrip("\n")
                lines.append(raw)
                tail.append(raw)
                if on_line:
                    on_line(raw)
            proc.wait()
        except BaseException:
            # Ctrl-C / SIGTERM: let the child clean up after itself (mmdebstrap unmounts its
            # chroot and removes its temp dir on SIGTERM), then make sure it is gone.
            stop_gracefully(proc)
            raise
        finally:
            if proc.stdout is not None:
                proc.stdout.close()
        if proc.returncode not in ok_codes:
            full = next((m for m in DISK_FULL if any(m in line for line in lines)), None)
            raise error(
                f"{desc} failed (exit code {proc.returncode})" + (f": a disk is full ({full})" if full else ""),
                argv=args,
                returncode=proc.returncode,
                output="\n".join(tail),
                hint=DiskFull.HINT if full else hint,
            )
        return Completed(args, proc.returncode, "\n".join(lines))

    def spawn(
        self,
        argv: Sequence[str | os.PathLike[str]],
        *,
        stdout: IO[bytes] | int,
        cwd: Path | None = None,
        env: Mapping[str, str] | None = None,
        pass_fds: Sequence[int] = (),
        user: RunAs | None = None,
    ) -> subprocess.Popen[bytes]:
        """Start a long-lived child in its own session, detached from our terminal, as
        ``user`` if given (its cwd is entered before it changes user).

        ``pass_fds`` are inherited by the child (every other descriptor is closed).
        """
        _pids.reap_detached()  # as subprocess does for its own on each Popen
        args = [os.fspath(a) for a in argv]
        args[0] = require_tool(args[0]) if "/" not in args[0] else args[0]
        log.debug("spawn: %s", args)
        try:
            return self._popen_detached(args, stdout=stdout, cwd=cwd, env=env, pass_fds=pass_fds, user=user)
        except OSError as exc:
            raise start_failed(args, exc, cwd, user) from exc

    @staticmethod
    def _popen_detached(args: list[str], *, stdout: IO[bytes] | int, cwd: Path | None,
                        env: Mapping[str, str] | None, pass_fds: Sequence[int],
                        user: RunAs | None) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            env=None if env is None else {**os.environ, **env},
            start_new_session=True,
            umask=0o077,  # sockets, logs and pid files it creates are private to the user
            pass_fds=tuple(pass_fds),
            user=None if user is None else user.uid,
            group=None if user is None else user.gid,
            extra_groups=None if user is None else list(user.groups),
        )


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold SIGINT and SIGTERM until the block ends, then act on them.

    For starting a child and arming its undo as one step: an interrupt that lands inside
    ``Popen`` (after the fork, before it returns) would otherwise leave a running child that
    no undo knows about. Only the main thread handles signals; elsewhere this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []

    def hold(sig: int, frame: object) -> None:
        pending.append(sig)

    wanted = (signal.SIGINT, signal.SIGTERM)
    previous = {sig: signal.signal(sig, hold) for sig in wanted}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if pending:
            signal.raise_signal(pending[0])  # its own handler runs now (Ctrl-C raises here)


def interactive(argv: Sequence[str], *, cwd: Path | None = None, env: Mapping[str, str] | None = None) -> int:
    """Run a child on our terminal (stdin, stdout and stderr inherited); return its exit code.

    For shells and commands a user drives (``mvmctl dev``); everything else goes through a
    :class:`Runner`, which captures output.
    """
    args = list(argv)
    args[0] = require_tool(args[0]) if "/" not in args[0] else args[0]
    log.debug("interactive: %s", args)
    try:
        return subprocess.call(args, cwd=cwd, env=None if env is None else dict(env))
    except OSError as exc:
        raise start_failed(args, exc, cwd) from exc


def tail_file(path: Path, lines: int = 30) -> str:
    """The last ``lines`` lines of a child's log file (QEMU's log, a console), for errors."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 16384))
            data = f.read()
    except OSError:
        return ""
    return printable("\n".join(data.decode(errors="replace").splitlines()[-lines:]), 16384, newlines=True)


DEFAULT_RUNNER: Runner = SubprocessRunner()
