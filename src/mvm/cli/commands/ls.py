"""mvmctl ls."""

from __future__ import annotations

from typing import TYPE_CHECKING

import typer

from ..options import Json, Quiet

if TYPE_CHECKING:
    from mvm import VMInfo


def _ports(vm: VMInfo) -> str:
    return ",".join(f"{p.host_port}->{p.guest_port}" + ("/udp" if p.proto == "udp" else "") for p in vm.ports)


def _health(vm: VMInfo) -> str:
    """The checks' verdict, and any service that failed or crash-loops (``unhealthy, web failing``)."""
    return ", ".join([vm.health, *(f"{s} failing" for s in vm.failing)])


def ls(json: Json = False, quiet: Quiet = False) -> None:
    """List VMs: status, health, backend, architecture, size, forwarded ports and uptime.

    STATUS is derived from the live machine (its process id and start time), never trusted
    from a file: a VM whose QEMU died shows as crashed (or exited after a
    clean power-off), with the reason in --json's exit_reason. HEALTH is the health checks'
    verdict, followed by any service that failed for good or keeps crashing. The states are described in
    docs/architecture.md; the --json keys in docs/json.md.

    \b
    Examples:
      mvmctl ls
      mvmctl ls --json | jq -r '.[] | select(.health != "healthy") | .name'
      mvmctl ls -q
    """
    import mvm

    from .. import output
    from ..output import Column

    if quiet:  # names only: no machine or guest is asked anything
        for name in mvm.vm_names():
            output.out.print(name, highlight=False, markup=False)
        return

    rows = mvm.ls()
    if json:
        output.print_json(rows)
        return
    columns: list[Column[VMInfo]] = [
        Column("NAME", lambda vm: vm.name, style="bold"),
        Column("STATUS", lambda vm: vm.status),
        Column("HEALTH", _health),
        Column("BACKEND", lambda vm: f"{vm.backend}-{vm.accel}" if vm.backend else None),
        Column("ARCH", lambda vm: vm.arch),
        Column("CPUS", lambda vm: vm.cpus, justify="right"),
        Column("MEMORY", lambda vm: output.mib(vm.memory) if vm.memory else None, justify="right"),
        Column("PORTS", _ports, no_wrap=False),
        Column("UPTIME", lambda vm: output.human_secs(vm.uptime), justify="right"),
    ]
    output.table(columns, rows)


def register(app: typer.Typer) -> None:
    app.command("ls")(ls)
