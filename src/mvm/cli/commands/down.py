"""mvmctl down."""

from __future__ import annotations

from typing import Annotated

import typer

from ..exitcodes import EXIT_ERROR
from ..options import Json, missing


def down(
    names: Annotated[list[str] | None, typer.Argument(metavar="NAME", help="VMs to stop.", show_default=False)] = None,
    all_: Annotated[bool, typer.Option("--all", "-a", help="Stop every VM, suspended ones too.")] = False,
    timeout: Annotated[float, typer.Option(
        "--timeout", metavar="SECONDS", min=0,
        help="Seconds the guest has to stop: its services get all but 5 of them between SIGTERM and "
             "SIGKILL, the rest is for syncing and powering off.")] = 15.0,
    json: Json = False,
) -> None:
    """Stop VMs and remove their runtime state. Idempotent.

    First the guest syncs its disks, stops the services (SIGTERM; SIGKILL for what still runs
    --timeout less 5 s later: 10 s by default, as `docker stop`), syncs again, unmounts and
    powers off. If the agent does not answer, or the guest has not powered off after
    --timeout, QEMU is told to quit (what the guest wrote since its shutdown began may then be
    lost; down says so); if that fails it is killed. Services that had to be killed are named
    ("shut down cleanly; web killed after 10s: ignored SIGTERM"). The VM's runtime
    dir is removed once its machine is gone; if the machine survives everything (for
    example a QEMU this user may not signal), down exits 1 and the VM stays listed. A
    suspended VM is removed with its saved state (it cannot be resumed after). Volumes are
    never touched. With --json: one {name, how} per VM, `how` as printed (`not found` for a
    VM that was not there). Every VM named is tried: one that cannot be stopped is reported
    and the rest are stopped all the same; down then exits 1.

    \b
    Examples:
      mvmctl down hello
      mvmctl down --all --json
    """
    import mvm

    from .. import output

    if all_ and names:
        raise missing(f"--all stops every VM: give either --all or the names, not both ({', '.join(names)})")
    if all_:
        targets = [row.name for row in mvm.ls(health=False)]
    elif names:
        targets = list(names)
    else:
        raise missing("name a VM to stop, or pass --all (`mvmctl ls` lists them)")

    def stop(name: str) -> mvm.DownResult:
        try:
            result = mvm.down(name, timeout=timeout)
        except mvm.VMNotFound:
            result = mvm.DownResult(name=name, how="not found")
            if not json:
                output.info(f"{name}: not found (nothing to stop)")
        else:
            if not json:
                output.info(f"{name}: down ({result.how})")
        return result

    results, failed = output.each(targets, stop)
    if json:
        output.print_json(results)
    if failed:
        raise typer.Exit(EXIT_ERROR)


def register(app: typer.Typer) -> None:
    app.command()(down)
