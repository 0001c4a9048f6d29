#!/usr/bin/env python3
"""Build the small initrd that loads virtio drivers and switches to the real root.

Stdlib only, and runnable as a script, because the Nix front end (``nix/flake.nix``) runs
this same file to build its initrd; both builders therefore produce the same boot path.
So it cannot import mvm's process runner: a caller in mvm passes its ``Runner`` in
(``runner=``), and the one tool run here (``zstd``, for ``.ko.zst`` modules) then runs
through it, failing with mvm's errors (a missing tool with its install hint); without one
(the script) it runs with :class:`ScriptRunner`.

Distribution kernels build virtio-blk, virtio-net and virtio-console as modules, so the
kernel cannot mount an ext4 root on /dev/vda by itself. The initrd holds a static busybox,
only the needed modules (with their dependencies, in load order) and a ``/init`` that
loads them, waits for the root disk, mounts it and ``switch_root``s to ``init=``.

Usage: initrd.py --modules DIR --busybox PATH --out FILE [--want mod ...]
"""

from __future__ import annotations

import argparse
import io
import lzma
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from typing import Protocol

#: Modules the guest needs; any that are built in (or absent) are skipped. Debian's cloud
#: kernel builds ext4 in; nixpkgs' kernels build it (and the crc32c it checksums with) as
#: modules, which the root mount then needs from the initrd.
WANTED_MODULES = [
    "virtio_pci", "virtio_blk", "virtio_net", "virtio_console",
    "button", "evdev", "crc32c_generic", "crc32c_intel", "ext4",
]

INIT_SCRIPT = r"""#!/bin/sh
B=/bin/busybox
$B mount -t devtmpfs devtmpfs /dev
$B mount -t proc proc /proc
$B modprobe -a @MODULES@ 2>/dev/null
root=/dev/vda; init=/sbin/init; mode=rw
for arg in $($B cat /proc/cmdline); do
  case "$arg" in
    root=*) root="${arg#root=}" ;;
    init=*) init="${arg#init=}" ;;
    ro) mode=ro ;;
  esac
done
n=0
while [ ! -b "$root" ]; do
  n=$((n+1))
  if [ $n -gt 2000 ]; then
    echo "mvm-initrd: root device $root did not appear"; $B poweroff -f
  fi
  $B usleep 5000
done
$B mkdir -p /newroot
if ! $B mount -t ext4 -o $mode "$root" /newroot; then
  echo "mvm-initrd: cannot mount $root"; $B poweroff -f
fi
$B umount /proc
$B mount --move /dev /newroot/dev
exec $B switch_root /newroot "$init"
"""


def parse_modules_dep(text: str) -> dict[str, list[str]]:
    deps: dict[str, list[str]] = {}
    for line in text.splitlines():
        if ":" not in line:
            continue
        mod, _, rest = line.partition(":")
        deps[mod.strip()] = rest.split()
    return deps


def module_name(path: str) -> str:
    base = os.path.basename(path)
    for suffix in (".ko.xz", ".ko.zst", ".ko.gz", ".ko"):
        if base.endswith(suffix):
            base = base[: -len(suffix)]
            break
    return base.replace("-", "_")


def load_order(wanted: list[str], deps: dict[str, list[str]]) -> list[str]:
    """Module paths for ``wanted`` and their dependencies, dependencies first."""
    by_name = {module_name(p): p for p in deps}
    order: list[str] = []
    seen: set[str] = set()

    def visit(path: str) -> None:
        if path in seen:
            return
        seen.add(path)
        for dep in deps.get(path, []):
            visit(dep)
        order.append(path)

    for name in wanted:
        path = by_name.get(name.replace("-", "_"))
        if path is not None:
            visit(path)
    return order


class ToolRunner(Protocol):
    """What this module needs of a runner: mvm's ``Runner`` is one, :class:`ScriptRunner`
    another."""

    def run(self, argv: Sequence[str], *, desc: str, hint: str | None = None) -> object: ...


class ToolError(RuntimeError):
    """A tool is missing or failed (only when run as a script: mvm's runner raises its own)."""


class ScriptRunner:
    """Runs a tool with the stdlib, for the script outside mvm (the Nix builder)."""

    def run(self, argv: Sequence[str], *, desc: str, hint: str | None = None) -> object:
        try:
            proc = subprocess.run(list(argv), stdin=subprocess.DEVNULL, capture_output=True, check=False)
        except FileNotFoundError:
            raise ToolError(f"{desc}: `{argv[0]}` is not installed or not on PATH") from None
        if proc.returncode != 0:
            tail = (proc.stdout + proc.stderr).decode(errors="replace").strip()
            raise ToolError(f"{desc} failed (exit code {proc.returncode})" + (f": {tail}" if tail else ""))
        return proc


