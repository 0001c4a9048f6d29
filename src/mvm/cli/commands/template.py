"""mvmctl template: the saved machines `up` restores (fast start)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Annotated

import typer

from ..exitcodes import EXIT_ERROR
from ..options import Arch, Flake, Json, Memory, NixArg, OverrideInput, SpecPath, complete_templates, nix_args

if TYPE_CHECKING:
    from mvm import TemplateInfo

app = typer.Typer(
    name="template",
    help="Templates: machines booted once and saved, which `up` restores instead of booting "
    "(fast start).\n\n"
    "After the first cold `up` of an image with a given shape (vCPUs, memory), mvm makes its "
    "template in the background; later `up`s restore it in well under a second. A template holds "
    "two saved states of one boot: `ready` (every service running and healthy, used by an `up` "
    "without -e and -v) and `agent` (services not started yet, used when -e or -v brings its own "
    "config; volumes are hot-plugged). After an `up -e` (no -v), a `ready` state with those -e values is "
    "saved in the background too (at most 3 per template; `template ls` counts them as +N -e), and the "
    "next `up` with exactly those values restores it. Each clone gets fresh kernel RNG bytes, its own machine-id "
    "and hostname, the host's clock and its own copy-on-write root disk and RAM.\n\n"
    "Note: services in a `ready` template started before the save, so what they drew from randomness "
    "at start-up (a hash seed, a key made at start) is the same in every clone. `up --cold` boots "
    "instead; MVM_TEMPLATES=restore never makes templates behind your back, =off never uses them.",
    no_args_is_help=True,
)


@app.command("create")
def create(
    path: SpecPath = ".",
    cpus: Annotated[int | None, typer.Option("--cpus", metavar="N", help="vCPUs (default: the spec's, else 1).",
                                             show_default=False)] = None,
    memory: Annotated[int | None, Memory("the spec's, else 512")] = None,
    json: Json = False,
    arch: Arch = None,
    flake: Flake = None,
    override_input: OverrideInput = None,
    nix_arg: NixArg = None,
) -> None:
    """Build if needed, then boot the image once and save its template now.

    \b
    Examples:
      mvmctl template create examples/hello
      mvmctl template create . --cpus 2 --memory 1024   # the shape `up` will ask for
    """
    import mvm

    from .. import output

    with output.progress("making the template") as prog:
        info = mvm.template_create(path, flake=flake, nix_args=nix_args(override_input, nix_arg), cpus=cpus,
                                   memory=memory, arch=arch, progress=prog)
    if json:
        output.print_json(info)
        return
    output.info(f"template {info.key[:12]} of {info.name}: {', '.join(info.kinds)}, "
                f"{output.human_bytes(info.bytes_on_disk)} on disk, made in {info.create_secs:.1f}s")


@app.command("ls")
def ls(json: Json = False) -> None:
    """List templates: image, shape, states, disk use, age (damaged ones say why).

    \b
    Example:
      mvmctl template ls --json
    """
    import mvm

    from .. import output
    from ..output import Column

    rows = mvm.templates()
    if json:
        output.print_json(rows)
        return
    columns: list[Column[TemplateInfo]] = [
        Column("KEY", lambda t: t.key[:12], style="bold"),
        Column("IMAGE", lambda t: f"{t.name or '(gone)'} {(t.image or '')[:12]}"),
        Column("SHAPE", lambda t: f"{t.cpus} vCPU {output.mib(t.memory)} {t.arch}" if t.cpus else None),
        Column("STATES", lambda t: (",".join(t.kinds) + (f" +{t.env_states} -e" if t.env_states else ""))
               or t.damaged),
        Column("ON-DISK", lambda t: output.human_bytes(t.bytes_on_disk), justify="right"),
        Column("CREATED", lambda t: output.human_secs(time.time() - t.created_at) + " ago" if t.created_at else None,
               justify="right"),
    ]
    output.table(columns, rows)


@app.command("rm")
def rm(keys: Annotated[list[str], typer.Argument(metavar="KEY", help="Template keys (4+ first characters), or "
                                                 "a guest name that has one template.",
                                                 show_default=False, autocompletion=complete_templates)],
       json: Json = False) -> None:
    """Remove templates (the next `up` of their image boots cold and makes a new one). Every
    KEY is tried; if one could not be removed, rm says why and exits 1.

    \b
    Examples:
      mvmctl template rm hello
      mvmctl template rm 7241b52e
    """
    import mvm

    from .. import output

    def remove(key: str) -> mvm.TemplateInfo:
        info = mvm.template_rm(key)
        if not json:
            freed = output.human_bytes(info.bytes_on_disk - info.bytes_shared)
            held = (f"; {output.human_bytes(info.bytes_shared)} stay until the VMs restored from it are down"
                    if info.bytes_shared else "")
            output.info(f"removed template {info.key[:12]} (freed {freed}{held})")
        return info

    removed, failed = output.each(keys, remove)
    if json:
        output.print_json(removed)
    if failed:
        raise typer.Exit(EXIT_ERROR)


def register(root: typer.Typer) -> None:
    root.add_typer(app)
