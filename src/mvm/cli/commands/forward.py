"""mvmctl forward."""

from __future__ import annotations

import typer

from ..options import Json, Ports, VMName


def forward(name: VMName, port: Ports = None, json: Json = False) -> None:
    """Add port forwards to a running VM (recorded, and shown by `mvmctl ls`).

    [bold]Example[/]
      mvmctl forward hello -p 9090:9090
    """
    import mvm

    from .. import output

    if not port:
        raise mvm.UsageError("give at least one -p HOST:GUEST", hint="e.g. mvmctl forward NAME -p 9090:9090")
    vm = mvm.get(name)
    added = [vm.forward(p) for p in port]
    if json:
        output.print_json(added)
        return
    for f in added:
        output.out.print(f"{f.host_ip}:{f.host_port} -> guest {f.guest_port}/{f.proto}")


def register(app: typer.Typer) -> None:
    app.command()(forward)
