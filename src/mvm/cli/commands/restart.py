"""mvmctl restart."""

from __future__ import annotations

from typing import Annotated

import typer

from ..options import Json, VMName, WaitTimeout, wait_timeout


def restart(
    name: VMName,
    wait: Annotated[bool, typer.Option("--wait", help="Return only once every service has started and every "
                                       "health check is healthy; fail at once if a service fails.")] = False,
    timeout: WaitTimeout = None,
    json: Json = False,
) -> None:
    """Stop a VM and start it again: the same image, ports, volumes, -e values, vCPUs, memory,
    --hypervisor, --log-limit and --cold.

    The guest starts afresh, as `up` starts it: restored from the image's template, or booted
    if it was started with --cold (its root filesystem is new, volumes keep their data). A
    host port that was picked for `-p GUEST` is asked for again by number.

    \b
    Examples:
      mvmctl restart hello
      mvmctl restart hello --wait --timeout 60
    """
    import mvm

    from .. import output

    seconds = wait_timeout(wait, timeout)
    with output.json_of_a_vm_left_running(json), output.progress(f"restarting {name}") as prog:
        vm = mvm.get(name).restart(wait=wait, wait_timeout=seconds, progress=prog)
    info = vm.info(ask_guest=json)  # only --json prints health
    if json:
        output.print_json(info)
        return
    output.info(f"{info.name} restarted ({info.status})")


def register(app: typer.Typer) -> None:
    app.command()(restart)
