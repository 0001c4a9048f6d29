"""Guest architectures on the image side: their Debian names, what a build for an
architecture that is not the host's needs, and a kernel file's architecture from its bytes.

A Debian build for another architecture (arm64 on an x86_64 host) runs the guest's own
programs while it installs them: dpkg's maintainer scripts and the byte-compilation run as
arm64 binaries. The kernel hands those to ``qemu-aarch64`` (qemu-user-static) through a
``binfmt_misc`` handler, which must be registered (``update-binfmts --enable qemu-aarch64`` on
Debian 12; Debian 13's systemd-binfmt does it from /usr/lib/binfmt.d at boot; without systemd,
a reboot drops it) and mmdebstrap checks for it with ``arch-test``. It works, about 4x
slower than a native build (docs/platforms.md). The initrd needs a busybox of the guest's
architecture too: the host's would make the guest kernel panic (``No working init found``).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from .._proc import Runner, require_tool
from ..errors import BuildError, SpecError
from ..names import ARCHES, Arch, host_arch

#: The kernel's (and mvm's) name of an architecture -> Debian's.
DEBIAN: dict[Arch, str] = {"x86_64": "amd64", "aarch64": "arm64"}
BINFMT = Path("/proc/sys/fs/binfmt_misc")


def resolve(arch: str | None) -> Arch:
    """The guest's architecture: as given, else the host's (which must be one mvm boots)."""
    wanted = arch or host_arch()
    for known in ARCHES:
        if wanted == known:
            return known
    raise SpecError(f"mvm builds x86_64 and aarch64 guests, not {wanted}",
                    hint='set arch = "x86_64" or "aarch64" in mvm.toml' if arch else None)


def debian(arch: Arch) -> str:
    return DEBIAN[arch]


def from_debian(name: str) -> Arch:
    return next((a for a, d in DEBIAN.items() if d == name), "x86_64")


def foreign(arch: Arch) -> bool:
    return arch != host_arch()


#: Where Debian 13's qemu-user-binfmt puts its handlers, for systemd-binfmt (binfmt-support and
#: its update-binfmts no longer register qemu there); Debian 12 registers them with update-binfmts.
BINFMT_D = Path("/usr/lib/binfmt.d")


def register_command(arch: Arch) -> str:
    """The command that registers qemu-user's ``arch`` handler on this host (as root)."""
    conf = BINFMT_D / f"qemu-{arch}.conf"
    if (BINFMT / f"qemu-{arch}").exists():  # registered, but disabled
        return f"echo 1 > {BINFMT / f'qemu-{arch}'}"
    if conf.is_file():  # the kernel's own register line (and comments): no systemd needed
        return f"grep -v '^[#;]' {conf} > {BINFMT / 'register'}"
    return f"update-binfmts --enable qemu-{arch}"


def setup_fix(arch: Arch) -> str:
    """The commands that let this host build for ``arch`` (what scripts/setup.sh runs)."""
    return (f"apt-get install qemu-user-static binfmt-support arch-test && "
            f"dpkg --add-architecture {debian(arch)} && apt-get update && {register_command(arch)} "
            "(scripts/setup.sh does all of it; the last step again after every reboot)")


def binfmt_enabled(arch: Arch) -> bool:
    """Whether the kernel runs ``arch`` programs through qemu-user now."""
    try:
        return (BINFMT / f"qemu-{arch}").read_text().splitlines()[0].strip() == "enabled"
    except (OSError, IndexError):
        return False


def emulation_problem(arch: Arch) -> str | None:
    """Why packages of ``arch`` cannot be installed here (None: they can)."""
    if not foreign(arch):
        return None
    if not binfmt_enabled(arch):
        return (f"{arch} programs cannot run on this {host_arch()} host: qemu-user's binfmt handler "
                f"qemu-{arch} is not registered")
    if shutil.which("arch-test") is None:
        return "arch-test is not installed (mmdebstrap needs it for a foreign architecture)"
    return None


def check_can_install(arch: Arch) -> None:
    problem = emulation_problem(arch)
    if problem:
        raise BuildError(f"cannot build an {arch} guest: {problem}", hint=setup_fix(arch))


def install_note(arch: Arch) -> str:
    """What to say before installing packages for a foreign architecture (it is slow)."""
    if not foreign(arch):
        return ""
    return f"installing {debian(arch)} packages emulated by qemu-user: about 4x slower than a native build"


def fetch_busybox(dest: Path, arch: Arch, runner: Runner) -> Path:
    """``dest``: the static busybox of ``arch`` from Debian (busybox-static), fetched once."""
    if dest.is_file():
        return dest
    package = f"busybox-static:{debian(arch)}"
    with tempfile.TemporaryDirectory(prefix=".busybox-", dir=dest.parent) as tmp:
        work = Path(tmp)
        runner.run(["apt-get", "download", "-o", "APT::Sandbox::User=root", package], desc=f"downloading {package}",
                   cwd=work, error=BuildError,
                   hint=f"dpkg --add-architecture {debian(arch)} && apt-get update (scripts/setup.sh does this)")
        deb = next(work.glob("*.deb"), None)
        if deb is None:
            raise BuildError(f"apt-get download {package} produced no .deb file")
        runner.run(["dpkg-deb", "-x", deb, work / "x"], desc=f"unpacking {package}", error=BuildError)
        (work / "x" / "bin" / "busybox").replace(dest)
    return dest


def busybox(kernel_root: Path, arch: Arch, runner: Runner) -> str:
    """The busybox for an initrd of ``arch``: the host's when native, else a fetched one."""
    if not foreign(arch):
        return require_tool("busybox")
    return str(fetch_busybox(kernel_root / "busybox", arch, runner))


def is_arm64_image(data: bytes) -> bool:
    """An arm64 kernel ``Image`` (magic ``ARM\\x64`` at 0x38): QEMU boots it as it is."""
    return data[0x38:0x3C] == b"ARMd"


def kernel_arch(path: Path) -> Arch | None:
    """The architecture a kernel file is for: an ELF's machine, an x86 bzImage, an arm64 Image."""
    try:
        with open(path, "rb") as f:
            head = f.read(0x210)
    except OSError:
        return None
    if head[:4] == b"\x7fELF" and len(head) >= 20:
        machines: dict[int, Arch] = {62: "x86_64", 183: "aarch64"}
        return machines.get(int.from_bytes(head[18:20], "little"))
    if head[0x202:0x206] == b"HdrS":
        return "x86_64"
    if is_arm64_image(head):
        return "aarch64"
    return None


def image_arch(kernel: Path, system: str) -> Arch:
    """An image's architecture: its kernel's; else the one a Nix system names; else the host's."""
    found = kernel_arch(kernel)
    if found is not None:
        return found
    return next((a for a in ARCHES if f"{a}-linux" in system), resolve(None))
