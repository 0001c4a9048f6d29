"""The export's destination, reached one component at a time and never through a symlink.

Every path under the destination is opened relative to a descriptor of the destination,
one directory at a time, with ``O_NOFOLLOW``: a symlink anywhere below it (left by an
earlier export of a volume that swapped a directory for a symlink, say) is reported as in
the way (:class:`Blocked`), never followed.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import stat
from collections.abc import Iterator
from pathlib import Path

SKIP_TOP = frozenset({"lost+found"})
STAGING_PREFIX = ".mvm-export-"

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class Blocked(Exception):
    """A component of a path under the destination is not a directory (a symlink, a file)."""


def open_dir(root_fd: int, parts: list[str]) -> int:
    """A descriptor of ``root/parts…``, opened without following any symlink."""
    fd = os.dup(root_fd)
    for part in parts:
        try:
            child = os.open(part, DIR_FLAGS, dir_fd=fd)
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                raise Blocked(part) from None
            raise
        finally:
            os.close(fd)
        fd = child
    return fd


@contextlib.contextmanager
def parent(root_fd: int, rel: str) -> Iterator[tuple[int, str]]:
    """(descriptor of the directory holding ``rel``, its last name)."""
    *parts, name = rel.split("/")
    fd = open_dir(root_fd, parts)
    try:
        yield fd, name
    finally:
        os.close(fd)


def kind_at(root_fd: int, rel: str) -> str | None:
    """What is at ``rel`` on the host: ``dir``, ``file``, ``link``, ``other``, None, or
    ``blocked`` when a parent component is not a directory."""
    try:
        with parent(root_fd, rel) as (fd, name):
            mode = os.lstat(name, dir_fd=fd).st_mode
    except Blocked:
        return "blocked"
    except FileNotFoundError:
        return None
    if stat.S_ISDIR(mode):
        return "dir"
    if stat.S_ISLNK(mode):
        return "link"
    return "file" if stat.S_ISREG(mode) else "other"


def host_digest(root_fd: int, rel: str) -> str | None:
    """:func:`entry_digest` of the host's ``rel``, opened without following symlinks."""
    try:
        with parent(root_fd, rel) as (dir_fd, name):
            st = os.lstat(name, dir_fd=dir_fd)
            if stat.S_ISLNK(st.st_mode):
                return "link:" + os.readlink(name, dir_fd=dir_fd)
            if not stat.S_ISREG(st.st_mode):
                return None
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
    except (Blocked, FileNotFoundError):
        return None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            return None
        h = hashlib.sha256()
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def list_files(root: Path) -> list[str]:
    """Relative paths of the files and symlinks under ``root`` (top-level lost+found and
    export staging dirs skipped)."""
    out: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        if dirpath == str(root):
            dirnames[:] = [d for d in dirnames if d not in SKIP_TOP and not d.startswith(STAGING_PREFIX)]
        for name in filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            out.append(os.path.relpath(os.path.join(dirpath, name), root))
    return sorted(out)


