"""The guest kernel for the Debian front end: Debian's cloud kernel, fetched with apt once.

The package's bzImage is unpacked to an uncompressed ELF ``vmlinux``: QEMU boots that
directly through its PVH entry point, which skips in-guest decompression (about 0.3 s under
TCG). Modules are kept for the initrd, with a ``modules.dep`` made by depmod.
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

from .._proc import Runner, require_tool
from ..errors import BuildError
from . import initrd, vmlinux

log = logging.getLogger(__name__)

KERNEL_META_PACKAGE = "linux-image-cloud-amd64"


@dataclass(frozen=True)
class Kernel:
    version: str  # e.g. 6.1.0-56-cloud-amd64
    root: Path  # cache dir holding vmlinux, modules/<version>/, config

    @property
    def vmlinux(self) -> Path:
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


def ensure_initrd(kernel: Kernel) -> None:
    if not kernel.initrd.is_file():  # build_initrd writes atomically itself
        initrd.build_initrd(str(kernel.modules), require_tool("busybox"), str(kernel.initrd))


def extract_vmlinux(bzimage: bytes, runner: Runner) -> bytes:
    """Unpack the kernel payload embedded in an x86 bzImage (see images/vmlinux.py, which
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


def resolve_package(runner: Runner) -> str:
    out = runner.run(
        ["apt-cache", "depends", KERNEL_META_PACKAGE],
        desc=f"resolving {KERNEL_META_PACKAGE}",
        error=BuildError,
        hint="run `apt-get update` so apt knows the kernel package",
    ).output
    match = re.search(r"Depends:\s+(linux-image-\S+)", out)
    if not match:
        raise BuildError(f"apt did not name a kernel for {KERNEL_META_PACKAGE}", output=out)
    return match.group(1)


def cached_kernels(cache: Path) -> list[Kernel]:
    found = []
    if cache.is_dir():
        for entry in sorted(cache.iterdir()):
            if (entry / "vmlinux").is_file() and (entry / "lib" / "modules" / entry.name).is_dir():
                found.append(Kernel(entry.name, entry))
    return found


def ensure_kernel(cache: Path, runner: Runner, on_stage: Callable[[str], None] | None = None) -> Kernel:
    """The newest cached kernel, or fetch and prepare one (once per version)."""
    have = cached_kernels(cache)
    if have:
        ensure_initrd(have[-1])
        return have[-1]
    if on_stage:
        on_stage("fetching the guest kernel")
    package = resolve_package(runner)
    version = package.removeprefix("linux-image-")
    cache.mkdir(parents=True, exist_ok=True)
    from filelock import FileLock

    with FileLock(str(cache / ".fetch.lock")):  # two first builds download it once
        kernel = Kernel(version, cache / version)
        if not kernel.vmlinux.is_file():
            _fetch(package, version, cache, runner)
        ensure_initrd(kernel)
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
        (staged / "vmlinux").write_bytes(extract_vmlinux(bzimage, runner))
        shutil.copy(unpacked / "boot" / f"config-{version}", staged / "config")
        os.replace(staged, target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
