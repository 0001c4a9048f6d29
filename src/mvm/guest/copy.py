"""``mvmctl cp`` inside the guest: a tar stream in or out, with ``docker cp``'s rules.

Run by the agent as a child (``python -m mvm.guest.copy in|out ...``) with its stdin or
stdout on the control channel, so copying reuses exec's streaming. Stdlib only.

The top entry of every stream is named :data:`TOP`; the receiving side decides what it
becomes, as ``docker cp`` does:

- a file onto an existing directory lands inside it; onto a missing path, it gets that
  name; onto an existing file, it replaces it;
- a directory onto an existing directory lands inside it (``SRC/.`` copies its contents);
  onto a missing path, it is created with that name; onto a file, it is refused.

Copied in, files belong to root unless ``--archive`` keeps the host's owners; modes are
kept. Copied out, owners are the host user's (the host does that, not this side). A file
is written beside its target under a temporary name and renamed onto it once complete: a
copy cut short (a full disk, a broken stream) leaves no partial file, and a file it was
to replace as it was. A copy ended by SIGTERM (its host client went away: the agent sends
SIGTERM, then SIGKILL two seconds later) removes its partial file the same way.

``mvmctl cp - NAME:DIR`` (``untar``) extracts a tar archive the user piped in into the
directory DIR, as ``docker cp -`` does: its entries as they are named (a leading ``/``
dropped, none may reach outside DIR), owners kept only with ``--archive``.
"""

from __future__ import annotations

import errno
import os
import signal
import sys
import tarfile

TYPE_CHECKING = False  # not `from typing`: the guest imports as little as it can

if TYPE_CHECKING:
    from typing import Any

TOP = "__mvm_cp__"


class CopyError(Exception):
    pass


def destination(dest: str, src_is_dir: bool, src_name: str, contents_only: bool) -> tuple[str, str | None]:
    """(directory to unpack into, new name of the top entry or None to unpack its contents)."""
    trailing = dest.endswith("/")
    dest = dest.rstrip("/") or "/"
    if os.path.isdir(dest):
        return dest, None if (src_is_dir and contents_only) else src_name
    if os.path.lexists(dest):
        if src_is_dir:
            raise CopyError(f"cannot copy a directory onto the file {dest}")
        if trailing:
            raise CopyError(f"{dest} is not a directory")
        return os.path.dirname(dest) or "/", os.path.basename(dest)
    if trailing and not src_is_dir:
        raise CopyError(f"{dest}/ does not exist (a trailing / names a directory)")
    parent = os.path.dirname(dest) or "/"
    if not os.path.isdir(parent):
        raise CopyError(f"{parent} does not exist")
    return parent, os.path.basename(dest)


def landed_name(name: str, new_top: str | None) -> str | None:
    """A name in the stream (``TOP/...``) as it lands: None for the top entry itself when only
    its contents go. Also a hard link's target (what it names is in the stream too)."""
    if name == TOP:
        return new_top
    if name.startswith(TOP + "/"):
        rest = name[len(TOP) + 1:]
        return rest if new_top is None else f"{new_top}/{rest}"
    raise CopyError(f"unexpected entry {name!r} in the stream")


def rename(member: tarfile.TarInfo, new_top: str | None, archive: bool) -> tarfile.TarInfo | None:
    """``member`` under its final name (None: the top entry itself, when only its contents go)."""
    name = landed_name(member.name, new_top)
    if name is None:
        return None
    member.name = name
    if member.islnk():  # a hard link names another entry of the stream: it moves with it
        member.linkname = landed_name(member.linkname, new_top) or "/"
    if not archive:
        member.uid = member.gid = 0
        member.uname = member.gname = "root"
    return member


#: The host sent the stream, from the user's files (the checks this side needs are made by
#: the callers): extracted as told (the data filter of Pythons that have one would drop owners).
_TRUSTED: dict[str, Any] = {"filter": "fully_trusted"} if hasattr(tarfile, "fully_trusted_filter") else {}


