"""mvm's lock files beyond what ``filelock`` does: asking whether one is held, removing a
stale one, and taking one as a bare descriptor.

mvm locks with ``filelock`` (``flock`` on Unix) wherever a ``with`` block holds the lock,
through :func:`locked` (one place for the lock file's mode and filelock's import).
Cleanup and the background makers only ask whether a build or maker is at work
(:func:`held`: a probe that created a missing lock file would leave behind the very file
cleanup reports as stale, so it opens an existing file only); cleanup removes stale ones
(:func:`remove_unheld`). A lock that outlives the block that took it, handed to QEMU or kept
for a session, is a descriptor from :func:`try_flock`, the one other way mvm takes a lock.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


class Busy(Exception):
    """Another holds the lock that :func:`locked` was told not to wait for."""


@contextmanager
def locked(path: Path, *, wait: bool = True, on_wait: Callable[[], None] | None = None) -> Iterator[None]:
    """A lock held for the ``with`` block, on a file only its owner can open. ``wait=False``:
    :class:`Busy` at once if another holds it. ``on_wait``: called once before waiting for
    another holder (to say so: a long build of the same image)."""
    from filelock import FileLock, Timeout  # not at import: most commands take no lock

    lock = FileLock(str(path), mode=0o600, timeout=-1 if wait else 0)
    try:
        if on_wait is not None and wait:
            try:
                lock.acquire(timeout=0)
            except Timeout:
                on_wait()
                lock.acquire()
        else:
            lock.acquire()
    except Timeout:
        raise Busy(str(path)) from None
    try:
        yield
    finally:
        lock.release()


def held(lock: Path) -> bool:
    """True while another open file description holds ``lock``; a missing file is not held.
    What cannot be asked (no permission, a file system without ``flock``) counts as held:
    the callers then leave the lock and its work alone."""
    try:
        fd = os.open(lock, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    except OSError:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except OSError:  # BlockingIOError: another holds it; ENOLCK and the like: cannot tell
        return True
    finally:
        os.close(fd)


def remove_unheld(lock: Path, guarded: Path) -> bool:
    """Unlink ``lock`` if nobody holds it and what it guards (``guarded``) is still gone once
    it is held here: True if removed. A command that opened the file just before may still
    lock the unlinked file; it then finds ``guarded`` gone, as it would have anyway."""
    try:
        fd = os.open(lock, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if guarded.exists():
            return False
        os.unlink(lock)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def try_flock(path: Path, *, verify: bool = False) -> int | None:
    """An open descriptor of ``path`` (made, mode 0600, if missing) that holds an exclusive
    ``flock`` on it, or None at once when another holds it. For the locks filelock cannot
    take: the ones handed to QEMU, which holds them for as long as it runs (a volume's, a
    machine user's lease), and an agent port held for a session. ``verify``: the file may be
    unlinked by whoever removes what it guards (``volume rm``) while this locks it; then
    lock the file now at ``path`` instead."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if not verify or os.fstat(fd).st_ino == os.stat(path).st_ino:
                return fd
        except BlockingIOError:
            os.close(fd)
            return None
        except FileNotFoundError:  # unlinked as we locked it: try the new one
            pass
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
