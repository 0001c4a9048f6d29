"""mvmctl logs."""

from __future__ import annotations

from typing import Annotated

import typer

from ..options import VMName


def logs(
    name: VMName,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing new lines until the VM stops "
                                         "(or Ctrl-C).")] = False,
    lines: Annotated[int | None, typer.Option("-n", "--lines", help="Show only the last N lines of each "
                                              "part.", show_default=False)] = None,
    console: Annotated[bool, typer.Option("--console/--no-console", help="Include the kernel/boot console.")] = True,
    services: Annotated[bool, typer.Option("--services/--no-services", help="Include service output, "
                                           "service state changes and health transitions.")] = True,
) -> None:
    """Show a VM's boot console and its services' logs (stdout/stderr, restarts, health).

    Logs are files in the VM's runtime dir, so they can be read after the VM crashed.
    """
    import mvm

    from .. import output

    for line in mvm.get(name).logs(follow=follow, lines=lines, console=console, services=services):
        output.out.print(line.text, markup=False, highlight=False)


def register(app: typer.Typer) -> None:
    app.command()(logs)
