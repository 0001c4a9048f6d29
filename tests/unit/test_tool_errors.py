"""The decompressors the kernel and initrd builders run go through mvm's process runner:
a missing or failing ``zstd`` is an mvm error (a missing one with how to install it), not a
traceback. No VM: fake tools in a temp dir, and PATHs without the real ones."""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from mvm._proc import DEFAULT_RUNNER, INSTALL_HINTS, find_tool
from mvm.builders import initrd, kernel, vmlinux
from mvm.errors import BuildError, CommandFailed, MvmError, ToolMissing

INITRD_PY = Path(initrd.__file__)


@pytest.fixture()
def bare_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A PATH holding only an empty dir (add fake tools to it)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    monkeypatch.setenv("PATH", str(bin_dir))
    if find_tool("zstd"):  # found in sbin, which mvm also searches
        pytest.skip("zstd is installed in sbin")
    return bin_dir


def _failing_zstd(bin_dir: Path) -> None:
    tool = bin_dir / "zstd"
    tool.write_text("#!/bin/sh\necho 'zstd: /x: unsupported format' >&2\nexit 2\n")
    tool.chmod(0o755)


def _modules(tmp_path: Path, data: bytes = b"not really zstd") -> Path:
    mods = tmp_path / "modules"
    (mods / "kernel").mkdir(parents=True)
    (mods / "kernel" / "virtio_blk.ko.zst").write_bytes(data)
    (mods / "modules.dep").write_text("kernel/virtio_blk.ko.zst:\n")
    (tmp_path / "busybox").write_bytes(b"BB")
    return mods


def _bzimage_with_zstd_payload() -> bytes:
    """A bzImage whose payload claims zstd (magic, body, appended size): enough to pick the tool."""
    payload = b"\x28\xb5\x2f\xfd" + b"\0" * 64 + struct.pack("<I", 4096)
    setup = bytearray(1024)
    setup[0x1F1] = 1
    setup[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", setup, 0x206, 0x020F)
    struct.pack_into("<II", setup, 0x248, 0, len(payload))
    return bytes(setup) + payload


def test_zstd_and_lzop_have_install_hints() -> None:
    assert INSTALL_HINTS["zstd"] == "apt-get install zstd"
    assert INSTALL_HINTS["lzop"] == "apt-get install lzop"


def test_an_initrd_without_zstd_is_tool_missing_with_the_hint(tmp_path: Path, bare_path: Path) -> None:
    mods = _modules(tmp_path)
    with pytest.raises(ToolMissing) as caught:
        initrd.build_initrd(str(mods), str(tmp_path / "busybox"), str(tmp_path / "initrd"), runner=DEFAULT_RUNNER)
    assert "`zstd` is not installed" in caught.value.message
    assert caught.value.hint == "install it: apt-get install zstd"
    assert not (tmp_path / "initrd").exists() and not list(tmp_path.glob("initrd.*.tmp"))


def test_an_initrd_whose_zstd_fails_is_a_command_failure(tmp_path: Path, bare_path: Path) -> None:
    _failing_zstd(bare_path)
    mods = _modules(tmp_path)
    with pytest.raises(CommandFailed) as caught:
        initrd.build_initrd(str(mods), str(tmp_path / "busybox"), str(tmp_path / "initrd"), runner=DEFAULT_RUNNER)
    err = caught.value
    assert isinstance(err, MvmError) and err.returncode == 2
    assert "decompressing kernel module virtio_blk.ko.zst failed (exit code 2)" in err.message
    assert "unsupported format" in (err.output or "") and err.argv[0] == str(bare_path / "zstd")
    assert "zstd -t" in (err.hint or "")
    assert not (tmp_path / "initrd").exists()


@pytest.mark.skipif(not shutil.which("zstd"), reason="zstd is not installed")
def test_an_initrd_gets_its_zstd_modules_decompressed_through_the_runner(tmp_path: Path) -> None:
    module = b"\x7fELF a kernel module" * 100
    packed = subprocess.run(["zstd", "-q", "-c"], input=module, capture_output=True, check=True).stdout
    mods = _modules(tmp_path, packed)
    calls: list[list[str]] = []

    class Recording:
        def run(self, argv: list[str], **kw: object) -> object:
            calls.append([os.fspath(a) for a in argv])
            return DEFAULT_RUNNER.run(argv, **kw)  # type: ignore[arg-type]

    out = tmp_path / "initrd"
    initrd.build_initrd(str(mods), str(tmp_path / "busybox"), str(out), runner=Recording())
    assert [c[0] for c in calls] == ["zstd"]
    assert module in out.read_bytes()


def test_the_initrd_script_says_what_is_missing_without_a_traceback(tmp_path: Path) -> None:
    """Outside mvm (the Nix builder runs it bare) it has no runner: its own error, one line."""
    mods = _modules(tmp_path)
    (tmp_path / "bin").mkdir()
    done = subprocess.run([sys.executable, "-I", str(INITRD_PY), "--modules", str(mods), "--busybox",
                           str(tmp_path / "busybox"), "--out", str(tmp_path / "initrd")],
                          capture_output=True, text=True, cwd="/", env={"PATH": str(tmp_path / "bin")})
    assert done.returncode == 1
    assert "`zstd` is not installed or not on PATH" in done.stderr and "Traceback" not in done.stderr


def test_the_kernel_without_zstd_is_tool_missing_with_the_hint(bare_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    def bypass(tool: str, data: bytes) -> bytes:
        raise AssertionError("mvm ran the decompressor outside its runner")

    monkeypatch.setattr(vmlinux, "run_tool", bypass)
    with pytest.raises(ToolMissing) as caught:
        kernel.extract_vmlinux(_bzimage_with_zstd_payload(), DEFAULT_RUNNER)
    assert caught.value.hint == "install it: apt-get install zstd"


def test_a_kernel_whose_zstd_fails_is_a_build_error(bare_path: Path) -> None:
    _failing_zstd(bare_path)
    with pytest.raises(BuildError) as caught:
        kernel.extract_vmlinux(_bzimage_with_zstd_payload(), DEFAULT_RUNNER)
    assert caught.value.returncode == 2 and "unsupported format" in (caught.value.output or "")


def test_a_child_that_cannot_start_is_an_mvm_error_that_says_why(tmp_path: Path) -> None:
    """Not only a missing program: one that is not executable, or a missing directory to run in."""
    script = tmp_path / "tool"
    script.write_text("#!/bin/sh\necho hi\n")  # no execute bit
    with pytest.raises(MvmError, match="could not be started: Permission denied") as err:
        DEFAULT_RUNNER.run([str(script)], desc="a tool")
    assert err.value.hint == "it must be an executable program that this user may read and run"
    assert not isinstance(err.value, ToolMissing)  # it is there: "reinstall it" would mislead
    with pytest.raises(MvmError, match=f"cannot run true in {tmp_path / 'gone'}: No such file") as gone:
        DEFAULT_RUNNER.spawn(["true"], stdout=subprocess.DEVNULL, cwd=tmp_path / "gone")
    assert not isinstance(gone.value, ToolMissing)
