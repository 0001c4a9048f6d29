"""mvmctl status."""

from __future__ import annotations

import typer

from ..options import Json, VMName


def status(name: VMName, json: Json = False) -> None:
    """Show one VM in detail: each service (state, pid, restarts, last exit, uptime) and
    each health check (state, last exit code, last output)."""
    import mvm

    from .. import output
    from ..output import Column

    vm = mvm.get(name)
    info = vm.info()
    guest = vm.agent_status() if info["status"] == "running" else {}
    if json:
        output.print_json({**info, "services": guest.get("services", {}), "health": guest.get("health", {})})
        return
    output.out.print(f"[bold]{name}[/]  {info['status']}  {info.get('backend')}-{info.get('accel')}  "
                     f"{info['cpus']} vCPU  {info['memory']} MiB  up {output.human_secs(info.get('uptime'))}")
    if info["status"] != "running":
        output.out.print(f"  {info.get('exit_reason', '')}")
        return
    services = [{"name": n, **s, "uptime": output.human_secs(s.get("uptime"))}
                for n, s in (guest.get("services") or {}).items()]
    if services:
        output.out.print("\n[bold]services[/]")
        output.table([Column("NAME", "name"), Column("STATE", "state"), Column("PID", "pid", "right"),
                      Column("RESTARTS", "restarts", "right"), Column("LAST EXIT", "last_exit", "right"),
                      Column("USER", "user"), Column("UPTIME", "uptime", "right")], services)
    checks = [{"name": n, **c, "last_output": (c.get("last_output") or "")[-60:]}
              for n, c in (guest.get("health") or {}).items()]
    if checks:
        output.out.print("\n[bold]health checks[/]")
        output.table([Column("NAME", "name"), Column("STATE", "state"), Column("LAST EXIT", "last_exit", "right"),
                      Column("FAILURES", "failures", "right"), Column("LAST OUTPUT", "last_output", no_wrap=False)],
                     checks)


def register(app: typer.Typer) -> None:
    app.command()(status)
