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

The guest wrote every byte of the volume, so the image is read as hostile input, in Python
(:mod:`.ext4read`, never ``debugfs rdump``), and the export never writes outside ``dest``:

- a name that no file system makes (``/`` or NUL in it, ``.``, ``..``), a directory reached
  twice, device nodes, FIFOs and sockets, symlinks whose target is absolute or leaves the
  export, and regular files that claim more than 64 times the whole volume are *skipped*
  (listed, with the reason); hard links become separate copies;
- every path under ``dest`` is opened one component at a time, relative to ``dest`` and
  with ``O_NOFOLLOW``: a symlink on the host (left by an earlier export, say) is never
  followed, so a volume that swaps a symlink for a directory cannot write through it;
- the space and inodes the export needs are checked before anything is written;
- files are written (sparse, holes kept) into a temporary dir inside the destination, then
  moved into place one by one with ``rename``, so each file is old or new, never half.
  Exported files get the destination's owner; setuid, setgid and sticky bits are dropped.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .._atomic import write_json_atomic
from ..errors import ExportConflicts, VolumeError
from . import hostdir
from .ext4read import Ext4Error, Ext4Image, hash_zeros
from .ext4walk import Entry, walk
from .hostdir import SKIP_TOP, STAGING_PREFIX

BASELINE_SCHEMA = 1
#: Free space an export leaves on the destination's file system, at least.
RESERVE_BYTES = 32 << 20
#: What every written entry is counted as on top of its data (metadata, a partly used block).
ENTRY_BYTES = 4096
#: Directories deeper than this in a volume are not exported.
MAX_DEPTH = 256


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
    write_json_atomic(path, {"schema_version": BASELINE_SCHEMA, "dirs": dirs})


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
    skipped: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _owner_for(dest: Path) -> tuple[int, int] | None:
    """Exported files belong to the destination's owner (when mvm runs as root)."""
    if os.geteuid() != 0:
        return None
    st = dest.stat()
    return st.st_uid, st.st_gid


# --- what the volume holds ----------------------------------------------------------------


def _link_escapes(rel: str, target: str) -> bool:
    """Whether a symlink at ``rel`` with ``target`` points outside the export (the rule of
    tarfile's ``data`` filter, which ``mvmctl cp`` uses)."""
    if not target or target.startswith("/"):
        return True
    resolved = os.path.normpath(os.path.join(os.path.dirname(rel), target))
    return resolved == ".." or resolved.startswith("../")


#: A regular file may claim more bytes than its volume holds (a sparse file: `truncate -s 2G`),
#: up to this many times: the export writes only its data, but reads its holes as zeros to
#: compare it with the host's copy, so a crafted size of petabytes must not get that far.
SPARSE_FACTOR = 64


def _exportable(fs: Ext4Image, entries: Iterator[Entry]) -> Iterator[tuple[Entry, str | None]]:
    """The volume's entries that can be exported, each with its reason to be skipped (None:
    exported) and, for symlinks, the target."""
    volume_bytes = fs.blocks * fs.block_size
    for entry in entries:
        if entry.skipped is not None or entry.inode is None:
            yield entry, entry.skipped or "unreadable"
        elif entry.kind == "other":
            what = {stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device", stat.S_IFIFO: "a FIFO",
                    stat.S_IFSOCK: "a socket"}.get(stat.S_IFMT(entry.inode.mode), "of no known type")
            yield entry, f"{what}: only files, directories and symlinks are exported"
        elif entry.kind == "file" and entry.inode.size > SPARSE_FACTOR * volume_bytes:
            yield entry, (f"claims {entry.inode.size} bytes, more than {SPARSE_FACTOR} times the whole volume "
                          f"({volume_bytes}): a crafted size, or a sparse file too large to export (its holes "
                          "are read to compare it): copy it out with `mvmctl cp`")
        elif entry.kind == "link":
            try:
                raw = fs.read_link(entry.inode)
            except Ext4Error as exc:
                yield entry, str(exc)
                continue
            target = os.fsdecode(raw)
            if b"\0" in raw or _link_escapes(entry.rel, target):
                yield entry, f"a symlink to {target!r}, outside the export"
            else:
                yield entry, None
        else:
            yield entry, None


@dataclass
class _Plan:
    """What one export will do."""

    actions: list[tuple[Entry, str]] = field(default_factory=list)  #: (entry, result list) to write
    synced: dict[str, str] = field(default_factory=dict)  #: rel → digest, for the baseline
    in_volume: set[str] = field(default_factory=set)
    data_bytes: int = 0


