"""Giving what a root ``preStart`` made to its service's user (PID 1, as root).

A preStart runs as root so it can prepare anything; the files it leaves in ``/tmp`` and in
the writable volumes are then the service's. Other services (as the default user, who owns
every writable volume's root) may race this: rename, exchange and refill entries, put links
where the preStart made directories. Four reviews each found a way past a version that
compared the tree before and after the preStart: a walk over entries others are changing
cannot see them all. So the preStart's files carry a mark no one else can make:

- each preStart runs as root with a group of its own (:func:`marker`: a gid drawn at random
  from a reserved range of two billion, never twice in a boot, and no other group), so what
  it creates has that group. No other process has it, and no one but root can give a file a
  group they are not in: an entry owned by root with that group is the preStart's, wherever
  it was moved to. Drawn at random because volumes outlive a boot: a file left with a mark
  (a root service's preStart, a hand-over cut short) must not match a later boot's mark;
- the roots are walked by descriptors, each directory opened with ``O_NOFOLLOW`` relative
  to its parent and checked to be the one listed (no link is ever followed, nothing outside
  the roots is reached);
- each entry is opened once (``O_PATH``), checked, and changed through that descriptor;
  links and files with other hard links are left alone;
- the walk stays on each root's file system; a subtree too deep, or a root with too many
  entries, is left out (and said so), not the whole hand-over; time is bounded (PID 1 holds
  the preStart lock meanwhile).

What is not handed over: a preStart's file outside the roots (in /etc, say) keeps the marker
group, which no one has; what the preStart makes with another group (`tar x`, `cp -a`,
`chgrp`, or inside a setgid directory) stays as made; and a file a root service makes inside
a setgid directory the preStart made, before the hand-over, is handed over with it.
Stdlib only.
"""

from __future__ import annotations

import os
import stat
import time

TYPE_CHECKING = False  # not `from typing`: importing typing costs ~35 ms at boot under TCG

if TYPE_CHECKING:
    from collections.abc import Generator

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
ENTRY_FLAGS = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC
#: preStart marker groups: above any group a distribution or a user makes, below (gid_t)-1.
MARKER_BASE = 2_100_000_000
MARKER_SPAN = 2**32 - 2 - MARKER_BASE
_used: set[int] = set()
#: Bounds of one hand-over (what is past them is not handed over: it stays root's).
MAX_DEPTH = 64
MAX_ENTRIES = 100_000  #: per root
BUDGET_SECS = 10.0


class Incomplete(OSError):
    """The time bound was reached: what was handed over stays so, the rest stays root's."""


def marker() -> int:
    """A group for the next preStart to run with: random, and used by no other run of this
    boot (see the module's docstring)."""
    while True:
        mark = MARKER_BASE + int.from_bytes(os.urandom(4), "little") % MARKER_SPAN
        if mark not in _used:
            _used.add(mark)
            return mark


def _reopen(dir_fd: int, name: str, flags: int, seen: os.stat_result) -> int | None:
    """``name`` opened with ``flags`` if it is still the inode ``seen`` was, else None: the
    name may have been swapped since it was looked at."""
    try:
        fd = os.open(name, flags, dir_fd=dir_fd)
    except OSError:
        return None
    try:
        now = os.fstat(fd)
    except OSError:
        now = None
    if now is None or (now.st_dev, now.st_ino) != (seen.st_dev, seen.st_ino):
        os.close(fd)
        return None
    return fd


def _walk(roots: list[str], deadline: float,
          left_out: list[str]) -> Generator[tuple[int, str, os.stat_result]]:
    """(descriptor of its directory, name, lstat) of what can be seen under ``roots``, on
    each root's file system: entries that vanish or change while they are read are left
    out, and so are subtrees past the bounds (each noted in ``left_out``)."""

    def below(fd: int, root: os.stat_result, path: str, depth: int,
              count: list[int]) -> Generator[tuple[int, str, os.stat_result]]:
        if depth > MAX_DEPTH:
            left_out.append(f"{path}: deeper than {MAX_DEPTH} directories")
            return
        names = []
        with os.scandir(fd) as listing:
            for entry in listing:  # bounded as it is read: a directory may hold millions
                count[0] += 1
                if time.monotonic() > deadline:
                    raise Incomplete(f"stopped after {BUDGET_SECS:.0f} s")
                if count[0] > MAX_ENTRIES:
                    left_out.append(f"{path}: more than {MAX_ENTRIES} entries under its root")
                    return
                names.append(entry.name)
        for name in names:
            try:
                st = os.stat(name, dir_fd=fd, follow_symlinks=False)
            except OSError:
                continue
            if st.st_dev != root.st_dev:  # a mount inside a root: not the preStart's to give
                continue
            yield fd, name, st
            if not stat.S_ISDIR(st.st_mode):
                continue
            sub = _reopen(fd, name, DIR_FLAGS, st)
            if sub is None:
                continue
            try:
                yield from below(sub, root, f"{path}/{name}", depth + 1, count)
            finally:
                os.close(sub)
            if count[0] > MAX_ENTRIES:
                return

    for root in roots:
        try:
            fd = os.open(root, DIR_FLAGS)
        except OSError:  # nothing there, nothing to hand over
            continue
        try:
            yield from below(fd, os.fstat(fd), root, 1, [0])
        finally:
            os.close(fd)


def _theirs(st: os.stat_result, mark: int) -> bool:
    """Made by the preStart that ran with ``mark``, and safe to give away."""
    return (st.st_uid == 0 and st.st_gid == mark and not stat.S_ISLNK(st.st_mode)
            and (st.st_nlink == 1 or stat.S_ISDIR(st.st_mode)))


def hand_over(roots: list[str], mark: int, uid: int, gid: int) -> tuple[int, list[str]]:
    """Give what the preStart that ran with group ``mark`` left under ``roots`` to uid:gid:
    how many entries changed hands, and what was left out past a bound. Incomplete past the
    time bound."""
    changed = 0
    left_out: list[str] = []
    walk = _walk(roots, time.monotonic() + BUDGET_SECS, left_out)
    try:
        for dir_fd, name, st in walk:
            if not _theirs(st, mark):
                continue
            fd = _reopen(dir_fd, name, ENTRY_FLAGS, st)
            if fd is None:
                continue
            try:
                if _theirs(os.fstat(fd), mark):
                    os.chown(f"/proc/self/fd/{fd}", uid, gid)  # the inode checked, not a name
                    changed += 1
            except OSError:
                pass
            finally:
                os.close(fd)
    finally:
        walk.close()
    return changed, left_out
