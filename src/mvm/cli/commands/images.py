"""mvmctl images, mvmctl rmi."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Annotated

import typer

from ..exitcodes import EXIT_ERROR
from ..options import Json, Quiet, complete_images

if TYPE_CHECKING:
    from mvm import ImageInfo


def images(json: Json = False, quiet: Quiet = False) -> None:
    """List the images in the store: guest name, key, front end, size, age, and the VMs
    that use each one. Remove one with `mvmctl rmi`; `mvmctl cleanup` prunes unused ones.

    \b
    Examples:
      mvmctl images
      mvmctl images --json | jq -r '.[].key'
      mvmctl rmi $(mvmctl images -q)   # every image no VM needs (the others are refused)
    """
    import mvm

    from .. import output
    from ..output import Column

    rows = mvm.images()
    if quiet:  # the full keys
        for row in rows:
            output.out.print(row.key, highlight=False, markup=False)
        return
    if json:
        output.print_json(rows)
        return
    columns: list[Column[ImageInfo]] = [
        Column("NAME", lambda i: i.name, style="bold"),
        Column("KEY", lambda i: i.key[:12]),
        Column("FRONTEND", lambda i: i.frontend),
        Column("ARCH", lambda i: i.arch),
        Column("SIZE", lambda i: output.human_bytes(sum(i.sizes.values())), justify="right"),
        Column("CREATED", lambda i: output.human_secs(time.time() - i.created_at) + " ago", justify="right"),
        Column("VMS", lambda i: ",".join(i.vms), no_wrap=False),
    ]
    output.table(columns, rows)


def rmi(
    refs: Annotated[list[str], typer.Argument(metavar="IMAGE", help="An image key (or 4+ of its first "
                                              "characters), or a guest name: all of its images.",
                                              show_default=False, autocompletion=complete_images)],
    json: Json = False,
) -> None:
    """Remove images from the store, with their templates (fast start). Refused while a
    running or suspended VM uses one (a suspended VM resumes from it), and for a key prefix
    that starts more than one key. Every IMAGE is tried; if one could not be removed, rmi
    says why and exits 1.

    \b
    Examples:
      mvmctl rmi hello           # every image of the guest hello
      mvmctl rmi 5caa9de9        # one image, by the start of its key
    """
    import mvm

    from .. import output

    def remove(ref: str) -> list[mvm.ImageInfo]:
        gone = mvm.rmi(ref)
        if not json:
            for img in gone:
                output.info(f"removed image {img.key[:12]} ({img.name})")
        return gone

    removed, failed = output.each(refs, remove)
    if json:
        output.print_json([img for gone in removed for img in gone])
    if failed:
        raise typer.Exit(EXIT_ERROR)


def register(app: typer.Typer) -> None:
    app.command()(images)
    app.command()(rmi)
