"""mvmctl dev."""

from __future__ import annotations

from typing import Annotated

import typer

from ..options import Memory


def dev(
    command: Annotated[list[str] | None, typer.Argument(
        metavar="COMMAND",
        help="Run this command (after --) instead of an interactive shell; its exit code is passed through.",
        show_default=False)] = None,
    directory: Annotated[str, typer.Option("--dir", "-C", metavar="DIR", help="The project directory.")] = ".",
    vm: Annotated[bool, typer.Option("--vm", help="Use the dev microVM even when nix is installed here.")] = False,
    cpus: Annotated[int | None, typer.Option("--cpus", metavar="N", help="vCPUs of the dev VM (default 1).",
                                             show_default=False)] = None,
    memory: Annotated[int | None, Memory("1024; /nix is a tmpfs in the dev VM")] = None,
) -> None:
    """A shell where `nix` works (flakes enabled), in your project directory.

    With nix on this machine: your $SHELL here, with flakes switched on through NIX_CONFIG.
    Without it (or with --vm): a dev microVM with Debian's nix, your project directory
    shared read-write at /project, and a throwaway /nix. The VM stops when the shell exits.

    
    Examples:
      mvmctl dev
      mvmctl dev -- nix flake show
      mvmctl dev --vm -- nix eval .#packages.x86_64-linux.default.name
    """
    import mvm

    from .. import output

    devlib = mvm.dev
    project = devlib.project_dir(directory)
    if devlib.choose_mode(vm) == "host":
        if not command:
            output.info(f"mvm dev: nix with flakes, in {project} (exit to leave)")
        if devlib.builds_as_root():
            output.info("[yellow]note[/]: nix has no build users here (no nixbld group), so in this shell it "
                        "builds as root (build-users-group =); `apt-get install nix-setup-systemd` adds them")
        raise typer.Exit(devlib.run_on_host(project, command))

    with output.progress("dev VM") as prog:
        session = devlib.boot_vm(project, memory=memory, cpus=cpus, progress=prog)
    with session:
        if command:
            code = session.vm.exec(command, cwd=session.cwd, env=session.env,
                                   on_output=output.write_stream).exit_code
        else:
            from .console import run_on_terminal

            output.info(f"mvm dev VM {session.vm.name}: {project} is at {session.cwd}, nix has flakes on; "
                        "exit to stop the VM")
            code = run_on_terminal(session.vm.console(cwd=session.cwd, env=session.env))
    raise typer.Exit(code)


def register(app: typer.Typer) -> None:
    app.command()(dev)
