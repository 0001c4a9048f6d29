"""ext4 images on the host, without mounting them (so mvm never needs root for volumes).

- :func:`read_superblock` parses the superblock in Python: the ext4 magic, the size, the
  block use and whether the journal needs replaying. No child process, so ``volume ls`` and
  the "is this file an ext4 image?" check are cheap.
- :func:`format_new` runs ``mkfs.ext4`` on a file that *this process just created* and
  that is still all zeros; it refuses anything else. It is the only place mvm formats a
  volume (a Debian build's root filesystem is made by mkfs.ext4 in mmdebstrap's hook, on
  a file of the build's own: :mod:`mvm.builders.layer`).
- :func:`grow` checks (``e2fsck -p``, which only fixes what is safe) and grows a
  filesystem offline with ``resize2fs``; nothing here ever shrinks one.
- :func:`set_tree_owner` rewrites owners and modes inside an image with ``debugfs``, because
  ``mkfs.ext4 -d`` copies the host's owners and a read-only mount cannot be chmod-ed later.

Every child process goes through :mod:`mvm._proc`. e2fsck and resize2fs parse images a
guest wrote, so they run :func:`~mvm._confine.confined` (as ``nobody`` when mvm runs as root).
Volumes are read back (``volume export``) by :mod:`mvm.volumes.ext4read`, in Python.
"""

from __future__ import annotations

import os
import stat
import struct
from dataclasses import dataclass
from pathlib import Path

from ._confine import confined
from ._proc import Runner
from .errors import CommandFailed, VolumeError

MIB = 1024 * 1024
EXT4_MAGIC = 0xEF53
SUPERBLOCK_OFFSET = 1024
COMPAT_HAS_JOURNAL = 0x4
INCOMPAT_RECOVER = 0x4
INCOMPAT_64BIT = 0x80
#: How much of a fresh file :func:`format_new` checks is still zero (the superblock region).
ZERO_CHECK_BYTES = 64 * 1024


@dataclass(frozen=True)
class Superblock:
    block_size: int
    blocks: int
    free_blocks: int
    uuid: str
    label: str
    has_journal: bool
    needs_recovery: bool

    @property
    def size_bytes(self) -> int:
        return self.blocks * self.block_size

    @property
    def used_bytes(self) -> int:
        """As of the last superblock write (unmount or sync): approximate while mounted."""
        return (self.blocks - self.free_blocks) * self.block_size


def read_superblock(path: Path) -> Superblock | None:
    """The ext2/3/4 superblock of the image at ``path``, or None if it is not one."""
    try:
        with open(path, "rb") as f:
            f.seek(SUPERBLOCK_OFFSET)
            raw = f.read(1024)
    except OSError:
        return None
    if len(raw) < 1024 or struct.unpack_from("<H", raw, 0x38)[0] != EXT4_MAGIC:
        return None
    blocks_lo, _, free_lo = struct.unpack_from("<III", raw, 0x04)
    log_block = struct.unpack_from("<I", raw, 0x18)[0]
    compat, incompat = struct.unpack_from("<II", raw, 0x5C)
    blocks, free = blocks_lo, free_lo
    if incompat & INCOMPAT_64BIT:
        blocks |= struct.unpack_from("<I", raw, 0x150)[0] << 32
        free |= struct.unpack_from("<I", raw, 0x158)[0] << 32
    if log_block > 6:  # block sizes are 1 KiB to 64 KiB: anything else is not a superblock
        return None
    uuid = raw[0x68:0x78].hex()
    return Superblock(
        block_size=1024 << log_block,
        blocks=blocks,
        free_blocks=free,
        uuid=f"{uuid[:8]}-{uuid[8:12]}-{uuid[12:16]}-{uuid[16:20]}-{uuid[20:]}",
        label=raw[0x78:0x88].split(b"\0", 1)[0].decode(errors="replace"),
        has_journal=bool(compat & COMPAT_HAS_JOURNAL),
        needs_recovery=bool(incompat & INCOMPAT_RECOVER),
    )


