"""Whether someone holds one of mvm's lock files, without taking or making it.

mvm locks with ``filelock`` (``flock`` on Unix). Cleanup and the background makers only ask
whether a build or maker is at work: a probe that created a missing lock file would leave
behind the very file cleanup reports as stale, so this one opens an existing file only.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path


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
