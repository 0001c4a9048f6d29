"""mvmctl doctor."""

from __future__ import annotations

import typer

from ..exitcodes import EXIT_ERROR
from ..options import Json


def doctor(json: Json = False) -> None:
    """Check this host: which backends work (and why not), which guest architectures boot and
    build here (native, or emulated), who QEMU runs as (a user of its own per VM when mvm
    runs as root), which tools are installed (with versions), and the state dir with its
    free space. Each problem comes with the command
    that fixes it. Exits 1 if something mvm needs is missing.

    \b
    Examples:
      mvmctl doctor
      mvmctl doctor --json | jq '.backends'
    """
    from rich.table import Table

    import mvm

    from .. import output
    from ..output import safe

    report = mvm.doctor()
    if json:
        output.print_json(report)
        raise typer.Exit(0 if report.ok else EXIT_ERROR)
    marks = {True: "[green]ok[/]", False: "[red]no[/]", None: "[yellow]unknown[/]"}
    backends = Table(title="backends", title_justify="left", box=None, show_header=False, pad_edge=False)
    for b in report.backends:
        backends.add_row(marks[b.usable], safe(b.backend),
                         safe(b.reason + (f"\nfix: {b.fix}" if b.fix and not b.usable else "")))
    archs = Table(title="guest architectures", title_justify="left", box=None, show_header=False, pad_edge=False)
    for a in report.arches:
        what = ("boots, builds" if a.builds else "boots, cannot build") if a.boots else "cannot boot"
        archs.add_row(marks[a.boots and a.builds], a.arch, what, safe(a.reason + (f"\nfix: {a.fix}" if a.fix else "")))
    tools = Table(title="tools", title_justify="left", box=None, show_header=False, pad_edge=False)
    for t in report.tools:
        mark = "[red]missing[/]" if not t.found else "[yellow]fix[/]" if t.fix else "[green]ok[/]"
        tools.add_row(mark, t.tool, safe(t.version or ""),
                      safe(t.purpose + (f"\nfix: {t.fix}" if t.fix else "")))
    iso = report.isolation
    isolation = Table(title="isolation", title_justify="left", box=None, show_header=False, pad_edge=False)
    isolation.add_row("[green]ok[/]" if iso.qemu_user == "per-vm" else "[yellow]--[/]",
                      safe(iso.reason + (f"\nfix: {iso.fix}" if iso.fix else "")))
    d = report.disk
    state = Table(title="state", title_justify="left", box=None, show_header=False, pad_edge=False)
    state.add_row("state dir", safe(d.state_dir))  # paths from the environment: never markup
    state.add_row("cache dir", safe(d.cache_dir))
    state.add_row("free", output.human_bytes(d.free_bytes) if d.free_bytes else "-")
    if d.fix:
        state.add_row("[red]fix[/]", safe(d.fix))
    for section in (backends, archs, isolation, tools, state):
        output.out.print(section)
    raise typer.Exit(0 if report.ok else EXIT_ERROR)


def register(app: typer.Typer) -> None:
    app.command()(doctor)