def create_sparse(path: Path, size_bytes: int) -> None:
    """Create ``path`` (it must not exist) as a sparse file of exactly ``size_bytes``."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.ftruncate(fd, size_bytes)
    finally:
        os.close(fd)


def _is_blank(path: Path) -> bool:
    with open(path, "rb") as f:
        return not f.read(ZERO_CHECK_BYTES).strip(b"\0")


def format_new(
    path: Path,
    runner: Runner,
    *,
    label: str,
    journal: bool,
    root_owner: tuple[int, int],
    seed: Path | None = None,
    inodes: int | None = None,
    desc: str,
) -> None:
    """``mkfs.ext4`` a fresh, all-zero file (from :func:`create_sparse`), optionally seeded.

    Refuses a file that holds anything: mvm formats only what it has just created. mkfs
    runs without ``-F``, so it also refuses, on its own, to overwrite a filesystem.
    """
    if not path.is_file() or not _is_blank(path):
        raise VolumeError(f"refusing to format {path}: it is not a blank file mvm just created",
                          hint="this is a bug in mvm; your data was not touched")
    argv: list[str | os.PathLike[str]] = [
        "mkfs.ext4", "-q", "-T", "default", "-m", "0", "-L", label[:16],
        "-E", f"root_owner={root_owner[0]}:{root_owner[1]}",
    ]
    if journal:
        argv += ["-e", "remount-ro"]
    else:
        argv += ["-O", "^has_journal"]
    if inodes:
        argv += ["-N", str(inodes)]
    if seed is not None:
        argv += ["-d", seed]
    argv.append(path)
    runner.run(argv, desc=desc, error=CommandFailed)


def replay_journal(path: Path, runner: Runner) -> None:
    """Apply what a killed guest left in the journal (what a mount would do), nothing more."""
    sb = read_superblock(path)
    if sb is None or not sb.needs_recovery:
        return
    with confined(path) as tool:
        runner.run(tool.argv("e2fsck", "-E", "journal_only", "-p", tool.name), cwd=tool.cwd,
                   desc=f"replaying the journal of {path.name}", ok_codes=(0, 1))


def grow(path: Path, size_bytes: int, runner: Runner) -> None:
    """Grow the image file and its filesystem to ``size_bytes`` (offline, never shrinks).

    ``e2fsck -p`` first (resize2fs requires a checked filesystem); it fixes only what is safe
    to fix and stops otherwise, so a damaged volume is reported, never "repaired" by force.
    """
    sb = read_superblock(path)
    if sb is None:
        raise VolumeError(f"{path} is not an ext4 image")
    if size_bytes < sb.size_bytes:
        raise VolumeError(f"refusing to shrink {path}", hint="this is a bug in mvm; nothing was changed")
    with confined(path) as tool:
        runner.run(
            tool.argv("e2fsck", "-f", "-p", tool.name),
            cwd=tool.cwd,
            desc=f"checking {path.name} before resizing it",
            ok_codes=(0, 1),
            error=CommandFailed,
            hint=f"the filesystem needs a manual check: e2fsck -f {path} (nothing was resized)",
        )
        if path.stat().st_size < size_bytes:
            os.truncate(path, size_bytes)
        runner.run(tool.argv("resize2fs", tool.name, f"{size_bytes // 1024}K"), cwd=tool.cwd,
                   desc=f"growing {path.name}")


def debugfs_quote(path: str) -> str:
    """Quote a path for debugfs' command parser (``""`` is a literal quote inside quotes)."""
    if "\n" in path or "\r" in path:
        raise ValueError(f"{path!r} contains a line break")
    return '"' + path.replace('"', '""') + '"'


