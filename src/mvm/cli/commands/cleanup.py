"""mvmctl cleanup."""

from __future__ import annotations

from typing import Annotated

import typer

from ..options import Json


def cleanup(
    dry_run: Annotated[bool, typer.Option("--dry-run", "-n", help="Only list what would be removed.")] = False,
    all_: Annotated[bool, typer.Option("--all", help="Also run nix-collect-garbage when Nix is installed. It "
                                        "collects your whole Nix store, not only what mvm built.")] = False,
    keep: Annotated[int, typer.Option("--keep", metavar="N", min=0,
                                      help="Unused images to keep per guest and architecture (newest first).")] = 3,
    json: Json = False,
) -> None:
    """Remove what stopped VMs and old builds left behind, and say how much it freed.

    Removes: state of VMs that are not running (exited, crashed, unreadable, or an
    interrupted start), leftovers of interrupted builds, stale locks, and images that no VM
    uses beyond the newest --keep of each guest (per architecture). Never touches a running
    VM, and never a volume (remove those by name with `mvmctl volume rm`).
    """
    import mvm

    from .. import output

    report = mvm.cleanup(dry_run=dry_run, everything=all_, keep=keep)
    if json:
        output.print_json(report)
        return
    verb = "would remove" if dry_run else "removed"
    for item in report.items:
        output.out.print(f"{verb} {item.kind:5} {item.path}  ({output.human_bytes(item.bytes)}; {item.reason})")
    for note in report.notes:
        output.info(note)
    freed = output.human_bytes(report.freed_bytes)
    output.info(f"{'would free' if dry_run else 'freed'} {freed} ({len(report.items)} items)")


def register(app: typer.Typer) -> None:
    app.command()(cleanup)
