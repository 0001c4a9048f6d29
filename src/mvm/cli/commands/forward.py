"""mvmctl forward."""

from __future__ import annotations

from typing import Annotated

import typer

from ..options import Json, Ports, VMName, missing


def forward(
    name: VMName,
    port: Ports = None,
    rm: Annotated[bool, typer.Option("--rm", help="Remove these forwards instead of adding them.")] = False,
    json: Json = False,
) -> None:
    """Add port forwards to a running VM, or remove them with --rm (recorded, and shown by
    `mvmctl ls`). `-p GUEST` alone picks a free host port and prints it; with --rm it removes
    the forward to that guest port. A suspended VM's forwards are changed in its record and
    opened by `mvmctl resume` (a host port taken meanwhile can be moved so); adding one
    names its host port.

    \b
    Examples:
      mvmctl forward hello -p 9090:9090
      mvmctl forward hello -p 8080          # prints the host port it picked
      mvmctl forward hello --rm -p 9090:9090
      mvmctl forward hello --rm -p 8080     # whichever host port it got
    """
    import mvm

    from .. import output

    if not port:
        raise missing("give at least one -p HOST:GUEST (e.g. mvmctl forward NAME -p 9090:9090)")
    vm = mvm.get(name)
    changed = [vm.unforward(p) if rm else vm.forward(p) for p in port]
    if json:
        output.print_json(changed)
        return
    for f in changed:
        output.out.print(("removed " if rm else "") + f"{f.host_ip}:{f.host_port} -> guest {f.guest_port}/{f.proto}")


def register(app: typer.Typer) -> None:
    app.command()(forward)
