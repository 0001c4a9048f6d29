"""The guest kernel for the Debian front end: Debian's cloud kernel, fetched with apt once.

The x86_64 package's bzImage is unpacked to an uncompressed ELF ``vmlinux``: QEMU boots that
directly through its PVH entry point, which skips in-guest decompression (about 0.3 s under
TCG). The arm64 package's ``vmlinuz`` is already an uncompressed ``Image``, booted as it is.
Modules are kept for the initrd, with a ``modules.dep`` made by depmod.

Kernels are cached per architecture (``kernels/<arch>/<version>``): the newest cached one is
picked by name, and ``…-cloud-arm64`` sorts after ``…-cloud-amd64``.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .._locks import locked
from .._proc import Runner
from ..errors import BuildError
from ..names import Arch
from . import arches, initrd, vmlinux

log = logging.getLogger(__name__)


def meta_package(arch: Arch) -> str:
    return f"linux-image-cloud-{arches.debian(arch)}"


@dataclass(frozen=True)
class Kernel:
    version: str  # e.g. 6.1.0-56-cloud-amd64
    root: Path  # cache dir holding vmlinux, modules/<version>/, config
    arch: Arch = "x86_64"

    @property
    def vmlinux(self) -> Path:
        """The file QEMU boots: an ELF vmlinux (x86_64) or the arm64 Image as it is."""
        return self.root / "vmlinux"

    @property
    def modules(self) -> Path:
        return self.root / "lib" / "modules" / self.version

    @property
    def initrd(self) -> Path:
        """Named by the digest of initrd.py, so a changed initrd builder makes a new one."""
        return self.root / f"initrd-{initrd_digest()[:16]}"


@functools.cache
def initrd_digest() -> str:
    return hashlib.sha256(Path(initrd.__file__).read_bytes()).hexdigest()


def ensure_initrd(kernel: Kernel, runner: Runner) -> None:
    if not kernel.initrd.is_file():  # build_initrd writes atomically itself
        write_initrd(kernel, kernel.initrd, runner)


def write_initrd(kernel: Kernel, out: Path, runner: Runner, modules: list[str] | None = None) -> None:
    """An initrd for ``kernel`` that loads ``modules`` (default: the usual ones), with the
    busybox of the kernel's architecture (never a foreign one) and tools run by ``runner``."""
    busybox = arches.busybox(kernel.root, kernel.arch, runner)
    initrd.build_initrd(str(kernel.modules), busybox, str(out), modules, runner=runner)


def extract_vmlinux(bzimage: bytes, runner: Runner) -> bytes:
    """Unpack the kernel payload embedded in an x86 bzImage (see builders/vmlinux.py, which
    mkGuest also runs as a script)."""
    try:
        return vmlinux.extract(bzimage, external=lambda tool, data: _decompress_with(runner, tool, data))
    except vmlinux.KernelFormatError as exc:
        raise BuildError(f"cannot unpack the kernel: {exc}") from None


def _decompress_with(runner: Runner, tool: str, payload: bytes) -> bytes:
    """lz4 and zstd are not in the stdlib; run the tool on temp files (output is binary)."""
    with tempfile.TemporaryDirectory() as tmp:
        src, dest = Path(tmp, "in"), Path(tmp, "out")
        src.write_bytes(payload)
        argv = [tool, "-d", "-q", str(src), str(dest)]
        if tool == "zstd":
            argv = [tool, "-d", "-q", str(src), "-o", str(dest)]
        # lz4 exits 1 on the legacy frame's trailing size field; the ELF check below decides.
        runner.run(argv, desc="decompressing the kernel", error=BuildError, ok_codes=(0, 1))
        return dest.read_bytes()


def resolve_package(runner: Runner, arch: Arch = "x86_64") -> str:
    meta = meta_package(arch)
    deb = arches.debian(arch)
    out = runner.run(
        ["apt-cache", "depends", f"{meta}:{deb}"],
        desc=f"resolving {meta}",
        error=BuildError,
        hint="run `apt-get update` so apt knows the kernel package"
        + (f" (and `dpkg --add-architecture {deb}` first: scripts/setup.sh does both)" if arches.foreign(arch) else ""),
    ).output
    match = re.search(r"Depends:\s+(linux-image-[^\s:]+)", out)  # apt may add ":arm64"
    if not match:
        raise BuildError(f"apt did not name a kernel for {meta}", output=out)
    return match.group(1)


def cached_kernels(cache: Path, arch: Arch | None = None) -> list[Kernel]:
    """The kernels of ``arch`` (default: the host's) cached under ``cache``, oldest first."""
    arch = arches.resolve(arch)
    root = cache / arch
    found = []
    if root.is_dir():
        for entry in sorted(root.iterdir()):
            if (entry / "vmlinux").is_file() and (entry / "lib" / "modules" / entry.name).is_dir():
                found.append(Kernel(entry.name, entry, arch))
    return found


def ensure_kernel(cache: Path, runner: Runner, on_stage: Callable[[str], None] | None = None,
                  arch: Arch | None = None) -> Kernel:
    """The newest cached kernel of ``arch`` (default: the host's), or fetch and prepare one
    (once per version)."""
    arch = arches.resolve(arch)
    have = cached_kernels(cache, arch)
    if have:
        ensure_initrd(have[-1], runner)
        return have[-1]
    if on_stage:
        on_stage(f"fetching the guest kernel ({arches.debian(arch)})")
    package = resolve_package(runner, arch)
    version = package.removeprefix("linux-image-")
    root = cache / arch
    root.mkdir(parents=True, exist_ok=True)
    with locked(root / ".fetch.lock"):  # two first builds download it once
        kernel = Kernel(version, root / version, arch)
        if not kernel.vmlinux.is_file():
            _fetch(f"{package}:{arches.debian(arch)}", version, root, runner)
        ensure_initrd(kernel, runner)
    log.info("kernel %s ready in %s", version, kernel.root)
    return kernel


def _fetch(package: str, version: str, cache: Path, runner: Runner) -> None:
    target = cache / version
    work = Path(tempfile.mkdtemp(prefix=".kernel-", dir=cache))
    try:
        runner.run(
            ["apt-get", "download", "-o", "APT::Sandbox::User=root", package],
            desc=f"downloading {package}",
            cwd=work,
            error=BuildError,
            hint="check network access to the Debian mirror, and run `apt-get update`",
        )
        deb = next(work.glob("*.deb"), None)
        if deb is None:
            raise BuildError(f"apt-get download {package} produced no .deb file")
        unpacked = work / "x"
        runner.run(["dpkg-deb", "-x", deb, unpacked], desc="unpacking the kernel", error=BuildError)
        staged = work / "out"
        (staged / "lib" / "modules").mkdir(parents=True)
        shutil.move(unpacked / "lib" / "modules" / version, staged / "lib" / "modules" / version)
        runner.run(
            ["depmod", "-b", staged, version],
            desc="indexing kernel modules",
            error=BuildError,
        )
        bzimage = (unpacked / "boot" / f"vmlinuz-{version}").read_bytes()
        booted = bzimage if arches.is_arm64_image(bzimage) else extract_vmlinux(bzimage, runner)
        (staged / "vmlinux").write_bytes(booted)
        shutil.copy(unpacked / "boot" / f"config-{version}", staged / "config")
        os.replace(staged, target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
