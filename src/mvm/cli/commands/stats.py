"""mvmctl stats."""

from __future__ import annotations

from typing import Annotated

import typer

from ..options import Json


def stats(
    names: Annotated[list[str] | None, typer.Argument(metavar="NAME", help="VMs to show (default: every "
                                                      "running VM).", show_default=False)] = None,
    interval: Annotated[float, typer.Option("--interval", metavar="SECONDS", min=0.1,
                                            help="How long CPU use is measured over.")] = 1.0,
    json: Json = False,
) -> None:
    """Show what running VMs use: CPU (% of one host core) and memory of each VM's QEMU
    process on the host, the guest's own memory use, and each service's CPU and memory
    inside the guest (a service counts with every process it started). Prints once, as
    `docker stats --no-stream` does; `watch mvmctl stats` repeats it.

    \b
    Examples:
      mvmctl stats
      mvmctl stats hello --json
    """
    import mvm

    from .. import output
    from ..output import Column

    rows = mvm.stats(names or None, interval=interval)
    if json:
        output.print_json(rows)
        return

    flat: list[tuple[str, str, str, str]] = []
    for vm in rows:
        guest = f"{output.human_bytes(vm.guest_memory_used)} / {output.human_bytes(vm.guest_memory_total)}"
        flat.append((vm.name, f"{vm.cpu_percent:.1f}%", output.human_bytes(vm.memory_bytes), guest))
        for svc in vm.services:
            flat.append((f"  {svc.name}", f"{svc.cpu_percent:.1f}%", "", output.human_bytes(svc.memory_bytes)))
    columns: list[Column[tuple[str, str, str, str]]] = [
        Column("NAME", lambda r: r[0]),
        Column("CPU", lambda r: r[1], justify="right"),
        Column("HOST MEMORY", lambda r: r[2], justify="right"),
        Column("GUEST MEMORY", lambda r: r[3], justify="right"),
    ]
    output.table(columns, flat)


def register(app: typer.Typer) -> None:
    app.command()(stats)
