"""Finishing an image from its package layer: a copy of the layer's ext4 file, with the
guest's own parts written in by debugfs (no mount, so no root needed):

- ``/etc/mvm/guest.json``: the guest model;
- the service users: lines appended to ``/etc/passwd``, ``group`` and ``shadow`` (modes and
  owners kept), and their home directories;
- the spec's ``files``: root-owned, modes kept (so the exec bit survives), parents created.

This is the step an edit of a service command or a shipped file re-runs: it takes well under
a second, against tens of seconds for the package layer.
"""

from __future__ import annotations

import os
import re
import stat
import tempfile
from pathlib import Path
from typing import Any

from .. import _ext4 as ext4
from .._proc import Runner
from ..errors import BuildError
from ..spec import GuestSpec
from . import guestfiles

ACCOUNT_FILES = ("passwd", "group", "shadow")
#: debugfs messages that are not errors here: a parent that exists, a file not there to
#: remove, the inode a `write` took.
TOLERATED = ("File exists", "already exists", "File not found by ext2_lookup", "Allocated inode:")
STAT_RE = re.compile(r"Mode:\s+(\d+).*?User:\s+(\d+)\s+Group:\s+(\d+)", re.S)


def copy_image(src: Path, dest: Path, runner: Runner) -> None:
    """A sparse copy (a reflink where the filesystem can)."""
    runner.run(["cp", "--reflink=auto", "--sparse=always", src, dest], desc="copying the package layer")


def assemble(image: Path, spec: GuestSpec, guest: dict[str, Any], *, base: Path, runner: Runner) -> None:
    """Write the guest's parts into ``image`` (a copy of the package layer)."""
    with tempfile.TemporaryDirectory(prefix=".assemble-", dir=image.parent) as tmp:
        work = Path(tmp)
        commands = _accounts(image, guest, work, runner)
        (work / "guest.json").write_text(guestfiles.guest_json(guest))
        commands += _put_file(work / "guest.json", "/etc/mvm/guest.json", 0o644)
        for target, source in sorted(spec.files.items()):
            try:
                commands += _put_tree(base / source, target)
            except ValueError as exc:  # debugfs_quote: its commands are lines
                raise BuildError(f"files: {target!r} = {source!r}: {exc}; debugfs cannot write such a name",
                                 hint="rename the file (or the link's target) without the line break") from None
        needed = sum(os.path.getsize(base / s) if (base / s).is_file() else ext4.tree_bytes(base / s)[0]
                     for s in spec.files.values())
        _make_room(image, needed + 4 * ext4.MIB, runner)
        ext4.run_debugfs(image, commands, runner, desc="writing the guest's files into the image", write=True,
                         tolerate=TOLERATED)


def _make_room(image: Path, needed: int, runner: Runner) -> None:
    sb = ext4.read_superblock(image)
    if sb is None:
        raise BuildError(f"{image} is not an ext4 image (the package layer is damaged: build with --pull)")
    free = sb.size_bytes - sb.used_bytes
    if free < needed + sb.size_bytes // 20:
        ext4.grow(image, sb.size_bytes + needed * 2 + 64 * ext4.MIB, runner)


def _accounts(image: Path, guest: dict[str, Any], work: Path, runner: Runner) -> list[str]:
    """Commands that append the service users to the account files (created if the layer
    has none: ``shadow`` comes only with the ``passwd`` package), keeping modes and owners."""
    lines = guestfiles.account_lines(guest)
    reads = []
    for name in ACCOUNT_FILES:
        reads += [f"dump /etc/{name} {ext4.debugfs_quote(str(work / name))}", f"stat /etc/{name}"]
    answers = dict(ext4.debugfs_answers(image, reads, runner, desc="reading the image's accounts"))
    commands: list[str] = []
    for name in ACCOUNT_FILES:
        found = STAT_RE.search(answers.get(f"stat /etc/{name}", ""))
        mode, uid, gid = (int(found[1], 8), found[2], found[3]) if found else (0o640 if name == "shadow" else 0o644,
                                                                              "0", "0")
        local = work / name
        with open(local, "a") as f:
            f.write("\n".join(lines[name]) + "\n")
        commands += [f"rm /etc/{name}", f"write {ext4.debugfs_quote(str(local))} /etc/{name}",
                     f"sif /etc/{name} mode 0{stat.S_IFREG | mode:o}",
                     f"sif /etc/{name} uid {uid}", f"sif /etc/{name} gid {gid}"]
    for user, uid in guestfiles.service_users(guest):
        home = f"/home/{user}"
        commands += [f"mkdir {home}", f"sif {home} uid {uid}", f"sif {home} gid {uid}",
                     f"sif {home} mode 0{stat.S_IFDIR | 0o750:o}"]
    return commands


def _parents(target: str) -> list[str]:
    parts = target.strip("/").split("/")[:-1]
    return [f"mkdir {ext4.debugfs_quote('/' + '/'.join(parts[: i + 1]))}" for i in range(len(parts))]


def _put_file(local: Path, target: str, mode: int) -> list[str]:
    q = ext4.debugfs_quote(target)
    return [*_parents(target), f"rm {q}", f"write {ext4.debugfs_quote(str(local))} {q}",
            f"sif {q} mode 0{stat.S_IFREG | mode:o}", f"sif {q} uid 0", f"sif {q} gid 0"]


def _put_tree(source: Path, target: str) -> list[str]:
    """A file or a whole directory from the host, root-owned, modes kept."""
    if not source.is_dir():
        return _put_file(source, target, stat.S_IMODE(source.stat().st_mode))
    q = ext4.debugfs_quote(target)
    commands = [*_parents(target), f"mkdir {q}", f"sif {q} uid 0", f"sif {q} gid 0",
                f"sif {q} mode 0{stat.S_IFDIR | stat.S_IMODE(source.stat().st_mode):o}"]
    for dirpath, dirnames, filenames in os.walk(source):
        dirnames.sort()
        for name in dirnames + sorted(filenames):
            full = Path(dirpath) / name
            dest = target.rstrip("/") + "/" + full.relative_to(source).as_posix()
            dq = ext4.debugfs_quote(dest)
            st = full.lstat()
            if stat.S_ISLNK(st.st_mode):
                commands += [f"rm {dq}", f"symlink {dq} {ext4.debugfs_quote(os.readlink(full))}"]
            elif stat.S_ISDIR(st.st_mode):
                commands += [f"mkdir {dq}", f"sif {dq} mode 0{stat.S_IFDIR | stat.S_IMODE(st.st_mode):o}"]
            else:
                commands += [f"rm {dq}", f"write {ext4.debugfs_quote(str(full))} {dq}",
                             f"sif {dq} mode 0{stat.S_IFREG | stat.S_IMODE(st.st_mode):o}"]
            commands += [f"sif {dq} uid 0", f"sif {dq} gid 0"]
    return commands
