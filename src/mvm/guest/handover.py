"""Giving what a root ``preStart`` made to its service's user (PID 1, as root).

A preStart runs as root so it can prepare anything; the files it leaves in ``/tmp`` and in
the writable volumes are then the service's. Other services (as the default user, who owns
every writable volume's root) may race this: rename, exchange and refill entries, put links
where the preStart made directories. Four reviews each found a way past a version that
compared the tree before and after the preStart: a walk over entries others are changing
cannot see them all. So the preStart's files carry a mark no one else can make:

- each preStart runs as root with a group of its own (:func:`marker`: a gid from a reserved
  range, new for each run, and no other group), so what it creates has that group. No other
  process has it, and no one but root can give a file a group they are not in: an entry
  owned by root with that group is the preStart's, wherever it was moved to;
- the roots are walked by descriptors, each directory opened with ``O_NOFOLLOW`` relative
  to its parent and checked to be the one listed (no link is ever followed, nothing outside
  the roots is reached);
- each entry is opened once (``O_PATH``), checked, and changed through that descriptor;
  links and files with other hard links are left alone;
- depth, entries and time are bounded (PID 1 holds the preStart lock meanwhile).

A preStart's file outside the roots (in /etc, say) keeps the marker group, which no one has.
Stdlib only.
"""

from __future__ import annotations

import itertools
import os
import stat
import time

TYPE_CHECKING = False  # not `from typing`: importing typing costs ~35 ms at boot under TCG

if TYPE_CHECKING:
    from collections.abc import Generator

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
ENTRY_FLAGS = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC
#: preStart marker groups: above any group a distribution or a user makes.
MARKER_BASE = 2_100_000_000
_markers = itertools.count(MARKER_BASE)
#: Bounds of one hand-over (the rest is not handed over: it stays root's).
MAX_DEPTH = 64
MAX_ENTRIES = 100_000
BUDGET_SECS = 10.0


class Incomplete(OSError):
    """A bound was reached: what was handed over stays so, the rest stays root's."""


def marker() -> int:
    """A group for the next preStart to run with, used by no other run of this boot."""
    return next(_markers)


def _walk(roots: list[str], deadline: float) -> Generator[tuple[int, str, os.stat_result]]:
    """(descriptor of its directory, name, lstat) of what can be seen under ``roots``:
    entries that vanish or change while they are read are left out."""
    count = 0

    def below(fd: int, depth: int) -> Generator[tuple[int, str, os.stat_result]]:
        nonlocal count
        if depth > MAX_DEPTH:
            raise Incomplete(f"deeper than {MAX_DEPTH} directories")
        names = []
        with os.scandir(fd) as listing:
            for entry in listing:  # bounded as it is read: a directory may hold millions
                count += 1
                if count > MAX_ENTRIES or time.monotonic() > deadline:
                    raise Incomplete(f"more than {MAX_ENTRIES} entries or {BUDGET_SECS:.0f} s")
                names.append(entry.name)
        for name in names:
            try:
                st = os.stat(name, dir_fd=fd, follow_symlinks=False)
            except OSError:
                continue
            yield fd, name, st
            if not stat.S_ISDIR(st.st_mode):
                continue
            try:
                sub = os.open(name, DIR_FLAGS, dir_fd=fd)
            except OSError:
                continue
            try:
                opened = os.fstat(sub)
                if (opened.st_dev, opened.st_ino) == (st.st_dev, st.st_ino):
                    yield from below(sub, depth + 1)
            finally:
                os.close(sub)

    for root in roots:
        try:
            fd = os.open(root, DIR_FLAGS)
        except OSError:  # nothing there, nothing to hand over
            continue
        try:
            yield from below(fd, 1)
        finally:
            os.close(fd)


def _theirs(st: os.stat_result, mark: int) -> bool:
    """Made by the preStart that ran with ``mark``, and safe to give away."""
    return (st.st_uid == 0 and st.st_gid == mark and not stat.S_ISLNK(st.st_mode)
            and (st.st_nlink == 1 or stat.S_ISDIR(st.st_mode)))


def hand_over(roots: list[str], mark: int, uid: int, gid: int) -> int:
    """Give what the preStart that ran with group ``mark`` left under ``roots`` to uid:gid;
    how many entries changed hands. Incomplete past a bound."""
    changed = 0
    walk = _walk(roots, time.monotonic() + BUDGET_SECS)
    try:
        for dir_fd, name, st in walk:
            if not _theirs(st, mark):
                continue
            try:
                fd = os.open(name, ENTRY_FLAGS, dir_fd=dir_fd)
            except OSError:
                continue
            try:
                now = os.fstat(fd)
                if (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino) and _theirs(now, mark):
                    os.chown(f"/proc/self/fd/{fd}", uid, gid)  # the inode checked, not a name
                    changed += 1
            except OSError:
                pass
            finally:
                os.close(fd)
    finally:
        walk.close()
    return changed
