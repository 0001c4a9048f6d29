"""Crafting hostile ext4 images, as a guest with raw access to its volume could.

Images are made with ``mkfs.ext4`` (metadata checksums off, as a guest's root can switch
them off with ``tune2fs``), then changed with ``debugfs -w`` (device nodes, FIFOs, setuid
bits, hard links, crafted sizes) and with raw byte edits of directory entries: a name of the
same length is swapped in place, so it can hold what no file system would ever write
(``/``, ``..``). Shared by the unit tests and the fault suite.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path


def make_image(path: Path, tree: Path | None = None, mb: int = 32) -> None:
    """A fresh ext4 image of ``mb`` MiB, holding ``tree``'s files, checksums off."""
    path.unlink(missing_ok=True)
    with open(path, "wb") as f:
        f.truncate(mb << 20)
    argv = ["mkfs.ext4", "-q", "-T", "default", "-O", "^metadata_csum", "-E", "root_owner=0:0"]
    if tree is not None:
        argv += ["-d", str(tree)]
    subprocess.run([*argv, str(path)], check=True)


def debugfs(image: Path, *commands: str) -> str:
    """Run debugfs commands on ``image`` (writable); return its output."""
    script = image.with_suffix(".debugfs")
    script.write_text("\n".join(commands) + "\n")
    try:
        done = subprocess.run(["debugfs", "-w", "-f", str(script), str(image)], capture_output=True, text=True,
                              check=True)
    finally:
        script.unlink()
    return done.stdout + done.stderr


def inode_of(image: Path, path: str) -> int:
    out = subprocess.run(["debugfs", "-R", f"stat {path}", str(image)], capture_output=True, text=True).stdout
    match = re.search(r"Inode: (\d+)", out)
    assert match, out
    return int(match.group(1))


def rename_raw(image: Path, old: bytes, new: bytes) -> None:
    """Swap the directory entry name ``old`` for ``new`` (same length) in the raw image."""
    assert len(old) == len(new), "a raw rename keeps the length"
    data = image.read_bytes()
    assert data.count(old) == 1, f"{old!r} is in the image {data.count(old)} times"
    offset = data.index(old)
    with open(image, "r+b") as f:
        f.seek(offset)
        f.write(new)


#: Run in a guest as root: the same raw rename on its own (unmounted) volume's block device.
#: Every copy is renamed: the journal holds copies of the directory block too.
GUEST_RENAME = """
import sys
dev, old, new = sys.argv[1], sys.argv[2].encode(), sys.argv[3].encode()
assert len(old) == len(new)
with open(dev, "r+b") as f:
    data = f.read()
    assert data.count(old) >= 1, "not found"
    at = data.find(old)
    while at >= 0:
        f.seek(at)
        f.write(new)
        at = data.find(old, at + 1)
print("renamed", data.count(old))
"""
