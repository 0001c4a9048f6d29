"""mvmctl cleanup."""

from __future__ import annotations

from typing import Annotated

import typer

from ..options import Json


def cleanup(
    dry_run: Annotated[bool, typer.Option("--dry-run", "-n", help="Only list what would be removed.")] = False,
    nix_gc: Annotated[bool, typer.Option("--nix-gc", help="Also run nix-collect-garbage when Nix is installed. "
                                         "It collects your whole Nix store, not only what mvm built.")] = False,
    keep: Annotated[int, typer.Option("--keep", metavar="N", min=0,
                                      help="Unused images to keep per guest and architecture (newest first).")] = 3,
    json: Json = False,
) -> None:
    """Remove what stopped VMs and old builds left behind, and say how much it freed.

    Removes: the state of VMs that are not running (exited, crashed, unreadable, or an
    interrupted start), the logs `down` kept, leftovers of interrupted builds, stale locks,
    images that no VM uses beyond the newest --keep of each guest (per architecture), package
    layers no remaining image was built from, and damaged templates or templates whose image
    is gone. Never touches a running or suspended VM (nor the image it needs), and never a
    volume (remove those by name with `mvmctl volume rm`).

    \b
    Examples:
      mvmctl cleanup --dry-run      # what would go, and how much it would free
      mvmctl cleanup --keep 0       # every image no VM uses, too
    """
    import mvm

    from .. import output

    report = mvm.cleanup(dry_run=dry_run, nix_gc=nix_gc, keep=keep)
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
