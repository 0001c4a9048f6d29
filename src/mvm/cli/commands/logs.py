"""mvmctl logs."""

from __future__ import annotations

from typing import Annotated

import typer

from ..options import Json, VMName


def logs(
    name: VMName,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing new lines until the VM stops "
                                         "(or Ctrl-C).")] = False,
    lines: Annotated[int | None, typer.Option("-n", "--lines", "--tail", metavar="N", min=0,
                                              help="Show only the last N console lines and the last N service lines.",
                                              show_default=False)] = None,
    service: Annotated[str | None, typer.Option("--service", "-s", metavar="SERVICE",
                                                help="Only this service's output and state changes.",
                                                show_default=False)] = None,
    since: Annotated[str | None, typer.Option("--since", metavar="WHEN",
                                              help="Only lines from then on: a duration back from now "
                                              "(30s, 10m, 2h, 1d) or a time (2026-11-30T14:05:00, or Unix "
                                              "seconds).", show_default=False)] = None,
    console: Annotated[bool, typer.Option("--console/--no-console", help="Include the kernel/boot console.")] = True,
    services: Annotated[bool, typer.Option("--services/--no-services", help="Include service output, "
                                           "service state changes and health transitions.")] = True,
    json: Json = False,
) -> None:
    """Show a VM's boot console and its services' logs (stdout/stderr, restarts, health).

    Logs are files on the host, so they can be read after the VM crashed, and after `down`:
    down keeps a VM's logs (in the state dir's logs/NAME, by default
    ~/.local/state/mvm/logs/NAME) until `mvmctl cleanup` or the
    next `up` of the same name; the retained logs of all VMs are capped at 256 MB in total,
    the oldest dropped first. --service and --since leave out the console (it has neither
    a service nor times). With --json: one JSON object per line (JSON Lines, also with
    --follow): {source, time, service, check, text}, see docs/json.md.

    \b
    Examples:
      mvmctl logs hello -f
      mvmctl logs hello -s hello --since 10m -n 50
    """
    import mvm

    from .. import output

    for line in mvm.logs(name, follow=follow, lines=lines, console=console, services=services,
                         service=service, since=mvm.parse_since(since) if since else None):
        if json:
            output.print_json_line(line.as_json())
        else:
            output.out.print(line.text, markup=False, highlight=False)


def register(app: typer.Typer) -> None:
    app.command()(logs)
