"""Reading the files of an ext4 volume in Python: the guest wrote every byte of it.

``volume export`` used ``debugfs rdump``, which follows whatever names a directory holds: a
guest (which has raw access to its volume's blocks) renamed an entry to ``../../pwn_mv`` and
rdump wrote outside the export. This reader parses the image itself, read-only, and treats
all of it as hostile:

- names are checked (no ``/``, no NUL, never ``.`` or ``..``) before anything uses them
  (:mod:`.ext4walk` walks the tree);
- every block number is checked against the file system's size, every extent tree and
  block map is walked once per block (a tree that loops or shares blocks is refused), depths
  and counts are capped, and a directory reached twice (a loop, or a hard-linked directory)
  is walked once;
- nothing is followed: symlinks are returned as their target text, device nodes, FIFOs and
  sockets only as what they are;
- the size a regular file claims is capped by the file system's own size, so a crafted size
  cannot make a reader run for days.

What it does not support (inline data, encryption, bigalloc, a journal that still needs
replaying) is refused with :class:`Ext4Error`; so is any structure that does not parse.
Checksums are not verified: a corrupt block gives wrong data, never a write elsewhere.
"""

from __future__ import annotations

import hashlib
import os
import stat
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from .._ext4 import EXT4_MAGIC, INCOMPAT_64BIT, INCOMPAT_RECOVER, SUPERBLOCK_OFFSET

ROOT_INO = 2

COMPAT_SPARSE_SUPER2 = 0x200
INCOMPAT_FILETYPE = 0x2
INCOMPAT_JOURNAL_DEV = 0x8
INCOMPAT_META_BG = 0x10
INCOMPAT_INLINE_DATA = 0x8000
INCOMPAT_DIRDATA = 0x1000
#: incompatible features this reader refuses (the rest do not change how files are found)
INCOMPAT_REFUSED = {INCOMPAT_RECOVER: "a journal that needs replaying", INCOMPAT_JOURNAL_DEV: "an external journal",
                    INCOMPAT_INLINE_DATA: "inline data", INCOMPAT_DIRDATA: "dirdata"}
RO_COMPAT_SPARSE_SUPER = 0x1
RO_COMPAT_BIGALLOC = 0x200

EXT4_EXTENTS_FL = 0x80000
EXT4_INLINE_DATA_FL = 0x10000000
EXT4_ENCRYPT_FL = 0x800
EXTENT_MAGIC = 0xF30A
MAX_EXTENT_DEPTH = 5
UNINIT_LEN = 32768
#: A symlink's target longer than this is not one a host can use (PATH_MAX).
MAX_LINK = 4095
#: The most pieces one file may be in (a legitimate file is in far fewer; memory stays bounded).
MAX_EXTENTS = 1 << 22
READ_CHUNK = 1 << 20
_ZEROS = bytes(READ_CHUNK)


class Ext4Error(Exception):
    """The image is not an ext4 file system this reader can read safely (the message says why)."""


@dataclass(frozen=True)
class Extent:
    logical: int  #: first block of the file it maps
    physical: int  #: first block of the file system
    length: int  #: blocks
    initialized: bool = True  #: an uninitialized extent reads as zeros


@dataclass(frozen=True)
class Inode:
    ino: int
    mode: int
    uid: int
    gid: int
    size: int
    links: int
    flags: int
    mtime_ns: int
    block: bytes  #: i_block: the extent tree root, the block map, or a fast symlink's target

    @property
    def kind(self) -> str:
        """``dir``, ``file``, ``link``, or ``other`` (devices, FIFOs, sockets)."""
        if stat.S_ISDIR(self.mode):
            return "dir"
        if stat.S_ISREG(self.mode):
            return "file"
        if stat.S_ISLNK(self.mode):
            return "link"
        return "other"


