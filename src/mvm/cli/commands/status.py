"""mvmctl status."""

from __future__ import annotations

import typer

from ..options import Json, VMName


def status(name: VMName, json: Json = False) -> None:
    """Show one VM in detail: each service (state, pid, restarts, last exit, uptime, and the
    reason it failed or was last killed, e.g. out of memory) and each health check (state,
    last exit code, last output).

    \b
    Examples:
      mvmctl status hello
      mvmctl status hello --json | jq '.guest.checks'
    """
    import mvm

    from .. import output
    from ..output import Column

    details = mvm.get(name).details()
    if json:
        output.print_json(details)
        return
    up = f"  up {output.human_secs(details.uptime)}" if details.uptime is not None else ""
    output.out.print(f"[bold]{name}[/]  {details.status}  {details.backend}-{details.accel}  {details.arch}  "
                     f"{details.cpus} vCPU  {output.mib(details.memory)}{up}")
    if details.emulated:
        output.out.print(f"  {details.emulated}")
    guest = details.guest
    if guest is None:  # not running: why (exited, crashed), or what to do (suspended)
        why = details.exit_reason or (f"suspended: `mvmctl resume {name}` brings it back"
                                      if details.status == "suspended" else None)
        if why:
            output.out.print(f"  {output.safe(why)}")
        return
    if guest.services:
        output.out.print("\n[bold]services[/]")
        output.table([
            Column[mvm.ServiceStatus]("NAME", lambda s: s.name),
            Column[mvm.ServiceStatus]("STATE", lambda s: s.state),
            Column[mvm.ServiceStatus]("PID", lambda s: s.pid, "right"),
            Column[mvm.ServiceStatus]("RESTARTS", lambda s: s.restarts, "right"),
            Column[mvm.ServiceStatus]("LAST EXIT", lambda s: s.last_exit, "right"),
            Column[mvm.ServiceStatus]("USER", lambda s: s.user),
            Column[mvm.ServiceStatus]("UPTIME", lambda s: output.human_secs(s.uptime), "right"),
            Column[mvm.ServiceStatus]("REASON", lambda s: s.failure() if s.failing else s.reason, no_wrap=False),
        ], guest.services)
    if guest.checks:
        output.out.print("\n[bold]health checks[/]")
        output.table([
            Column[mvm.CheckStatus]("NAME", lambda c: c.name),
            Column[mvm.CheckStatus]("STATE", lambda c: c.state),
            Column[mvm.CheckStatus]("LAST EXIT", lambda c: c.last_exit, "right"),
            Column[mvm.CheckStatus]("FAILURES", lambda c: c.failures, "right"),
            Column[mvm.CheckStatus]("LAST OUTPUT", lambda c: (c.last_output or "")[-60:], no_wrap=False),
        ], guest.checks)


def register(app: typer.Typer) -> None:
    app.command()(status)