def _plan(fs: Ext4Image, root_fd: int | None, baseline: dict[str, str], force: bool,
          result: ExportResult) -> _Plan:
    plan = _Plan()
    blocked: list[str] = []  # dirs whose contents are skipped
    skipped_dirs: list[str] = []
    for entry, why in _exportable(fs, walk(fs, SKIP_TOP, MAX_DEPTH)):
        rel, kind = entry.rel, entry.kind
        if any(rel.startswith(b + "/") for b in skipped_dirs):
            continue
        if why is not None:
            result.skipped.append(f"{rel}: {why}")
            if kind == "dir":
                skipped_dirs.append(rel)
            continue
        plan.in_volume.add(rel)
        if any(rel.startswith(b + "/") for b in blocked):
            continue
        assert entry.inode is not None
        have = hostdir.kind_at(root_fd, rel) if root_fd is not None else None
        if have == "blocked":
            result.conflicts.append(f"{rel}: a symlink or file on the host is in the way")
            blocked.append(rel)
            continue
        if kind == "dir" or have == "dir":
            if have is None:
                plan.actions.append((entry, "new"))
                result.new.append(rel + ("/" if kind == "dir" else ""))
            elif have != kind or kind != "dir":
                result.conflicts.append(f"{rel}: a {have} on the host, a {kind} in the volume")
                blocked.append(rel)
            else:  # counted as a new one is, so that an export and its repeat add up alike
                result.unchanged.append(rel + "/")
            continue
        theirs = None
        if have is not None:
            theirs = _volume_digest(fs, entry)
            ours = hostdir.host_digest(root_fd, rel) if root_fd is not None else None
            if ours == theirs:
                result.unchanged.append(rel)
                plan.synced[rel] = theirs
                continue
            if ours is not None and ours == baseline.get(rel):
                bucket = "updated"
            elif theirs == baseline.get(rel):
                result.kept.append(rel)  # changed on the host only: the host's version stays
                continue
            elif force and have in ("file", "link"):
                bucket = "overwritten"
            elif rel not in baseline:  # mvm never copied it here: not a change of either side
                result.conflicts.append(f"{rel}: already on the host, and different from the volume's")
                continue
            else:
                result.conflicts.append(f"{rel}: changed both on the host and in the volume")
                continue
        else:
            bucket = "new"
        plan.actions.append((entry, bucket))
        getattr(result, bucket).append(rel)
        if theirs is not None:
            plan.synced[rel] = theirs
        if kind == "file":
            plan.data_bytes += -(-fs.allocated(entry.inode) // ENTRY_BYTES) * ENTRY_BYTES
    return plan


def _volume_digest(fs: Ext4Image, entry: Entry) -> str:
    assert entry.inode is not None
    if entry.kind == "link":
        return "link:" + os.fsdecode(fs.read_link(entry.inode))
    return fs.digest(entry.inode)


def _check_space(where: Path, plan: _Plan, dest: Path) -> None:
    """Refuse, before writing anything, an export that would fill the host's disk."""
    st = os.statvfs(where)
    needed = plan.data_bytes + len(plan.actions) * ENTRY_BYTES
    free = st.f_bavail * st.f_frsize
    reserve = RESERVE_BYTES
    if needed + reserve > free:
        raise VolumeError(
            f"export into {dest} stopped: it needs about {_mb(needed)} MiB and {where} has {_mb(free)} MiB free "
            f"(mvm leaves {_mb(reserve)} MiB); nothing was written",
            hint="free some space, or export elsewhere with --to DIR")
    if st.f_files and len(plan.actions) + 1000 > st.f_favail:
        raise VolumeError(
            f"export into {dest} stopped: it creates {len(plan.actions)} files and directories and {where} has "
            f"room for {st.f_favail} more; nothing was written", hint="export elsewhere with --to DIR")


def _mb(n: int) -> str:
    return f"{n / (1 << 20):.1f}"


# --- writing --------------------------------------------------------------------------------


def _stage_file(fs: Ext4Image, entry: Entry, staging_fd: int, name: str, owner: tuple[int, int] | None) -> str:
    """Write the volume's file into the staging dir (sparse: holes stay holes); its digest."""
    inode = entry.inode
    assert inode is not None
    fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=staging_fd)
    h = hashlib.sha256()
    try:
        pos = 0
        for offset, data in fs.runs(inode):
            hash_zeros(h, offset - pos)
            written = 0
            while written < len(data):
                written += os.pwrite(fd, data[written:], offset + written)
            h.update(data)
            pos = offset + len(data)
        hash_zeros(h, inode.size - pos)
        os.ftruncate(fd, inode.size)
        os.fchmod(fd, stat.S_IMODE(inode.mode) & 0o777)  # no setuid, setgid or sticky from a guest
        if owner:
            os.fchown(fd, *owner)
        os.utime(fd, ns=(inode.mtime_ns, inode.mtime_ns))
    finally:
        os.close(fd)
    return "sha256:" + h.hexdigest()


