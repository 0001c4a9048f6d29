"""Walking a volume's directory tree (read by :mod:`.ext4read`), checking every name.

A guest can write any bytes into its volume's directories, including names that no file
system makes (``../../pwn``, ``a/b``). :func:`walk` yields each path with the reason it
must not be exported when it is such a name, a directory reached twice, a reserved inode or
too deep; it never descends into those.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

from .ext4read import ROOT_INO, Ext4Error, Ext4Image, Inode

#: The most entries a walk yields (memory stays bounded; an export plans every entry first).
MAX_ENTRIES = 4_000_000


@dataclass(frozen=True)
class Entry:
    """One path of the tree. ``skipped`` says why it is not exported (None: it is)."""

    rel: str  #: the path below the root, ``/``-separated; each part is a checked name
    kind: str  #: ``dir``, ``file``, ``link``, ``other``
    inode: Inode | None
    skipped: str | None = None


def check_name(name: bytes) -> str | None:
    """Why ``name`` cannot be a file name (None: it can)."""
    if not name:
        return "an empty name"
    if name in (b".", b".."):
        return f"a name that is {name.decode()!r}"
    if b"/" in name:
        return "a name containing '/'"
    if b"\0" in name:
        return "a name containing a NUL byte"
    return None


def shown(name: bytes) -> str:
    """A name as text for messages (its bytes, escaped where they are not printable)."""
    return repr(name)[2:-1]


def walk(fs: Ext4Image, skip_top: frozenset[str] = frozenset(), max_depth: int = 256) -> Iterator[Entry]:
    """Every path under the root, parents before children. A name that cannot be a file
    name, a directory reached a second time, and paths deeper than ``max_depth`` are
    yielded with ``skipped`` set and not descended into."""
    root = fs.inode(ROOT_INO)
    if root.kind != "dir":
        raise Ext4Error("the root inode is not a directory")
    visited = {ROOT_INO}
    stack: list[tuple[str, Inode, int]] = [("", root, 0)]
    count = 0
    while stack:
        prefix, directory, depth = stack.pop()
        children: list[tuple[str, Inode]] = []
        names: list[tuple[bytes, int]] = []
        for item in fs.entries(directory):
            names.append(item)
            count += 1
            if count > MAX_ENTRIES:
                raise Ext4Error(f"the volume holds more than {MAX_ENTRIES} entries")
        for name, ino in sorted(names):
            why = check_name(name)
            if why is not None:
                yield Entry(prefix + shown(name), "other", None,
                            f"{why}: no file system makes one (crafted on the raw disk?)")
                continue
            rel = prefix + os.fsdecode(name)
            if not prefix and rel in skip_top:
                continue
            if ino < fs.first_ino and ino != ROOT_INO:
                yield Entry(rel, "other", None, f"points at reserved inode {ino}")
                continue
            child = fs.inode(ino)
            if child.kind == "dir":
                if ino in visited:
                    yield Entry(rel, "dir", child, "a directory that is already in the tree (a loop, or a "
                                "hard-linked directory)")
                    continue
                if depth + 1 > max_depth:
                    yield Entry(rel, "dir", child, f"deeper than {max_depth} directories")
                    continue
                visited.add(ino)
                children.append((rel, child))
            yield Entry(rel, child.kind, child)
        stack.extend((rel + "/", child, depth + 1) for rel, child in reversed(children))


