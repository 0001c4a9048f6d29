"""Getting a writable volume's files back onto the host (``mvmctl volume export``).

The volume is the source of truth once it exists; the host dir it was created from is its
seed and the usual place its files are exported back to. Exporting never silently
overwrites a host file the user changed, and never deletes one:

- the *baseline* records, per file, what mvm last copied between that host dir and the
  volume (the seed at creation, then each export);
- a host file that is missing, or still equal to its baseline (only the guest changed it), is
  written;
- a host file the user changed while the volume still holds the baseline version is kept;
- a host file changed on both sides is a conflict. Conflicts abort the whole export
  before anything is written, unless ``force`` is given (it overwrites changed files;
  directories are never replaced, even then);
- files that exist only on the host are kept, and nothing on the host is ever deleted.

Files are first dumped (``debugfs rdump``) into a temporary dir next to the destination,
then moved into place one by one with ``rename``, so each file is old or new, never half.
Exported files get the destination's owner, and setuid/setgid bits are dropped.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .. import _ext4 as ext4
from .._atomic import write_json_atomic
from .._proc import Runner
from ..errors import VolumeError

BASELINE_SCHEMA = 1
SKIP_TOP = {"lost+found"}


def entry_digest(path: Path) -> str | None:
    """``sha256:…`` for a regular file, ``link:…`` for a symlink, None for anything else."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    if stat.S_ISLNK(st.st_mode):
        return "link:" + os.readlink(path)
    if not stat.S_ISREG(st.st_mode):
        return None
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def scan_tree(root: Path, skip_top: set[str] | None = None) -> dict[str, str]:
    """Digest of every regular file and symlink under ``root``, by relative path."""
    found: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        if skip_top and dirpath == str(root):
            dirnames[:] = [d for d in dirnames if d not in skip_top]
        for name in dirnames + filenames:
            full = Path(dirpath) / name
            if name in dirnames and not full.is_symlink():
                continue
            digest = entry_digest(full)
            if digest is not None:
                found[str(full.relative_to(root))] = digest
    return found


def _read_all(path: Path) -> dict[str, dict[str, str]]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}  # no baseline only makes an export more cautious (more conflicts)
    dirs = data.get("dirs") if isinstance(data, dict) else None
    if not isinstance(dirs, dict):
        return {}
    return {str(d): {str(k): str(v) for k, v in files.items()}
            for d, files in dirs.items() if isinstance(files, dict)}


def read_baseline(path: Path, host_dir: Path) -> dict[str, str]:
    """What mvm last copied between ``host_dir`` and the volume (one baseline per host dir)."""
    return _read_all(path).get(str(host_dir), {})


def write_baseline(path: Path, host_dir: Path, files: dict[str, str]) -> None:
    dirs = _read_all(path)
    dirs[str(host_dir)] = files
    write_json_atomic(path, {"schema_version": BASELINE_SCHEMA, "dirs": dirs}, mode=0o600)


@dataclass
class ExportResult:
    dest: str
    new: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    overwritten: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    conflicts: list[str] = field(default_factory=list)
    host_only: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _kind(path: Path) -> str | None:
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return None
    if stat.S_ISDIR(mode):
        return "dir"
    if stat.S_ISLNK(mode):
        return "link"
    return "file" if stat.S_ISREG(mode) else "other"


def _walk_dump(dump: Path) -> list[tuple[str, str]]:
    """(relative path, kind) of the dump, parents before children; lost+found skipped."""
    out: list[tuple[str, str]] = []
    for dirpath, dirnames, filenames in os.walk(dump):
        if dirpath == str(dump):
            dirnames[:] = [d for d in dirnames if d not in SKIP_TOP]
        dirnames.sort()
        for name in sorted(dirnames) + sorted(filenames):
            full = Path(dirpath) / name
            kind = _kind(full)
            if kind in ("dir", "file", "link"):
                assert kind is not None
                out.append((str(full.relative_to(dump)), kind))
    return out


def _list_files(root: Path) -> list[str]:
    """Relative paths of the files and symlinks under ``root`` (top-level lost+found skipped)."""
    out: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        if dirpath == str(root):
            dirnames[:] = [d for d in dirnames if d not in SKIP_TOP]
        for name in filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            out.append(os.path.relpath(os.path.join(dirpath, name), root))
    return sorted(out)


