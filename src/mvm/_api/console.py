"""An interactive shell on a guest pty over the agent channel: the library half of
``mvmctl console`` (the terminal's raw mode and window-size signals are the CLI's half)."""

from __future__ import annotations

import os
import select

from ..paths import VMFiles
from ..runtime.agent import AgentSession, Final


class ConsoleSession:
    """Pumps bytes between two descriptors and a guest shell until the shell exits."""

    def __init__(self, files: VMFiles, vm: str, *, user: str | None, cwd: str | None,
                 env: dict[str, str]) -> None:
        self._session = AgentSession(files, vm)
        self.user, self.cwd, self.env = user, cwd, env
        self._started = False

    def resize(self, cols: int, rows: int) -> None:
        """Pass a terminal resize on (safe to call from a SIGWINCH handler)."""
        if self._started:
            self._session.send_input("resize", rows=rows, cols=cols)

    def run(self, stdin_fd: int, stdout_fd: int, *, cols: int = 80, rows: int = 24,
            term: str = "xterm") -> int:
        """Run the shell with ``stdin_fd`` as its input and ``stdout_fd`` as its output;
        return its exit code. On a pseudo-terminal in the guest when ``stdin_fd`` is a
        terminal; otherwise (a script piped in) on pipes, as ssh does, so that the end of
        the input ends the shell."""
        session = self._session
        session.open()
        try:
            session.start("console", user=self.user, rows=rows, cols=cols, term=term, cwd=self.cwd,
                          env=self.env, tty=os.isatty(stdin_fd))
            self._started = True
            sock = session.fileno()
            stdin_open = True
            pending = session.pending()
            while True:
                for msg in pending:
                    if isinstance(msg, Final):
                        if not msg.ok and msg.error:  # not started (no such user), or refused
                            os.write(2, f"mvm console: {msg.error}\r\n".encode())
                        return msg.exit
                    os.write(stdout_fd, msg.data)
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
            self._started = False
            session.close()
