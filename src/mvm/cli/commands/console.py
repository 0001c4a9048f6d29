"""mvmctl console."""

from __future__ import annotations

import os
import shutil
import signal
import sys
import termios
import tty
from typing import TYPE_CHECKING, Annotated, Any

import typer

from ..options import VMName

if TYPE_CHECKING:
    from mvm import ConsoleSession


def console(
    name: VMName,
    user: Annotated[str | None, typer.Option("--user", "-u", metavar="USER",
                                             help="Log in as this guest user (default root).",
                                             show_default=False)] = None,
) -> None:
    """Open an interactive shell in a running VM over the agent channel (no SSH, no network).

    The shell runs on a pseudo-terminal in the guest; window resizes are passed through.
    Leave with Ctrl-D or `exit`. With input that is not a terminal (`mvmctl console web <
    script.sh`), the shell reads it as a script, without a terminal, and ends with it.
    """
    import mvm

    raise typer.Exit(run_on_terminal(mvm.get(name).console(user=user)))


def run_on_terminal(session: ConsoleSession) -> int:
    """Put this terminal in raw mode, pass resizes on, and run ``session`` until its shell exits."""
    cols, rows = shutil.get_terminal_size()
    stdin_fd = sys.stdin.fileno()
    saved = termios.tcgetattr(stdin_fd) if os.isatty(stdin_fd) else None

    def on_resize(*_: Any) -> None:
        session.resize(*shutil.get_terminal_size())

    try:
        if saved is not None:
            tty.setraw(stdin_fd, termios.TCSANOW)  # not the default TCSAFLUSH: what was typed ahead is kept
        signal.signal(signal.SIGWINCH, on_resize)
        return session.run(stdin_fd, sys.stdout.fileno(), cols=cols, rows=rows,
                           term=os.environ.get("TERM", "xterm"))
    finally:
        signal.signal(signal.SIGWINCH, signal.SIG_DFL)
        if saved is not None:
            try:
                termios.tcsetattr(stdin_fd, termios.TCSADRAIN, saved)
            except termios.error:  # the terminal hung up (SIGHUP): nothing to give its settings back to
                pass


def register(app: typer.Typer) -> None:
    app.command()(console)