def _stage_link(fs: Ext4Image, entry: Entry, staging_fd: int, name: str, owner: tuple[int, int] | None) -> str:
    assert entry.inode is not None
    target = os.fsdecode(fs.read_link(entry.inode))
    os.symlink(target, name, dir_fd=staging_fd)
    if owner:
        os.chown(name, *owner, dir_fd=staging_fd, follow_symlinks=False)
    return "link:" + target


def export_image(
    image: Path,
    dest: Path,
    baseline_path: Path,
    *,
    force: bool = False,
    volume: str = "",
) -> ExportResult:
    """Copy the files of an unmounted, locked volume image into ``dest`` (see module doc).
    :class:`~mvm.errors.ExportConflicts` (naming ``volume``) if a conflict stops it."""
    dest = dest.expanduser().absolute()
    if dest.exists() and not dest.is_dir():
        raise VolumeError(f"{dest} exists and is not a directory", hint="export into a directory")
    if not dest.parent.is_dir():
        raise VolumeError(f"{dest.parent} does not exist", hint="create it first, or export elsewhere with --to")
    result = ExportResult(dest=str(dest))
    baseline = read_baseline(baseline_path, dest)
    root_fd = os.open(dest, hostdir.DIR_FLAGS & ~os.O_NOFOLLOW) if dest.exists() else None
    try:
        with Ext4Image(image) as fs:
            plan = _plan(fs, root_fd, baseline, force, result)
            if result.conflicts:
                shown = "\n".join(result.conflicts[:20])
                more = f"\n… and {len(result.conflicts) - 20} more" if len(result.conflicts) > 20 else ""
                raise ExportConflicts(
                    f"export into {dest} stopped: {len(result.conflicts)} host path(s) differ from the volume's "
                    "(changed on both sides since mvm last copied them, there before any copy, or in the way); "
                    "nothing was written",
                    output=shown + more, volume=volume, dest=str(dest), conflicts=result.conflicts,
                    hint="directories are never replaced; export into an empty directory with --to DIR"
                    if force else "export into an empty directory with --to DIR, or pass --force to overwrite the "
                    "changed files (directories are never replaced)",
                )
            _check_space(dest if dest.exists() else dest.parent, plan, dest)
            owner = _owner_for(dest if dest.exists() else dest.parent)
            if root_fd is None:
                dest.mkdir(mode=0o755)
                if owner:
                    os.chown(dest, *owner)
                root_fd = os.open(dest, hostdir.DIR_FLAGS & ~os.O_NOFOLLOW)
            _write(fs, plan, root_fd, owner, dest)
    except Ext4Error as exc:
        raise VolumeError(f"volume image {image} cannot be exported: {exc}; nothing was written",
                          hint="check it with `e2fsck -fn IMAGE`") from None
    finally:
        if root_fd is not None:
            os.close(root_fd)
    result.host_only = [rel for rel in hostdir.list_files(dest) if rel not in plan.in_volume]
    baseline.update(plan.synced)
    write_baseline(baseline_path, dest, baseline)
    return result


def _write(fs: Ext4Image, plan: _Plan, root_fd: int, owner: tuple[int, int] | None, dest: Path) -> None:
    """Stage every file and symlink in a private dir inside ``dest`` (all or nothing), then
    create the directories and move the rest into place."""
    staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=dest))
    staging_fd = os.open(staging, hostdir.DIR_FLAGS)
    try:
        staged: dict[str, str] = {}
        try:
            for n, (entry, _) in enumerate(plan.actions):
                if entry.kind == "file":
                    plan.synced[entry.rel] = _stage_file(fs, entry, staging_fd, str(n), owner)
                elif entry.kind == "link":
                    plan.synced[entry.rel] = _stage_link(fs, entry, staging_fd, str(n), owner)
                else:
                    continue
                staged[entry.rel] = str(n)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise VolumeError(f"export into {dest} stopped: the host's disk is full ({exc.strerror}); "
                                  "nothing was written", hint="free some space, or export elsewhere with --to DIR") \
                    from None
            raise
        modes: list[tuple[str, int]] = []
        for entry, _ in plan.actions:
            assert entry.inode is not None
            with hostdir.parent(root_fd, entry.rel) as (parent_fd, name):
                if entry.kind == "dir":
                    os.mkdir(name, 0o700, dir_fd=parent_fd)
                    if owner:
                        os.chown(name, *owner, dir_fd=parent_fd, follow_symlinks=False)
                    modes.append((entry.rel, stat.S_IMODE(entry.inode.mode) & 0o1777))
                else:
                    os.replace(staged[entry.rel], name, src_dir_fd=staging_fd, dst_dir_fd=parent_fd)
        for rel, mode in reversed(modes):  # last: a directory without write permission is filled first
            fd = hostdir.open_dir(root_fd, rel.split("/"))
            try:
                os.fchmod(fd, mode)
            finally:
                os.close(fd)
    finally:
        os.close(staging_fd)
        shutil.rmtree(staging, ignore_errors=True)
