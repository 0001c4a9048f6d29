"""mvmctl volume ls | export | rm."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from ..exitcodes import EXIT_ERROR
from ..options import Json, complete_volumes

VolumeName = Annotated[
    str,
    typer.Argument(metavar="VOLUME",
                   help="The volume: its name from `mvmctl volume ls` (e.g. data-1a2b3c4d) or the HOST path "
                   "it was created for (e.g. ./data).", show_default=False, autocompletion=complete_volumes),
]

app = typer.Typer(
    name="volume",
    help="Persistent volumes: list them, copy their files to the host, remove them.\n\n"
    "`mvmctl up -v HOST:/guest/path:SIZE_MB` creates a writable volume of exactly SIZE_MB the first time "
    "(from HOST's files, if HOST is a directory) and reuses it on every later up: it is never reformatted. "
    "Managed volumes live under $MVM_HOME/state/volumes/ (default ~/.local/state/mvm/volumes/); an existing "
    "ext4 image file given as HOST is used in place. The guest's writes stay in the volume: copy them back "
    "to the host with `mvmctl volume export`. A volume is attached to one VM at a time. "
    "Full rules: docs/volumes.md.",
    no_args_is_help=True,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
)


LS_HELP = (
    "List persistent volumes: NAME VM SIZE USED ON-DISK GUEST HOST IMAGE.\n\n"
    "VM is the VM holding the volume now (from the live QEMU pid and its start time), or -. SIZE is the "
    "filesystem's size. USED is what the filesystem reports as used as of its last sync: exact once the VM is "
    "down (`df` in the guest is always exact). ON-DISK is what the sparse image takes on the host. GUEST is the "
    "path it was last mounted at, HOST the path given to -v, IMAGE the file that holds the data. --json adds "
    "the kind (managed, or an ext4 image file given as HOST), creation and last-use times."
)

EXPORT_HELP = (
    "Copy a volume's files to the host (the VM using it must be down).\n\n"
    "By default the files go back into the HOST directory the volume was created from: after "
    "`mvmctl up -v ./data:/mnt/data:1024`, `mvmctl down` and `mvmctl volume export ./data`, ./data holds what "
    "the guest wrote.\n\n"
    "Without --force, no edit made on the host is ever overwritten. A host file is written when it is "
    "missing, or unchanged since mvm last copied it (when the volume was created, or at the last export). "
    "A host file changed on the host only is kept. If a file was changed both on the host and in the volume "
    "(or was there, different, before mvm ever copied to that place), nothing at all is written and the "
    "conflicts are listed: export elsewhere with --to, or overwrite them with --force. Nothing on the host is "
    "ever deleted. Exported files get the owner of the destination "
    "directory; setuid/setgid bits are dropped.\n\n"
    "The guest wrote the volume, so mvm reads it as untrusted: nothing is ever written outside the destination, "
    "and device nodes, FIFOs, symlinks that point outside the destination and names no file system makes are "
    "skipped (and listed). The space the export needs is checked before anything is written.\n\n"
    "\b\nExamples:\n"
    "  mvmctl volume export ./data\n"
    "  mvmctl volume export data-1a2b3c4d --to /tmp/data-copy"
)

RM_HELP = (
    "Delete volumes and the data in them. Refused while a VM holds the volume.\n\n"
    "Asks for confirmation unless --yes is given (without a terminal, --yes is required). For a volume that is "
    "an ext4 image file you gave as HOST, only mvm's record of it is removed: the file itself is never "
    "deleted. To keep a managed volume's data, run `mvmctl volume export` first. Every volume named is tried: "
    "one in use is reported and the rest are removed all the same; the command then exits 1."
)


@app.command("ls", help=LS_HELP)
def ls(json: Json = False) -> None:
    """mvmctl volume ls."""
    import mvm

    from .. import output
    from ..output import Column

    rows = mvm.volume_ls()
    if json:
        output.print_json(rows)
        return

    def image(v: mvm.VolumeInfo) -> str:
        if v.error:
            return f"BROKEN: {v.error}"
        return v.image if v.exists else f"{v.image} (MISSING)"

    output.table(
        [
            Column[mvm.VolumeInfo]("NAME", lambda v: v.name, style="bold"),
            Column[mvm.VolumeInfo]("VM", lambda v: v.vm or (f"({v.held_by})" if v.held_by else None)),
            Column[mvm.VolumeInfo]("SIZE", lambda v: output.mib(v.size_mb), justify="right"),
            Column[mvm.VolumeInfo]("USED", lambda v: output.mib(v.used_mb), justify="right"),
            Column[mvm.VolumeInfo]("ON-DISK", lambda v: output.mib(v.allocated_mb), justify="right"),
            Column[mvm.VolumeInfo]("GUEST", lambda v: v.last_guest),
            Column[mvm.VolumeInfo]("HOST", lambda v: v.host, no_wrap=False),
            Column[mvm.VolumeInfo]("IMAGE", image, no_wrap=False),
        ],
        rows,
    )


@app.command("export", help=EXPORT_HELP)
def export(
    volume: VolumeName,
    to: Annotated[str | None, typer.Option(
        "--to", metavar="DIR",
                help="Directory to copy into (created if missing). Default: the volume's HOST directory.",
        show_default=False)] = None,
    force: Annotated[bool, typer.Option(
        "--force", help="Overwrite host files that were changed both on the host and in the volume since mvm "
        "last copied them (or were there, different, before any copy). Directories are never replaced, and "
        "host files that are not in the volume are kept.")]
    = False,
    json: Json = False,
) -> None:
    """mvmctl volume export."""
    import mvm

    from .. import output

    try:
        result = mvm.volume_export(volume, to=to, force=force)
    except mvm.ExportConflicts as exc:  # a script gets the list too (nothing was written)
        if json:
            output.print_json(mvm.VolumeExport(volume=exc.volume, dest=exc.dest, conflicts=exc.conflicts))
        raise
    if json:
        output.print_json(result)
        return
    changed = len(result.new) + len(result.updated) + len(result.overwritten)
    output.info(f"exported {result.volume} into {output.safe(result.dest)}: {changed} written "
                f"({len(result.new)} new, {len(result.updated)} updated, "
                f"{len(result.overwritten)} overwritten), {len(result.unchanged)} already up to date")
    if result.kept:
        output.info(f"kept {len(result.kept)} host file(s) changed on the host only: "
                    + output.safe(", ".join(result.kept[:5])) + (" …" if len(result.kept) > 5 else ""))
    if result.host_only:
        output.info(f"kept {len(result.host_only)} host file(s) that are not in the volume")
    if result.skipped:
        output.info(f"[yellow]skipped {len(result.skipped)} path(s)[/] the volume holds but that are never exported:")
        for line in result.skipped[:10]:
            output.info(f"  {output.safe(line)}")
        if len(result.skipped) > 10:
            output.info(f"  … and {len(result.skipped) - 10} more (all of them: --json)")


@app.command("rm", help=RM_HELP)
def rm(
    volumes: Annotated[list[str], typer.Argument(metavar="VOLUME", help="Volumes to remove: names from "
                                                 "`mvmctl volume ls` or HOST "
                                                 "paths.", show_default=False,
                                                 autocompletion=complete_volumes)],
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
    json: Json = False,
) -> None:
    """mvmctl volume rm."""
    import mvm

    from .. import output

    targets = [mvm.volume_info(name) for name in volumes]  # an unknown name fails before any question
    if not yes:
        if not sys.stdin.isatty():
            raise mvm.UsageError("volume rm deletes data: pass --yes to confirm",
                                 hint="copy the data out first with `mvmctl volume export`")
        for row in targets:
            used = output.mib(row.used_mb)
            if not typer.confirm(f"delete volume {row.name} ({row.host}, {used} used) and its data?"):
                output.info("not confirmed: no volume was removed")
                raise typer.Exit(EXIT_ERROR)

    def remove(row: mvm.VolumeInfo) -> mvm.VolumeInfo:
        view = mvm.volume_rm(row.name)
        kept = f"; the image file {view.image} was kept" if view.kind == "image" else ""
        if not json:
            output.info(f"removed volume {view.name} ({view.host}){kept}")
        return view

    removed, failed = output.each(targets, remove)  # one in use is reported; the rest still go
    if json:
        output.print_json(removed)
    if failed:
        raise typer.Exit(EXIT_ERROR)


def register(root: typer.Typer) -> None:
    root.add_typer(app)