def owner_script(tree: Path, *, uid: int, gid: int, dir_mode: int, file_mode: int) -> list[str]:
    """debugfs commands that give every entry of ``tree`` (as copied by mkfs -d) one owner.

    Directories get ``dir_mode`` and regular files ``file_mode``; symlinks keep their mode;
    other special files keep their type. The root of the image is included, and mkfs's
    ``lost+found`` goes (a read-only image never needs it) unless ``tree`` has its own.
    """
    lines = [f"sif / uid {uid}", f"sif / gid {gid}", f"sif / mode 0{stat.S_IFDIR | dir_mode:o}"]
    if not os.path.lexists(os.path.join(tree, "lost+found")):
        lines.insert(0, "rmdir /lost+found")
    for dirpath, dirnames, filenames in os.walk(tree):
        for name in sorted(dirnames) + sorted(filenames):
            full = os.path.join(dirpath, name)
            rel = "/" + os.path.relpath(full, tree)
            st = os.lstat(full)
            try:
                quoted = debugfs_quote(rel)
            except ValueError:
                raise VolumeError(
                    f"{full!r}: file names with line breaks cannot go into a volume image",
                    hint="rename the file",
                ) from None
            lines += [f"sif {quoted} uid {uid}", f"sif {quoted} gid {gid}"]
            if stat.S_ISLNK(st.st_mode):
                continue
            perm = dir_mode if stat.S_ISDIR(st.st_mode) else file_mode
            lines.append(f"sif {quoted} mode 0{stat.S_IFMT(st.st_mode) | perm:o}")
    return lines


def run_debugfs(path: Path, commands: list[str], runner: Runner, *, desc: str, write: bool,
                tolerate: tuple[str, ...] = (), check: bool = True) -> str:
    """Run debugfs commands on an image; debugfs exits 0 on errors, so its output is checked
    (unless ``check`` is false: then the output is the answer). Lines containing one of
    ``tolerate`` are not errors."""
    script = path.parent / f".{path.name}.debugfs"
    script.write_text("\n".join(commands) + "\n")
    try:
        argv: list[str | os.PathLike[str]] = ["debugfs", *(["-w"] if write else []), "-f", script, path]
        done = runner.run(argv, desc=desc, error=CommandFailed)
    finally:
        script.unlink(missing_ok=True)
    if not check:
        return done.output
    problems = [ln for ln in done.output.splitlines()
                if ln.strip() and not ln.startswith("debugfs ") and not ln.startswith("debugfs: ")
                and not any(t in ln for t in tolerate)]
    if problems:
        raise CommandFailed(f"{desc} failed", argv=done.argv, output="\n".join(problems[-20:]))
    return done.output


def debugfs_answers(path: Path, commands: list[str], runner: Runner, *, desc: str) -> list[tuple[str, str]]:
    """Run read-only debugfs commands; return each command with its own output."""
    output = run_debugfs(path, commands, runner, desc=desc, write=False, check=False)
    answers: list[tuple[str, list[str]]] = []
    for line in output.splitlines():
        if line.startswith("debugfs: "):
            answers.append((line.removeprefix("debugfs: ").strip(), []))
        elif answers:
            answers[-1][1].append(line)
    return [(cmd, "\n".join(lines)) for cmd, lines in answers]


def set_tree_owner(image: Path, tree: Path, runner: Runner, *, uid: int, gid: int,
                   dir_mode: int, file_mode: int) -> None:
    commands = owner_script(tree, uid=uid, gid=gid, dir_mode=dir_mode, file_mode=file_mode)
    run_debugfs(image, commands, runner, desc=f"setting owners and modes in {image.name}", write=True)


def tree_bytes(tree: Path) -> tuple[int, int]:
    """(bytes an ext4 copy of ``tree`` needs for data, number of entries), for sizing images."""
    total, entries = 0, 0
    for dirpath, dirnames, filenames in os.walk(tree):
        for name in dirnames + filenames:
            entries += 1
            try:
                st = os.lstat(os.path.join(dirpath, name))
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode):
                total += -(-st.st_size // 4096) * 4096
            else:
                total += 4096
    return total, entries


def image_size_for(tree: Path) -> tuple[int, int]:
    """(image size in bytes, inode count) that comfortably holds a copy of ``tree``.

    The image is sparse, so generosity costs no disk space: data, one block and one inode
    per entry, 25 % slack and 4 MiB for the filesystem's own metadata, in whole MiB.
    """
    data, entries = tree_bytes(tree)
    inodes = entries + 64
    raw = (data + entries * 4096 + inodes * 256) * 5 // 4 + 4 * MIB
    return -(-raw // MIB) * MIB, inodes
