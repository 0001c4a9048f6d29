"""Atomic writes and removals: every document mvm persists goes through here (but the pytest
pool's ownership record: mvm.testing sees only the public API, and writes it the same way
itself), and every store's entry is removed here, so no reader ever sees half of one."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any


def write_json_atomic(path: Path, data: dict[str, Any], mode: int = 0o600) -> None:
    """Temp file in the same dir, fsync, rename: readers see the old or the new file. Its
    owner's only, as all of mvm's state (``mode``: where another user must read it)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def remove_tree(path: Path, *, ignore_errors: bool = False) -> None:
    """Remove a directory so that it is gone or intact, never half there: one rename to a
    ``.trash-*`` name beside it (readers skip dot names), then the delete. A delete that
    fails leaves only the trash, which ``mvmctl cleanup`` removes."""
    trash = path.parent / f".trash-{path.name}-{os.getpid()}-{time.monotonic_ns()}"
    try:
        os.rename(path, trash)
    except FileNotFoundError:
        return
    shutil.rmtree(trash, ignore_errors=ignore_errors)


def replace_tree(new: Path, path: Path) -> None:
    """Put directory ``new`` at ``path``, whose old tree (if any) goes to the trash only once
    ``new`` is in place: an interruption leaves the old one or the new one there, never
    neither (the old one is put back if the rename in fails)."""
    trash = path.parent / f".trash-{path.name}-{os.getpid()}-{time.monotonic_ns()}"
    try:
        os.rename(path, trash)
    except FileNotFoundError:
        os.rename(new, path)
        return
    try:
        os.rename(new, path)
    except BaseException:
        os.rename(trash, path)
        raise
    shutil.rmtree(trash, ignore_errors=True)  # what is left of it, cleanup removes


def trash_in(root: Path) -> list[Path]:
    """What :func:`remove_tree` left under ``root`` (a delete that failed, or was cut short)."""
    return sorted(root.glob(".trash-*")) if root.is_dir() else []