def _module_bytes(path: str, runner: ToolRunner) -> bytes:
    if path.endswith(".xz"):
        with lzma.open(path) as f:
            return f.read()
    if path.endswith(".zst"):
        with tempfile.TemporaryDirectory(prefix="mvm-initrd-") as tmp:
            dest = os.path.join(tmp, "module.ko")
            runner.run(["zstd", "-d", "-q", path, "-o", dest],
                       desc=f"decompressing kernel module {os.path.basename(path)}",
                       hint=f"check the file with `zstd -t {path}`")
            with open(dest, "rb") as f:
                return f.read()
    if path.endswith(".gz"):
        import gzip

        with gzip.open(path) as f:
            return f.read()
    with open(path, "rb") as f:
        return f.read()


class CpioWriter:
    """A minimal ``newc`` cpio archive writer (what the kernel unpacks as initramfs)."""

    def __init__(self, out: io.BufferedWriter) -> None:
        self.out = out
        self.ino = 1

    def _entry(self, name: str, mode: int, data: bytes = b"") -> None:
        fields = [self.ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(name) + 1, 0]
        header = "070701" + "".join(f"{v:08x}" for v in fields)
        blob = header.encode() + name.encode() + b"\0"
        blob += b"\0" * (-len(blob) % 4)
        blob += data + b"\0" * (-len(data) % 4)
        self.out.write(blob)
        self.ino += 1

    def dir(self, name: str) -> None:
        self._entry(name, stat.S_IFDIR | 0o755)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self._entry(name, stat.S_IFREG | mode, data)

    def symlink(self, name: str, target: str) -> None:
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def close(self) -> None:
        self._entry("TRAILER!!!", 0)


def build_initrd(modules_dir: str, busybox: str, out: str, wanted: list[str] | None = None,
                 runner: ToolRunner | None = None) -> list[str]:
    """Write the initrd to ``out``; return the module paths it loads, in order. Tools run
    through ``runner`` (a caller in mvm passes its own), else with the stdlib."""
    runner = runner or ScriptRunner()
    dep_file = os.path.join(modules_dir, "modules.dep")
    with open(dep_file) as f:
        deps = parse_modules_dep(f.read())
    order = load_order(wanted or WANTED_MODULES, deps)
    flat = [os.path.basename(p).split(".ko")[0] + ".ko" for p in order]
    flat_of = dict(zip(order, flat, strict=True))
    # One `modprobe -a` loads them all (one process instead of an insmod per module); it
    # reads a modules.dep in /lib/modules/<uname -r>.
    version = os.path.basename(os.path.normpath(modules_dir))
    dep_lines = [f"{flat_of[p]}: {' '.join(flat_of[d] for d in deps.get(p, []) if d in flat_of)}".rstrip()
                 for p in order]
    tmp = f"{out}.{os.getpid()}.tmp"
    try:
        with open(tmp, "wb") as raw:
            cpio = CpioWriter(raw)
            for d in ("bin", "dev", "proc", "sys", "newroot", "lib", "lib/modules", f"lib/modules/{version}"):
                cpio.dir(d)
            with open(busybox, "rb") as f:
                cpio.file("bin/busybox", f.read(), 0o755)
            cpio.symlink("bin/sh", "busybox")
            for path, name in zip(order, flat, strict=True):
                cpio.file(f"lib/modules/{version}/{name}", _module_bytes(os.path.join(modules_dir, path), runner))
            cpio.file(f"lib/modules/{version}/modules.dep", ("\n".join(dep_lines) + "\n").encode())
            names = " ".join(module_name(p) for p in order)
            cpio.file("init", INIT_SCRIPT.replace("@MODULES@", names).encode(), 0o755)
            cpio.close()
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return order


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--modules", required=True, help="the kernel's lib/modules/<version> dir")
    ap.add_argument("--busybox", default=shutil.which("busybox"), help="a static busybox")
    ap.add_argument("--out", required=True)
    ap.add_argument("--want", nargs="*", default=None)
    args = ap.parse_args()
    if not args.busybox:
        ap.error("no busybox found; pass --busybox")
    try:
        build_initrd(args.modules, args.busybox, args.out, args.want)
    except ToolError as exc:
        sys.exit(f"{ap.prog}: error: {exc}")


if __name__ == "__main__":
    main()