def _owner_for(dest: Path) -> tuple[int, int] | None:
    """Exported files belong to the destination's owner (when mvm runs as root)."""
    if os.geteuid() != 0:
        return None
    st = dest.stat()
    return st.st_uid, st.st_gid


def export_image(
    image: Path,
    dest: Path,
    baseline_path: Path,
    *,
    runner: Runner,
    force: bool = False,
) -> ExportResult:
    """Copy the files of an unmounted, locked volume image into ``dest`` (see module doc)."""
    dest = dest.expanduser().absolute()
    if dest.exists() and not dest.is_dir():
        raise VolumeError(f"{dest} exists and is not a directory", hint="export into a directory")
    if not dest.parent.is_dir():
        raise VolumeError(f"{dest.parent} does not exist", hint="create it first, or export elsewhere with --to")
    result = ExportResult(dest=str(dest))
    baseline = read_baseline(baseline_path, dest)
    dump = Path(tempfile.mkdtemp(prefix=f".{dest.name}.mvm-export-", dir=dest.parent))
    try:
        ext4.dump_tree(image, dump, runner)
        actions: list[tuple[str, str]] = []  # (rel, kind) to move into place
        blocked: list[str] = []  # dirs whose contents are skipped
        synced: dict[str, str] = {}
        for rel, kind in _walk_dump(dump):
            if any(rel.startswith(b + "/") for b in blocked):
                continue
            target = dest / rel
            have = _kind(target)
            if kind == "dir" or have == "dir":
                if have is None:
                    actions.append((rel, kind))
                    result.new.append(rel + ("/" if kind == "dir" else ""))
                elif have != kind or kind != "dir":
                    result.conflicts.append(f"{rel}: a {have} on the host, a {kind} in the volume")
                    blocked.append(rel)
                continue
            theirs = entry_digest(dump / rel)
            assert theirs is not None
            ours = entry_digest(target) if have else None
            if have is None:
                actions.append((rel, kind))
                result.new.append(rel)
            elif ours == theirs:
                result.unchanged.append(rel)
            elif ours is not None and ours == baseline.get(rel):
                actions.append((rel, kind))
                result.updated.append(rel)
            elif theirs == baseline.get(rel):
                result.kept.append(rel)  # changed on the host only: the host's version stays
                continue
            elif force and have in ("file", "link"):
                actions.append((rel, kind))
                result.overwritten.append(rel)
            else:
                result.conflicts.append(f"{rel}: changed both on the host and in the volume")
                continue
            synced[rel] = theirs
        if result.conflicts:
            shown = "\n".join(result.conflicts[:20])
            more = f"\n… and {len(result.conflicts) - 20} more" if len(result.conflicts) > 20 else ""
            raise VolumeError(
                f"export into {dest} stopped: {len(result.conflicts)} host path(s) were changed both on the "
                "host and in the volume since mvm last copied them; nothing was written",
                output=shown + more,
                hint="directories are never replaced; export into an empty directory with --to DIR"
                if force else "export into an empty directory with --to DIR, or pass --force to overwrite the "
                "changed files (directories are never replaced)",
            )
        owner = _owner_for(dest if dest.exists() else dest.parent)
        if not dest.exists():
            dest.mkdir(mode=0o755)
            if owner:
                os.chown(dest, *owner)
        for rel, kind in actions:
            _move_into_place(dump / rel, dest / rel, kind, owner)
        in_volume = {rel for rel, _ in _walk_dump(dump)} | {rel for rel, _ in actions}
        result.host_only = [rel for rel in _list_files(dest) if rel not in in_volume]
        baseline.update(synced)
        write_baseline(baseline_path, dest, baseline)
    finally:
        shutil.rmtree(dump, ignore_errors=True)
    return result


def _move_into_place(src: Path, target: Path, kind: str, owner: tuple[int, int] | None) -> None:
    if kind == "dir":
        mode = stat.S_IMODE(os.lstat(src).st_mode) & 0o1777
        target.mkdir(mode=mode)
        os.chmod(target, mode)
        if owner:
            os.chown(target, *owner)
        return
    if kind == "file":
        os.chmod(src, stat.S_IMODE(os.lstat(src).st_mode) & 0o1777)  # no setuid/setgid from a guest
    if owner:
        os.lchown(src, *owner)
    os.replace(src, target)
