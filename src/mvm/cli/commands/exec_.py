"""mvmctl exec."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from typing import Annotated

import typer

from ..options import ExecEnv, VMName


def _stdin_chunks() -> Iterator[bytes]:
    while chunk := os.read(sys.stdin.fileno(), 65536):
        yield chunk


def exec_(
    name: VMName,
    command: Annotated[list[str], typer.Argument(metavar="COMMAND", help="The command and its arguments (after --).",
                                                 show_default=False)],
    user: Annotated[str | None, typer.Option("--user", "-u", metavar="USER",
                                             help="Run as this guest user, by name or uid (default root).",
                                             show_default=False)] = None,
    env: ExecEnv = None,
    workdir: Annotated[str | None, typer.Option("--workdir", "-w", metavar="DIR",
                                                help="Working directory in the guest.",
                                                show_default=False)] = None,
    timeout: Annotated[float | None, typer.Option("--timeout", metavar="SECONDS", min=0,
                                                  help="Kill the command after this many "
                                                  "seconds (exit code 124); 0 or unset: no limit.",
                                                  show_default=False)] = None,
    interactive: Annotated[bool, typer.Option("--interactive", "-i", help="Send this command's stdin to "
                                              "the guest command.")] = False,
) -> None:
    """Run a command inside a running VM and pass its exit code through.

    The argv is sent as a list (no shell on the host or in the guest); use `sh -c '...'`
    for shell syntax. stdout and stderr are streamed as they are produced. Without -i the
    command's stdin is empty (it reads end of input at once). There is no terminal (no -t):
    for an interactive shell use `mvmctl console NAME`.

    Exit code: the command's own, as a shell reports it: 127 if the program is not found,
    126 if it cannot be run (not executable, another architecture's) or the --user or the -w
    DIR does not exist in the guest, 128+N if signal N killed it, 124 if --timeout ended it
    (SIGTERM to its process group, SIGKILL 2 s later if it still runs).

    
    Examples:
      mvmctl exec hello -- uname -a
      mvmctl exec hello --user mvm -e DEBUG=1 -- sh -c 'echo $DEBUG; id'
      echo hi | mvmctl exec hello -i -- cat
    """
    import mvm

    from ..output import write_stream

    vm = mvm.get(name)
    result = vm.exec(command, user=user, env=env or [], cwd=workdir,
                     timeout=timeout or None,  # 0: no limit, as for timeout(1)
                     stdin=_stdin_chunks() if interactive else None, on_output=write_stream)
    raise typer.Exit(result.exit_code)


def register(app: typer.Typer) -> None:
    app.command("exec")(exec_)
