"""Unpacking a tar stream a guest sent (``cp NAME:/path DEST``), one entry at a time.

Why not tarfile's ``data`` filter: it checks each entry's *name*, then writes through the
host's path, so it is only as safe as the interpreter's copy of tarfile (a symlink chain
longer than PATH_MAX got entries past the filter in Pythons before 3.11.13/3.12.11:
CVE-2025-4517), and an existing symlink at a target is followed. Here every entry is created
relative to a descriptor of the destination, one directory at a time, with ``O_NOFOLLOW``
(:func:`mvm.volumes.hostdir.open_dir`), so nothing is ever written outside it whatever the
stream holds. The rules are the ``data`` filter's: no absolute or ``..`` name, no link that
points outside the destination, no device node or FIFO, no setuid/setgid/sticky bit and no
group or other write bit; files belong to the user running mvm.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
import tarfile

from .._untrusted import printable
from ..errors import UsageError
from ..volumes.hostdir import Blocked, open_dir

CHUNK = 1 << 20
FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def _shown(name: str) -> str:
    """A name the guest chose, fit for a message: printable, and not a screenful."""
    return repr(printable(name, 160))


def _refuse(member: tarfile.TarInfo, why: str, hint: str | None = None) -> UsageError:
    return UsageError(f"the guest sent {_shown(member.name)}, which {why}; nothing more was copied",
                      hint=hint or "what the guest sends is untrusted: copy the files out another way if you "
                      "trust them")


def _parts(member: tarfile.TarInfo, name: str) -> list[str]:
    parts = name.split("/")
    if name.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise _refuse(member, f"names a path outside the destination ({_shown(name)})")
    return parts


def _leaves(member: tarfile.TarInfo, parts: list[str], floor: int) -> str | None:
    """Why a symlink's target leaves the destination (None: it stays at least ``floor``
    levels down, as the ``data`` filter requires). ``..`` only leads: each one climbs a real
    directory (made here, and a directory is never replaced by a link), and the rest only
    descends, so no chain of links can leave either (`a -> .`, then `b -> a/..` would)."""
    link = member.linkname
    floor = min(floor, len(parts) - 1)  # the top entry itself may point beside it, as tarfile's filter allows
    if link.startswith("/"):
        return f"a link to the absolute path {_shown(link)}"
    names = [p for p in link.split("/") if p not in ("", ".")]
    ups = next((i for i, p in enumerate(names) if p != ".."), len(names))
    if len(parts) - 1 - ups < floor or ".." in names[ups:]:
        return f"a link that leaves the destination ({_shown(link)})"
    return None


def _clear(fd: int, name: str, member: tarfile.TarInfo) -> None:
    """Make room for a link: an existing file or link is replaced, never written through."""
    try:
        st = os.stat(name, dir_fd=fd, follow_symlinks=False)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        raise UsageError(f"cannot copy {_shown(member.name)}: a directory of that name is in the way")
    os.unlink(name, dir_fd=fd)


def _times(fd: int, member: tarfile.TarInfo) -> None:
    with contextlib.suppress(OverflowError, OSError, ValueError):  # a time no file system keeps
        os.utime(fd, ns=(int(member.mtime * 1e9),) * 2)


def _write_file(fd: int, name: str, tar: tarfile.TarFile, member: tarfile.TarInfo) -> None:
    """The file under a temporary name, renamed over ``name`` once whole: an error part way
    leaves what was there before, not half of the new one."""
    mode = member.mode & 0o755 | 0o600
    if not member.mode & 0o100:
        mode &= ~0o111
    data = tar.extractfile(member)
    if data is None:
        raise _refuse(member, "is a file without data")
    temp = f".mvm-cp-{secrets.token_hex(8)}"  # short: a name of 255 bytes leaves no room for more
    out = os.open(temp, FILE_FLAGS, 0o600, dir_fd=fd)
    try:
        with os.fdopen(out, "wb", closefd=False) as sink:
            while chunk := data.read(CHUNK):
                sink.write(chunk)
        os.fchmod(out, mode)  # the umask does not take bits the data filter would keep
        _times(out, member)
        _clear(fd, name, member)
        os.rename(temp, name, src_dir_fd=fd, dst_dir_fd=fd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp, dir_fd=fd)
        raise
    finally:
        os.close(out)


def _make_dir(fd: int, name: str, member: tarfile.TarInfo) -> None:
    """The directory, with the guest's mode as files get theirs (group and others' write
    dropped, the owner's rwx kept so that its contents can be copied in) when it is made
    here; an existing one keeps its own mode, as ``cp -r`` leaves it."""
    try:
        os.mkdir(name, 0o700, dir_fd=fd)
        made = True
    except FileExistsError:
        made = False
    try:
        sub = open_dir(fd, [name])
    except (Blocked, NotADirectoryError):
        raise UsageError(f"cannot copy {_shown(member.name)}: a file of that name is in the way") from None
    try:
        if made:
            os.fchmod(sub, member.mode & 0o755 | 0o700)  # a 0700 guest dir stayed 0755 here
        _times(sub, member)
    finally:
        os.close(sub)


def extract(root_fd: int, tar: tarfile.TarFile, member: tarfile.TarInfo, floor: int = 0) -> str | None:
    """Create ``member`` under the directory ``root_fd`` (a file's data read from ``tar``);
    its links may point no higher than ``floor`` levels below it (1: inside the top entry).
    Returns why it was left out instead (a link leading out of the destination, a device
    node or FIFO), as ``volume export`` leaves such entries out; an entry that could only
    come from a crafted stream is refused (:class:`~mvm.errors.UsageError`)."""
    parts = _parts(member, member.name)
    try:
        fd = open_dir(root_fd, parts[:-1])
    except Blocked as exc:
        raise UsageError(f"cannot copy {_shown(member.name)}: {_shown(str(exc))} on the way is not a "
                         "directory (a link there is never followed)") from None
    name = parts[-1]
    try:
        if member.isdir():
            _make_dir(fd, name, member)
        elif member.issparse():  # a few KiB that unpack to any size: no guest's own `tar` makes one
            raise _refuse(member, "is a sparse file")
        elif member.isreg():
            _write_file(fd, name, tar, member)
        elif member.issym():
            why = _leaves(member, parts, floor)
            if why is not None and len(parts) == 1:  # SRC itself: leaving it out would copy nothing
                raise _refuse(member, f"is {why}", "SRC itself is a link: `mvmctl cp -L` (follow_link=True "
                              "in Python) copies what it points to")
            if why is not None:
                return f"{_shown(member.name)}: {why}"
            _clear(fd, name, member)
            os.symlink(member.linkname, name, dir_fd=fd)
        elif member.islnk():
            target = _parts(member, member.linkname)
            try:
                src = open_dir(root_fd, target[:-1])
            except Blocked:
                raise _refuse(member, f"is a hard link through a non-directory ({_shown(member.linkname)})") from None
            try:
                # a regular file only: a hard link to a symlink would put it at another depth,
                # where its leading '..' climb further than _leaves allowed
                if not stat.S_ISREG(os.stat(target[-1], dir_fd=src, follow_symlinks=False).st_mode):
                    raise _refuse(member, f"is a hard link to something other than a file ({_shown(member.linkname)})")
                _clear(fd, name, member)
                os.link(target[-1], name, src_dir_fd=src, dst_dir_fd=fd, follow_symlinks=False)
            finally:
                os.close(src)
        else:
            return f"{_shown(member.name)}: a device node, FIFO or other special file"
    finally:
        os.close(fd)
    return None
