"""mvmctl ls."""

from __future__ import annotations

from typing import Any

import typer

from ..options import Json


def _ports(row: dict[str, Any]) -> str:
    return ",".join(f"{p['host_port']}->{p['guest_port']}" + ("/udp" if p["proto"] == "udp" else "")
                    for p in row.get("ports") or []) or "-"


def ls(json: Json = False) -> None:
    """List VMs: status, health, backend, size, forwarded ports and uptime.

    STATUS is derived from the live QEMU process (pid and start time), never trusted from a
    file: a VM whose QEMU died shows as [bold]crashed[/] (or [bold]exited[/] after a clean
    power-off), with the reason in --json's exit_reason.
    """
    import mvm

    from .. import output
    from ..output import Column

    rows = mvm.ls()
    if json:
        output.print_json(rows)
        return
    for row in rows:
        row["ports_text"] = _ports(row)
        row["backend_text"] = f"{row.get('backend', '?')}-{row.get('accel', '?')}"
        row["uptime_text"] = output.human_secs(row.get("uptime"))
        row["memory_text"] = f"{row['memory']}M" if row.get("memory") else "-"
    output.table(
        [
            Column("NAME", "name", style="bold"),
            Column("STATUS", "status"),
            Column("HEALTH", "health"),
            Column("BACKEND", "backend_text"),
            Column("CPUS", "cpus", justify="right"),
            Column("MEMORY", "memory_text", justify="right"),
            Column("PORTS", "ports_text"),
            Column("UPTIME", "uptime_text", justify="right"),
        ],
        rows,
    )


def register(app: typer.Typer) -> None:
    app.command("ls")(ls)
