"""mvmctl console."""

from __future__ import annotations

import base64
import os
import select
import shutil
import signal
import sys
import termios
import tty
from typing import Annotated, Any

import typer

from ..options import VMName


def console(
    name: VMName,
    user: Annotated[str | None, typer.Option("--user", "-u", help="Log in as this guest user (default root).",
                                             show_default=False)] = None,
) -> None:
    """Open an interactive shell in a running VM over the agent channel (no SSH, no network).

    The shell runs on a pseudo-terminal in the guest; window resizes are passed through.
    Leave with Ctrl-D or `exit`.
    """
    import mvm

    vm = mvm.get(name)
    vm.agent_status()  # fails clearly if the VM is not running
    raise typer.Exit(run_console(vm, user=user))


def run_console(vm: Any, *, user: str | None = None, cwd: str | None = None,
                env: dict[str, str] | None = None) -> int:
    """Drive a shell on a guest pty from this terminal until it exits; return its exit code."""
    from mvm.runtime.agent import AgentSession

    cols, rows = shutil.get_terminal_size()
    session = AgentSession(vm.files, vm.name)
    session.open()
    code = 1
    stdin_fd = sys.stdin.fileno()
    saved = termios.tcgetattr(stdin_fd) if os.isatty(stdin_fd) else None

    def on_resize(*_: Any) -> None:
        c, r = shutil.get_terminal_size()
        session.send_input("resize", rows=r, cols=c)

    try:
        if saved is not None:
            tty.setraw(stdin_fd)
        signal.signal(signal.SIGWINCH, on_resize)
        session.start("console", user=user, rows=rows, cols=cols, term=os.environ.get("TERM", "xterm"),
                      cwd=cwd, env=env or {})
        sock = session.fileno()
        stdin_open = True
        pending = session.pending()
        while True:
            for msg in pending:
                if "event" in msg:
                    os.write(sys.stdout.fileno(), base64.b64decode(msg.get("data") or ""))
                else:
                    code = int(msg.get("exit", 1))
                    return code
            watch = [sock] + ([stdin_fd] if stdin_open else [])
            ready, _, _ = select.select(watch, [], [])
            if stdin_fd in ready:
                data = os.read(stdin_fd, 4096)
                if data:
                    session.send_stdin(data)
                else:
                    stdin_open = False
                    session.send_input("eof")
            pending = session.pending(block=sock in ready)
    finally:
        signal.signal(signal.SIGWINCH, signal.SIG_DFL)
        if saved is not None:
            termios.tcsetattr(stdin_fd, termios.TCSADRAIN, saved)
        session.close()


def register(app: typer.Typer) -> None:
    app.command()(console)
