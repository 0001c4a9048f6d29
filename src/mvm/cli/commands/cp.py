"""mvmctl cp."""

from __future__ import annotations

from typing import Annotated

import typer


def cp(
    src: Annotated[str, typer.Argument(metavar="SRC", help="A host path, NAME:/path in a running VM, or - (a "
                                       "tar archive on stdin, extracted into the directory DEST).",
                                       show_default=False)],
    dest: Annotated[str, typer.Argument(metavar="DEST", help="A host path, NAME:/path in a running VM, or - "
                                        "(a tar archive of SRC on stdout).", show_default=False)],
    archive: Annotated[bool, typer.Option("--archive", "-a", help="Keep the host files' owners (uid/gid) "
                                          "when copying into the VM; by default they belong to root.")] = False,
    follow_link: Annotated[bool, typer.Option("--follow-link", "-L", help="If SRC is a symbolic link, copy "
                                              "what it points to (by default, the link itself).")] = False,
) -> None:
    """Copy files and directories between the host and a running VM, as `docker cp` does.

    A file onto an existing directory lands inside it; onto a missing path, it takes that
    name. A directory onto an existing directory lands inside it (SRC/. copies only its
    contents); onto a missing path, it is created with that name. Modes are kept. Copied
    into the VM, files belong to root (or keep their owners with -a); copied out, they
    belong to you, and nothing the guest sends can land outside DEST (no absolute paths,
    no '..', no setuid bits): symbolic links that lead out of DEST (a guest's /etc has
    many) and device files are left out and listed, the rest copied. DEST - writes a tar archive of
    SRC to stdout instead (its top entry named as SRC, the guest's owners kept), to pipe
    into `tar` or elsewhere; ./- is a file named -. That archive is passed on as the guest
    made it: unpack it as you would any untrusted tar (GNU tar's defaults refuse absolute
    names and '..'; do not unpack it as root with --same-owner). SRC - extracts the tar
    archive on stdin into the VM directory DEST, as `docker cp -` does (a leading / of its
    names dropped, nothing outside DEST).

    \b
    Examples:
      mvmctl cp ./site hello:/srv/site
      mvmctl cp ./config.json hello:/etc/app/
      mvmctl cp hello:/var/log/app.log .
      mvmctl cp hello:/srv/site/. ./backup
      mvmctl cp hello:/var/log - | tar -tv
      tar -c site | mvmctl cp - hello:/srv
    """
    import mvm

    from .. import output

    with output.stdout_guard():  # `cp NAME:/x - | head`
        skipped = mvm.cp(src, dest, archive=archive, follow_link=follow_link)
    if skipped:
        what = f"{len(skipped)} entr{'y' if len(skipped) == 1 else 'ies'}"
        output.info(f"[yellow]warning[/]: left out {what} the host never takes from a guest: "
                    + output.safe("; ".join(skipped[:10])) + (" …" if len(skipped) > 10 else ""))


def register(app: typer.Typer) -> None:
    app.command()(cp)