class Ext4Image:
    """An ext4 image opened read-only. Use as a context manager."""

    inodes_count: int
    first_data_block: int
    blocks_per_group: int
    inodes_per_group: int
    first_ino: int
    inode_size: int
    compat: int
    incompat: int
    ro_compat: int
    block_size: int
    blocks: int
    desc_size: int
    first_meta_bg: int
    backup_bgs: tuple[int, int]

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            self.image_size = os.fstat(self.fd).st_size
            self._read_superblock()
            self._read_descriptors()
        except BaseException:
            os.close(self.fd)
            raise

    def __enter__(self) -> Ext4Image:
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    # -- raw reads ------------------------------------------------------------------------

    def _pread(self, size: int, offset: int) -> bytes:
        data = os.pread(self.fd, size, offset)
        if len(data) != size:
            raise Ext4Error(f"the image ends at {self.image_size} bytes, inside its own file system")
        return data

    def read_block(self, block: int) -> bytes:
        self._check_block(block, 1)
        return self._pread(self.block_size, block * self.block_size)

    def _check_block(self, block: int, count: int) -> None:
        if block < 0 or count < 0 or block + count > self.blocks:
            raise Ext4Error(f"block {block} (+{count}) is outside the file system ({self.blocks} blocks)")

    # -- superblock and group descriptors -------------------------------------------------

    def _read_superblock(self) -> None:
        sb = os.pread(self.fd, 1024, SUPERBLOCK_OFFSET)
        if len(sb) < 1024 or struct.unpack_from("<H", sb, 0x38)[0] != EXT4_MAGIC:
            raise Ext4Error("not an ext2/3/4 file system")
        self.inodes_count, blocks_lo = struct.unpack_from("<II", sb, 0x0)
        self.first_data_block, log_block = struct.unpack_from("<II", sb, 0x14)
        self.blocks_per_group = struct.unpack_from("<I", sb, 0x20)[0]
        self.inodes_per_group = struct.unpack_from("<I", sb, 0x28)[0]
        rev = struct.unpack_from("<I", sb, 0x4C)[0]
        self.first_ino, self.inode_size = (11, 128) if rev == 0 else struct.unpack_from("<IH", sb, 0x54)
        self.compat, self.incompat, self.ro_compat = struct.unpack_from("<III", sb, 0x5C)
        if log_block > 6:
            raise Ext4Error(f"block size 1024 << {log_block} is not one ext4 uses")
        self.block_size = 1024 << log_block
        self.blocks = blocks_lo
        if self.incompat & INCOMPAT_64BIT:
            self.blocks |= struct.unpack_from("<I", sb, 0x150)[0] << 32
            self.desc_size = struct.unpack_from("<H", sb, 0xFE)[0]
            if self.desc_size < 64 or self.desc_size > self.block_size or self.desc_size & (self.desc_size - 1):
                raise Ext4Error(f"group descriptor size {self.desc_size} is invalid")
        else:
            self.desc_size = 32
        self.first_meta_bg = struct.unpack_from("<I", sb, 0x104)[0]
        self.backup_bgs = struct.unpack_from("<II", sb, 0x24C)
        for flag, what in INCOMPAT_REFUSED.items():
            if self.incompat & flag:
                raise Ext4Error(f"the file system uses {what}, which mvm cannot read safely")
        if self.ro_compat & RO_COMPAT_BIGALLOC:
            raise Ext4Error("the file system uses bigalloc, which mvm cannot read")
        if self.blocks * self.block_size > self.image_size:
            raise Ext4Error(f"the file system claims {self.blocks * self.block_size} bytes; the image has "
                            f"{self.image_size}")
        if (self.blocks_per_group == 0 or self.inodes_per_group == 0 or self.first_data_block >= self.blocks
                or self.blocks_per_group > 8 * self.block_size or self.inodes_per_group > 8 * self.block_size):
            raise Ext4Error("the superblock's group geometry is invalid")
        if self.inode_size < 128 or self.inode_size > self.block_size or self.inode_size & (self.inode_size - 1):
            raise Ext4Error(f"inode size {self.inode_size} is invalid")
        self.groups = -(-(self.blocks - self.first_data_block) // self.blocks_per_group)
        if self.inodes_count > self.groups * self.inodes_per_group:
            raise Ext4Error("the superblock counts more inodes than its groups hold")

    def _has_super(self, group: int) -> bool:
        if group == 0:
            return True
        if self.compat & COMPAT_SPARSE_SUPER2:
            return group in self.backup_bgs
        if not self.ro_compat & RO_COMPAT_SPARSE_SUPER or group == 1:
            return True
        for base in (3, 5, 7):
            n = base
            while n < group:
                n *= base
            if n == group:
                return True
        return False

    def _descriptor_block(self, index: int) -> int:
        per_block = self.block_size // self.desc_size
        if not self.incompat & INCOMPAT_META_BG or index < self.first_meta_bg:
            return self.first_data_block + 1 + index
        group = per_block * index
        return self.first_data_block + group * self.blocks_per_group + (1 if self._has_super(group) else 0)

    def _read_descriptors(self) -> None:
        per_block = self.block_size // self.desc_size
        self.inode_tables: list[int] = []
        for index in range(-(-self.groups // per_block)):
            block = self.read_block(self._descriptor_block(index))
            for slot in range(min(per_block, self.groups - index * per_block)):
                raw = block[slot * self.desc_size:(slot + 1) * self.desc_size]
                table = struct.unpack_from("<I", raw, 0x8)[0]
                if self.desc_size >= 64:
                    table |= struct.unpack_from("<I", raw, 0x28)[0] << 32
                table_blocks = -(-self.inodes_per_group * self.inode_size // self.block_size)
                self._check_block(table, table_blocks)
                self.inode_tables.append(table)

    # -- inodes ---------------------------------------------------------------------------

    def inode(self, ino: int) -> Inode:
        if not 1 <= ino <= self.inodes_count:
            raise Ext4Error(f"inode {ino} does not exist (the file system has {self.inodes_count})")
        group, index = divmod(ino - 1, self.inodes_per_group)
        raw = self._pread(self.inode_size, self.inode_tables[group] * self.block_size + index * self.inode_size)
        mode, uid_lo, size_lo = struct.unpack_from("<HHI", raw, 0x0)
        mtime = struct.unpack_from("<i", raw, 0x10)[0]
        gid_lo, links = struct.unpack_from("<HH", raw, 0x18)
        flags = struct.unpack_from("<I", raw, 0x20)[0]
        size_hi = struct.unpack_from("<I", raw, 0x6C)[0]
        uid_hi, gid_hi = struct.unpack_from("<HH", raw, 0x78)
        mtime_ns = mtime * 1_000_000_000
        if self.inode_size > 128:
            extra = struct.unpack_from("<H", raw, 0x80)[0]
            if extra >= 12 and 128 + extra <= self.inode_size:
                mtime_extra = struct.unpack_from("<I", raw, 0x88)[0]
                mtime_ns = ((mtime + ((mtime_extra & 3) << 32)) * 1_000_000_000
                            + min(mtime_extra >> 2, 999_999_999))
        return Inode(ino=ino, mode=mode, uid=uid_lo | uid_hi << 16, gid=gid_lo | gid_hi << 16,
                     size=size_lo | size_hi << 32, links=links, flags=flags, mtime_ns=mtime_ns,
                     block=raw[0x28:0x28 + 60])

    # -- block mapping --------------------------------------------------------------------

    def extents(self, inode: Inode) -> list[Extent]:
        """Where the file's blocks are, in logical order (holes are gaps). Every block of the
        map is read once; a map that reaches outside the file system, loops or shares blocks
        raises :class:`Ext4Error`."""
        if inode.flags & EXT4_INLINE_DATA_FL:
            raise Ext4Error(f"inode {inode.ino} keeps its data inline, which mvm cannot read")
        if inode.flags & EXT4_ENCRYPT_FL:
            raise Ext4Error(f"inode {inode.ino} is encrypted")
        limit = -(-inode.size // self.block_size)
        found = self._extent_tree(inode) if inode.flags & EXT4_EXTENTS_FL else self._block_map(inode, limit)
        found.sort(key=lambda e: e.logical)
        out: list[Extent] = []
        end = 0
        for ext in found:
            if ext.logical < end:
                raise Ext4Error(f"inode {inode.ino} maps a block of the file twice")
            if ext.logical >= limit:
                break  # preallocated beyond the end of the file
            length = min(ext.length, limit - ext.logical)
            out.append(Extent(ext.logical, ext.physical, length, ext.initialized))
            end = ext.logical + ext.length
        return out

    def _extent_tree(self, inode: Inode) -> list[Extent]:
        out: list[Extent] = []
        seen: set[int] = set()
        stack: list[tuple[bytes, int]] = [(inode.block, -1)]
        while stack:
            node, expect_depth = stack.pop()
            magic, entries, capacity, depth = struct.unpack_from("<HHHH", node, 0)
            if magic != EXTENT_MAGIC:
                raise Ext4Error(f"inode {inode.ino}: an extent tree node has no magic")
            if depth > MAX_EXTENT_DEPTH or (expect_depth >= 0 and depth != expect_depth):
                raise Ext4Error(f"inode {inode.ino}: extent tree depth {depth} is invalid")
            if entries > capacity or 12 + 12 * capacity > len(node):
                raise Ext4Error(f"inode {inode.ino}: an extent tree node claims {entries} entries")
            for i in range(entries):
                off = 12 + 12 * i
                if depth == 0:
                    logical, length, start_hi, start_lo = struct.unpack_from("<IHHI", node, off)
                    initialized = length <= UNINIT_LEN
                    length = length if initialized else length - UNINIT_LEN
                    physical = start_lo | start_hi << 32
                    if length:
                        self._check_block(physical, length)
                        out.append(Extent(logical, physical, length, initialized))
                        if len(out) > MAX_EXTENTS:
                            raise Ext4Error(f"inode {inode.ino} is in more than {MAX_EXTENTS} pieces")
                else:
                    _, leaf_lo, leaf_hi = struct.unpack_from("<IIH", node, off)
                    leaf = leaf_lo | leaf_hi << 32
                    if leaf in seen:
                        raise Ext4Error(f"inode {inode.ino}: its extent tree reaches block {leaf} twice")
                    seen.add(leaf)
                    stack.append((self.read_block(leaf), depth - 1))
        return out

    def _block_map(self, inode: Inode, limit: int) -> list[Extent]:
        """The ext2/3 map: 12 direct blocks, then single, double and triple indirect ones."""
        ptrs = struct.unpack_from("<15I", inode.block, 0)
        per = self.block_size // 4
        out: list[Extent] = []
        seen: set[int] = set()

        def add(logical: int, physical: int) -> None:
            if physical and logical < limit:
                self._check_block(physical, 1)
                if out and out[-1].logical + out[-1].length == logical and \
                        out[-1].physical + out[-1].length == physical:
                    last = out.pop()
                    out.append(Extent(last.logical, last.physical, last.length + 1))
                else:
                    out.append(Extent(logical, physical, 1))
                    if len(out) > MAX_EXTENTS:
                        raise Ext4Error(f"inode {inode.ino} is in more than {MAX_EXTENTS} pieces")

        for i in range(12):
            add(i, ptrs[i])
        start, span = 12, 1
        for level, root in enumerate(ptrs[12:15], start=1):
            span = per ** level
            stack = [(root, level, start)]
            while stack:
                block, lvl, first = stack.pop()
                if not block or first >= limit:
                    continue
                if block in seen:
                    raise Ext4Error(f"inode {inode.ino}: its block map reaches block {block} twice")
                seen.add(block)
                children = struct.unpack(f"<{per}I", self.read_block(block))
                step = per ** (lvl - 1)
                if lvl == 1:
                    for j, child in enumerate(children):
                        add(first + j, child)
                else:
                    stack.extend((child, lvl - 1, first + j * step) for j, child in enumerate(children)
                                 if child)
            start += span
        return out

    # -- contents -------------------------------------------------------------------------

    def allocated(self, inode: Inode) -> int:
        """Bytes of the file that hold data (holes and uninitialized extents do not)."""
        return sum(e.length for e in self.extents(inode) if e.initialized) * self.block_size

    def runs(self, inode: Inode) -> Iterator[tuple[int, bytes]]:
        """``(offset, data)`` of the file's data, in order, in chunks of at most 1 MiB;
        holes are left out (they read as zeros)."""
        per_chunk = max(1, READ_CHUNK // self.block_size)
        for ext in self.extents(inode):
            if not ext.initialized:
                continue
            done = 0
            while done < ext.length:
                count = min(per_chunk, ext.length - done)
                offset = (ext.logical + done) * self.block_size
                if offset >= inode.size:
                    return
                data = self._pread(count * self.block_size, (ext.physical + done) * self.block_size)
                yield offset, data[: inode.size - offset]
                done += count

    def digest(self, inode: Inode) -> str:
        """``sha256:…`` of the file's contents, holes included (as zeros)."""
        h = hashlib.sha256()
        pos = 0
        for offset, data in self.runs(inode):
            hash_zeros(h, offset - pos)
            h.update(data)
            pos = offset + len(data)
        hash_zeros(h, inode.size - pos)
        return "sha256:" + h.hexdigest()

    def read_link(self, inode: Inode) -> bytes:
        """A symlink's target (the bytes; not followed, not checked)."""
        if inode.size > MAX_LINK:
            raise Ext4Error(f"symlink inode {inode.ino} has a target of {inode.size} bytes")
        if inode.size < 60 and not inode.flags & (EXT4_EXTENTS_FL | EXT4_INLINE_DATA_FL):
            return inode.block[: inode.size]
        data = b"".join(chunk for _, chunk in self.runs(inode))
        return data.ljust(inode.size, b"\0")[: inode.size]

    def entries(self, inode: Inode) -> Iterator[tuple[bytes, int]]:
        """``(name, inode number)`` of a directory's entries, ``.`` and ``..`` left out (and so
        is anything else by those names). Names are not checked here: see :func:`check_name`."""
        for _, data in self.runs(inode):
            for start in range(0, len(data), self.block_size):
                block = data[start:start + self.block_size]
                pos = 0
                while pos + 8 <= len(block):
                    ino, rec_len, name_len, _type = struct.unpack_from("<IHBB", block, pos)
                    if not self.incompat & INCOMPAT_FILETYPE:
                        name_len |= _type << 8
                    if rec_len in (0, 65535) and self.block_size == 65536:
                        rec_len = 65536
                    if rec_len < 8 or rec_len % 4 or pos + rec_len > len(block) or 8 + name_len > rec_len:
                        raise Ext4Error(f"directory inode {inode.ino} has a corrupt entry")
                    name = block[pos + 8:pos + 8 + name_len]
                    if ino and name not in (b".", b".."):
                        yield name, ino
                    pos += rec_len


def hash_zeros(h: hashlib._Hash, count: int) -> None:
    """Feed ``count`` zero bytes (a hole) to ``h``."""
    while count > 0:
        step = min(count, READ_CHUNK)
        h.update(_ZEROS[:step])
        count -= step
