"""mvmctl suspend, mvmctl resume."""

from __future__ import annotations

import typer

from ..options import Json, VMName


def suspend(name: VMName, json: Json = False) -> None:
    """Save a running VM to disk and stop its machine: it uses no CPU and no memory until
    `mvmctl resume` brings it back, with its processes, /tmp and volumes as they were.

    While suspended it keeps its writable volumes: `up`, `volume rm` and `volume export` of
    them are refused (its guest has them mounted, with writes not yet on disk). `mvmctl
    resume` then `mvmctl down` frees them; `mvmctl down` alone removes the VM with its saved
    state and the guest's unwritten changes.

    \b
    Examples:
      mvmctl suspend hello
      mvmctl resume hello
    """
    import mvm

    from .. import output

    info = mvm.get(name).suspend()
    if json:
        output.print_json(info)
        return
    output.info(f"{name} is suspended")


def resume(name: VMName, json: Json = False) -> None:
    """Bring a suspended VM back as it was (its clock is set to now).

    It also continues a running VM whose machine QEMU paused: a write to its disks failed
    because the host disk holding them was full (free space first), or a `suspend` was cut
    short. `mvmctl status` says when a VM is paused, and why.

    \b
    Example:
      mvmctl resume hello
    """
    import mvm

    from .. import output

    info = mvm.get(name).resume(ask_guest=json)  # only --json prints health
    if json:
        output.print_json(info)
        return
    output.info(f"{name} is running again")


def register(app: typer.Typer) -> None:
    app.command()(suspend)
    app.command()(resume)
