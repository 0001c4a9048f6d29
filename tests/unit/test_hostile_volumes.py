"""`volume export` of images a hostile guest crafted: nothing is ever written outside the
destination, whatever the image holds (issue 11, item 3). The images are built here with
mkfs.ext4, debugfs -w and raw edits of directory entries (see tests/hostile.py)."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest

from mvm._confine import confined
from mvm._proc import DEFAULT_RUNNER
from mvm.errors import VolumeError
from mvm.volumes import export
from mvm.volumes.export import export_image
from mvm.volumes.ext4read import Ext4Error, Ext4Image

from ..hostile import debugfs, inode_of, make_image, rename_raw


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.fixture()
def box(tmp_path: Path) -> Path:
    """Where the export goes (``box/out``), with room around it to catch escapes."""
    (tmp_path / "box").mkdir()
    return tmp_path / "box"


def _export(image: Path, dest: Path, force: bool = False) -> export.ExportResult:
    return export_image(image, dest, dest.parent / "baseline.json", force=force)


def test_names_with_slash_or_dotdot_are_never_followed(tmp_path: Path, box: Path) -> None:
    """The reproduced hole: an entry renamed on the raw image to ../../pwn_mv made
    `debugfs rdump` write two levels above the export."""
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "AAAAAApwn_mv").write_text("escaped\n")
    (src / "sub" / "aXb").write_text("slash\n")
    (src / "sub" / "ZZ").write_text("dotdot\n")
    (src / "sub" / "Z").write_text("dot\n")
    (src / "ok.txt").write_text("fine\n")
    image = tmp_path / "vol.ext4"
    make_image(image, src)
    rename_raw(image, b"AAAAAApwn_mv", b"../../pwn_mv")
    rename_raw(image, b"aXb", b"a/b")
    rename_raw(image, b"\x02\x01ZZ", b"\x02\x01..")  # name_len 2, type 1 (a file): a second '..'
    rename_raw(image, b"\x01\x01Z", b"\x01\x01.")  # and a second '.': both are left out
    before = _tree(tmp_path)

    result = _export(image, box / "out")
    assert (box / "out" / "ok.txt").read_text() == "fine\n"
    assert _tree(tmp_path) - before == {"box/out", "box/out/ok.txt", "box/out/sub", "box/baseline.json"}
    reasons = "\n".join(result.skipped)
    assert "sub/../../pwn_mv: a name containing '/'" in reasons
    assert "sub/a/b: a name containing '/'" in reasons
    assert not list(tmp_path.parent.rglob("pwn_mv"))  # not here, nor in any sibling test dir


def test_the_exact_reproduction_name(tmp_path: Path, box: Path) -> None:
    src = tmp_path / "src"
    (src / "a" / "b").mkdir(parents=True)
    (src / "a" / "b" / "PLACEHOLDER0").write_text("x")
    image = tmp_path / "vol.ext4"
    make_image(image, src)
    rename_raw(image, b"PLACEHOLDER0", b"../../pwn_mv")
    result = _export(image, box / "out")
    assert result.skipped == ["a/b/../../pwn_mv: a name containing '/': no file system makes one (crafted on the "
                              "raw disk?)"]
    assert not list(tmp_path.rglob("pwn_mv"))


def test_special_files_setuid_hard_links_and_links(tmp_path: Path, box: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "tool").write_text("#!/bin/sh\n")
    (src / "data").write_text("shared\n")
    (src / "rel-link").symlink_to("data")
    (src / "abs-link").symlink_to("/etc/shadow")
    (src / "up-link").symlink_to("../../etc")
    (src / "d").mkdir()
    (src / "d" / "inner-link").symlink_to("../data")
    image = tmp_path / "vol.ext4"
    make_image(image, src)
    debugfs(image, "mknod null c 1 3", "mknod disk b 8 0", "mknod pipe p",  # (debugfs would keep a "/")
            "sif /tool mode 0106755", "ln /data /d/hard", "sif /data links_count 2")
    result = _export(image, box / "out")
    out = box / "out"
    skipped = {line.split(":")[0]: line for line in result.skipped}
    assert set(skipped) == {"null", "disk", "pipe", "abs-link", "up-link"}
    assert "a character device" in skipped["null"] and "a FIFO" in skipped["pipe"]
    assert "outside the export" in skipped["abs-link"]
    assert stat.S_IMODE(os.stat(out / "tool").st_mode) == 0o755  # setuid and setgid dropped
    assert os.readlink(out / "rel-link") == "data" and os.readlink(out / "d" / "inner-link") == "../data"
    # a hard link becomes a copy of its own
    assert (out / "d" / "hard").read_text() == "shared\n"
    assert os.stat(out / "d" / "hard").st_ino != os.stat(out / "data").st_ino
    assert sorted(p.name for p in out.iterdir()) == ["d", "data", "rel-link", "tool"]


def test_a_directory_linked_twice_is_exported_once(tmp_path: Path, box: Path) -> None:
    src = tmp_path / "src"
    (src / "a").mkdir(parents=True)
    (src / "a" / "f").write_text("once\n")
    image = tmp_path / "vol.ext4"
    make_image(image, src)
    debugfs(image, "ln /a /a/loop", "ln / /a/root")  # a loop, and the root again
    result = _export(image, box / "out")
    assert _tree(box / "out") == {"a", "a/f"}
    assert sorted(s.split(":")[0] for s in result.skipped) == ["a/loop", "a/root"]


def test_a_crafted_size_and_a_file_bigger_than_the_free_space(tmp_path: Path, box: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "huge").write_text("x")
    (src / "dense").write_bytes(os.urandom(6 << 20))
    with open(src / "sparse", "wb") as f:  # sparse, within the volume's size: kept sparse
        f.seek(20 << 20)
        f.write(b"end")
    image = tmp_path / "vol.ext4"
    make_image(image, src)
    debugfs(image, "sif /huge size 0x4000000000000")  # 1 PiB of holes
    debugfs(image, "sif /sparse size 0x80000000")  # `truncate -s 2G` on a 32 MiB volume: a real sparse file
    # the destination's file system has 36 MiB free: the 6 MiB file does not fit beside the reserve
    real = os.statvfs

    def small(path: object) -> os.statvfs_result:
        st = real(path)  # type: ignore[arg-type]
        fields = list(st)
        fields[0] = fields[1] = 4096  # f_bsize, f_frsize
        fields[2], fields[3], fields[4] = 1 << 20, 9216, 9216  # 4 GiB, 36 MiB free
        return os.statvfs_result(fields)

    monkeypatch.setattr(export.os, "statvfs", small)
    with pytest.raises(VolumeError) as info:
        _export(image, box / "out")
    assert "nothing was written" in info.value.message and "MiB free" in info.value.message
    assert not (box / "out").exists() and not list(box.iterdir())
    monkeypatch.undo()
    result = _export(image, box / "out")
    assert [s.split(":")[0] for s in result.skipped] == ["huge"]
    assert "more than 64 times the whole volume" in result.skipped[0]
    st = os.stat(box / "out" / "sparse")
    assert st.st_size == 2 << 30 and st.st_blocks * 512 < 1 << 20  # the holes stayed holes
    with open(box / "out" / "sparse", "rb") as f:
        f.seek(20 << 20)
        assert f.read(3) == b"end"


def test_a_symlink_swapped_for_a_directory_between_two_exports(tmp_path: Path, box: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    src = tmp_path / "src"
    (src / "real").mkdir(parents=True)
    (src / "real" / "f").write_text("v1\n")
    (src / "a").symlink_to("real")
    image = tmp_path / "vol.ext4"
    make_image(image, src)
    out = box / "out"
    _export(image, out)
    assert os.readlink(out / "a") == "real"
    # the guest swaps the symlink for a directory holding a file; meanwhile the host's symlink
    # points outside (as an older export, or anything else, may have left it)
    debugfs(image, "unlink /a", "mkdir /a", "write /dev/null /a/pwn", "mkdir /real/deeper",
            "write /dev/null /real/deeper/pwn2")
    (out / "a").unlink()
    (out / "a").symlink_to(outside)
    (out / "real" / "deeper").symlink_to(outside)
    for force in (False, True):
        with pytest.raises(VolumeError) as info:
            _export(image, out, force=force)
        assert "nothing was written" in info.value.message
        assert "a: a link on the host, a dir in the volume" in (info.value.output or "")
        assert "real/deeper: a link on the host, a dir in the volume" in (info.value.output or "")
    assert list(outside.iterdir()) == []
    # elsewhere, the same image exports whole
    copy = _export(image, box / "copy")
    assert (box / "copy" / "a" / "pwn").is_file() and not copy.skipped


def test_a_symlink_in_the_way_deeper_down_is_never_followed(tmp_path: Path, box: Path) -> None:
    """A parent component that is a symlink on the host blocks the subtree (O_NOFOLLOW)."""
    outside = tmp_path / "outside"
    outside.mkdir()
    src = tmp_path / "src"
    (src / "d" / "e" / "f").mkdir(parents=True)
    (src / "d" / "e" / "f" / "g").write_text("x")
    image = tmp_path / "vol.ext4"
    make_image(image, src)
    out = box / "out"
    (out / "d").mkdir(parents=True)
    (out / "d" / "e").symlink_to(outside)
    with pytest.raises(VolumeError) as info:
        _export(image, out)
    assert "d/e: a link on the host, a dir in the volume" in (info.value.output or "")
    assert list(outside.iterdir()) == []


def test_names_that_are_odd_but_valid_are_exported(tmp_path: Path, box: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for name in ("line\nbreak", "tab\there", "\x1b[31mred", "caf\xe9".encode("latin-1").decode("latin-1")):
        (src / name).write_text(name)
    (src / os.fsdecode(b"bad-\xff-utf8")).write_text("bytes")
    image = tmp_path / "vol.ext4"
    make_image(image, src)
    result = _export(image, box / "out")
    assert not result.skipped
    assert sorted(os.listdir(box / "out")) == sorted(os.listdir(src))


def test_corrupt_structures_fail_cleanly(tmp_path: Path, box: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "PLACEHOLDER").write_text("x")
    image = tmp_path / "vol.ext4"
    make_image(image, src)
    data = bytearray(image.read_bytes())
    at = data.index(b"PLACEHOLDER")
    data[at - 4:at - 2] = (4000).to_bytes(2, "little")  # rec_len past the block's end
    image.write_bytes(bytes(data))
    with pytest.raises(VolumeError, match="cannot be exported: directory inode 2 has a corrupt entry"):
        _export(image, box / "out")
    assert not (box / "out").exists()


def test_an_extent_tree_that_loops_is_refused(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(os.urandom(64 << 10))
    image = tmp_path / "vol.ext4"
    make_image(image, src)
    ino = inode_of(image, "/f")
    found = subprocess.run(["debugfs", "-R", "ffb 1 6000", str(image)], capture_output=True, text=True).stdout
    free_block = int(found.split()[-1])
    # an index node (depth 1) in a free block whose one entry points to itself
    node = (0xF30A).to_bytes(2, "little") + (1).to_bytes(2, "little") + (340).to_bytes(2, "little") + \
        (1).to_bytes(2, "little") + bytes(4) + bytes(4) + free_block.to_bytes(4, "little") + bytes(4)
    with open(image, "r+b") as f:
        f.seek(free_block * 4096)
        f.write(node.ljust(4096, b"\0"))
    # the inode's root: depth 2, one index entry pointing at that node
    root = [0xF30A | 1 << 16, 4 | 2 << 16, 0, 0, free_block, 0]
    debugfs(image, *(f"sif /f block[{i}] {v}" for i, v in enumerate(root)))
    with Ext4Image(image) as fs, pytest.raises(Ext4Error, match=f"reaches block {free_block} twice"):
        fs.extents(fs.inode(ino))


def test_not_ext4_and_unsupported_features(tmp_path: Path) -> None:
    junk = tmp_path / "junk"
    junk.write_bytes(os.urandom(1 << 20))
    with pytest.raises(Ext4Error, match="not an ext2/3/4"):
        Ext4Image(junk)
    image = tmp_path / "inline.ext4"
    image.write_bytes(b"")
    with open(image, "wb") as f:
        f.truncate(16 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-O", "inline_data", str(image)], check=True)
    with pytest.raises(Ext4Error, match="inline data"):
        Ext4Image(image)
    truncated = tmp_path / "short.ext4"
    make_image(truncated)
    os.truncate(truncated, 4 << 20)
    with pytest.raises(Ext4Error, match="claims"):
        Ext4Image(truncated)


@pytest.mark.skipif(os.geteuid() != 0, reason="dropping privileges needs root")
def test_confined_tools_run_as_nobody_and_leave_nothing(tmp_path: Path) -> None:
    vol = tmp_path / "vol"
    vol.mkdir(mode=0o700)
    image = vol / "disk.ext4"
    make_image(image)
    os.chmod(image, 0o600)
    with confined(image) as tool:
        done = DEFAULT_RUNNER.run(tool.argv("sh", "-c", "id -u; cat /etc/shadow >/dev/null 2>&1 || echo denied; "
                                            f"chmod 666 {tool.name}; (sleep 300 &) ; e2fsck -fn {tool.name} "
                                            ">/dev/null 2>&1 && echo checked"), cwd=tool.cwd, desc="confined")
    assert done.output.split() == ["65534", "denied", "checked"]
    st = os.stat(image)
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o600)  # its owner and mode, whatever the tool did
    assert os.listdir(vol) == ["disk.ext4"]
    survivors = subprocess.run(["pgrep", "-u", "nobody", "-f", "sleep 300"], capture_output=True, text=True)
    assert survivors.stdout == "", "a process of the confined tool outlived it"
