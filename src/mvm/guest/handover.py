"""Giving what a root ``preStart`` made to its service's user (PID 1, as root).

A preStart runs as root so it can prepare anything; the files it leaves in ``/tmp`` and in
the writable volumes are then the service's. Other services (as the default user, who owns
every writable volume's root) may race this: rename or swap entries, put links where the
preStart made directories. So, three reviews' findings:

- what is new is decided by ``(st_dev, st_ino)``, not path (a renamed root directory is not
  new), against a snapshot that is complete or not used at all;
- the tree is walked by descriptors, each directory opened relative to its parent with
  ``O_NOFOLLOW`` and checked to be the one listed (no link is ever followed, and nothing
  outside the roots is reached);
- each entry is opened once (``O_PATH``), checked, and changed through that descriptor (a
  swap between a check and a change by name would give away an old root file); links and
  files with other hard links are left alone;
- depth, entries and time are bounded: PID 1 holds the preStart lock meanwhile.

Stdlib only.
"""

from __future__ import annotations

import os
import stat
import time

TYPE_CHECKING = False  # not `from typing`: importing typing costs ~35 ms at boot under TCG

if TYPE_CHECKING:
    from collections.abc import Generator, Iterator

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
ENTRY_FLAGS = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC
#: Bounds of one walk (the rest is not handed over: it stays root's).
MAX_DEPTH = 64
MAX_ENTRIES = 200_000
BUDGET_SECS = 10.0


class Incomplete(OSError):
    """A walk could not see all of its tree (a directory vanished or changed under it, a
    bound was reached)."""


def _same(a: os.stat_result, b: os.stat_result) -> bool:
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _walk(roots: list[str], deadline: float, strict: bool) -> Generator[tuple[int, str, os.stat_result]]:
    """(descriptor of its directory, name, lstat) of everything under ``roots``. What
    vanishes or changes while it is read is Incomplete when ``strict``, else left out; a
    bound reached is Incomplete either way."""
    count = 0

    def unseen(why: str) -> None:
        if strict:
            raise Incomplete(why)

    def below(fd: int, depth: int) -> Iterator[tuple[int, str, os.stat_result]]:
        nonlocal count
        if depth > MAX_DEPTH:
            raise Incomplete(f"deeper than {MAX_DEPTH} directories")
        with os.scandir(fd) as listing:
            names = [entry.name for entry in listing]
        for name in names:
            count += 1
            if count > MAX_ENTRIES or time.monotonic() > deadline:
                raise Incomplete(f"more than {MAX_ENTRIES} entries or {BUDGET_SECS:.0f} s")
            try:
                st = os.stat(name, dir_fd=fd, follow_symlinks=False)
            except FileNotFoundError:
                unseen(f"{name!r} vanished while it was read")
                continue
            yield fd, name, st
            if not stat.S_ISDIR(st.st_mode):
                continue
            try:
                sub = os.open(name, DIR_FLAGS, dir_fd=fd)
            except OSError as exc:
                unseen(f"{name!r} changed while it was read ({exc.strerror})")
                continue
            try:
                if _same(os.fstat(sub), st):
                    yield from below(sub, depth + 1)
                else:
                    unseen(f"{name!r} changed while it was read")
            finally:
                os.close(sub)

    for root in roots:
        try:
            fd = os.open(root, DIR_FLAGS)
        except FileNotFoundError:  # nothing there, nothing to hand over
            continue
        try:
            yield from below(fd, 1)
        finally:
            os.close(fd)


def snapshot(roots: list[str]) -> set[tuple[int, int]]:
    """``(st_dev, st_ino)`` of everything under ``roots`` before a preStart. Incomplete (no
    hand-over) unless it saw everything: an entry it missed would count as new."""
    deadline = time.monotonic() + BUDGET_SECS
    return {(st.st_dev, st.st_ino) for _, _, st in _walk(roots, deadline, strict=True)}


def hand_over(roots: list[str], before: set[tuple[int, int]], uid: int, gid: int) -> int:
    """Give root-owned entries that are not in ``before`` to uid:gid; how many changed
    hands. Incomplete past a bound (what was handed over stays so)."""
    changed = 0
    deadline = time.monotonic() + BUDGET_SECS
    walk = _walk(roots, deadline, strict=False)
    try:
        for dir_fd, name, st in walk:
            if ((st.st_dev, st.st_ino) in before or st.st_uid != 0 or stat.S_ISLNK(st.st_mode)
                    or (st.st_nlink > 1 and not stat.S_ISDIR(st.st_mode))):
                continue
            try:
                fd = os.open(name, ENTRY_FLAGS, dir_fd=dir_fd)
            except OSError:
                continue
            try:
                now = os.fstat(fd)
                if _same(now, st) and now.st_uid == 0 and not stat.S_ISLNK(now.st_mode):
                    os.chown(f"/proc/self/fd/{fd}", uid, gid)  # the inode checked, not a name
                    changed += 1
            except OSError:
                pass
            finally:
                os.close(fd)
    finally:
        walk.close()
    return changed