def _extract(tar: tarfile.TarFile, member: tarfile.TarInfo, where: str) -> None:
    """``member`` into ``where``; a regular file through a temporary name beside its target,
    renamed onto it (replacing a file, even one root may not write) once all of it is there."""
    if not member.isfile():
        tar.extract(member, where, set_attrs=True, numeric_owner=True, **_TRUSTED)
        return
    final = member.name
    if os.path.isdir(os.path.join(where, final)):
        raise CopyError(f"cannot copy a file onto the directory {os.path.join(where, final)}")
    head = os.path.dirname(final)
    member.name = os.path.join(head, f".mvm-cp-{os.getpid()}")  # short: a name of 255 bytes leaves no room
    partial = os.path.join(where, member.name)
    try:
        tar.extract(member, where, set_attrs=True, numeric_owner=True, **_TRUSTED)
        os.replace(partial, os.path.join(where, final))
    except BaseException as exc:
        try:
            os.unlink(partial)
        except OSError:
            pass
        if isinstance(exc, OSError) and exc.filename in (None, partial):  # a write names no file
            exc.filename = os.path.join(where, final)  # the user's name, in the error they see
        raise
    finally:
        member.name = final  # a later hard link to it names it so


def copy_in(dest: str, src_is_dir: bool, src_name: str, contents_only: bool, archive: bool) -> None:
    where, new_top = destination(dest, src_is_dir, src_name, contents_only)
    with tarfile.open(fileobj=sys.stdin.buffer, mode="r|") as tar:
        for original in tar:
            member = rename(original, new_top, archive)
            if member is None:
                continue
            _extract(tar, member, where)


def untar(dest: str, archive: bool) -> None:
    """Extract the tar archive on stdin into the existing directory ``dest``."""
    if not os.path.isdir(dest):
        raise CopyError(f"{dest} is not a directory in the guest (cp - extracts an archive into a directory)")
    root = os.path.realpath(dest)
    with tarfile.open(fileobj=sys.stdin.buffer, mode="r|*") as tar:
        for member in tar:
            member.name = member.name.lstrip("/")
            target = os.path.realpath(os.path.join(root, member.name))
            if target != root and not target.startswith(root + os.sep):
                raise CopyError(f"{member.name!r} in the archive would land outside {dest}")
            if member.islnk():  # a hard link names another entry of the archive, also under dest
                member.linkname = member.linkname.lstrip("/")
            if not archive:
                member.uid = member.gid = 0
                member.uname = member.gname = "root"
            _extract(tar, member, root)


def copy_out(src: str, follow: bool = False) -> None:
    """``src`` as a tar stream on stdout, its top entry named ``TOP``; ``follow``: a link
    ``src`` is followed (``cp -L``), else sent as the link it is."""
    path = src.rstrip("/") if src not in ("/",) else src
    contents_only = src.endswith("/.")
    if contents_only:
        path = src[:-2] or "/"
    if not os.path.lexists(path):
        raise CopyError(f"{path} does not exist")
    if follow:
        path = os.path.realpath(path)
        if not os.path.exists(path):
            raise CopyError(f"{src} is a link to {path}, which does not exist")
    with tarfile.open(fileobj=sys.stdout.buffer, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        tar.add(path, arcname=TOP)


def _stop(signum: int, frame: object) -> None:
    signal.signal(signum, signal.SIG_IGN)  # a second one must not cut the clean-up short
    raise SystemExit(128 + signum)  # unwinds through _extract, which removes its partial file


def main(argv: list[str]) -> int:
    signal.signal(signal.SIGTERM, _stop)
    try:
        if argv[0] == "out":
            copy_out(argv[1], follow=argv[2:] == ["1"])
        elif argv[0] == "untar":
            untar(argv[1], archive=argv[2:] == ["1"])
        else:
            _, dest, kind, name, contents, archive = argv
            copy_in(dest, kind == "dir", name, contents == "1", archive == "1")
    except OSError as exc:  # in a shell's words, not Python's ("[Errno 28] ...")
        where = f"{exc.filename}: " if exc.filename else ""
        full = " (the file system there is full)" if exc.errno == errno.ENOSPC else ""
        print(f"mvm cp: {where}{exc.strerror or exc}{full}", file=sys.stderr)
        return 1
    except (CopyError, tarfile.TarError) as exc:
        print(f"mvm cp: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
