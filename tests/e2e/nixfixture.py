"""The offline Nix harness: Debian's nix-bin, the nixpkgs stand-in, and this repo's nix/.

Nothing here is reachable from mvm itself; it only arranges what a user's machine would
have, without a network:

- **nix.** ``mvmctl`` passes ``--extra-experimental-features 'nix-command flakes'`` itself.
  The harness adds, through ``NIX_CONFIG``, what this host needs: no substituters (no
  cache.nixos.org), no global flake registry, the sandbox off (the fixture's builders read
  host files) and no build users (Debian's nix-bin alone creates no ``nixbld`` group).
- **nixpkgs.** ``tests/fixtures/nixpkgs`` is copied to a session directory together with a
  generated ``host.json`` naming the host programs it wraps and the unpacked Debian kernel
  package its ``linuxPackages.kernel`` is made from (evaluation stays pure: only this file
  differs per host). That kernel is Debian's *generic* flavour (``linux-image-amd64``), not
  the cloud one mvm's Debian builder boots: like nixpkgs' kernel it builds ext4, jbd2,
  mbcache, crc16 and crc32c as modules (the cloud kernel builds ext4 in), so a Nix image boots
  through the initrd's module-loading path. It is fetched with apt once per version into
  ``$MVM_CACHE/nixpkgs-standin/``.
- **mvm.** The flake under test is this checkout's ``nix/``, reached as
  ``git+file://<repo>?dir=nix`` -- the same kind of input as the seed's
  ``github:<owner>/<repo>?dir=nix`` (a git tree, so only tracked files are visible). A
  checkout that is not a git work tree is snapshotted into a temporary repository first.

A flake written as the seed writes it (``mvm.url = "github:..."``, ``nixpkgs.url =
"github:..."``) then builds offline with ``--override-input mvm <repo>``, ``--override-input
nixpkgs <fixture>`` and ``--override-input mvm/nixpkgs <fixture>``: nix's documented way of
pointing inputs elsewhere, and what ``mvmctl build --flake`` passes through.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).parents[2]
FIXTURES = ROOT / "tests" / "fixtures"
NIXPKGS_FIXTURE = FIXTURES / "nixpkgs"
#: The scripts nix/flake.nix runs inside its derivations (besides src/mvm/guest).
FLAKE_SCRIPTS = ("src/mvm/builders/initrd.py", "src/mvm/builders/vmlinux.py")

NIX_CONFIG = "\n".join([
    "experimental-features = nix-command flakes",
    "substituters =",
    "flake-registry =",
    "sandbox = false",
    "build-users-group =",
])

#: Host programs the fixture wraps: name in host.json -> candidates.
HOST_TOOLS = {
    "curl": ["curl"],
    "mke2fs": ["mke2fs"],
    "debugfs": ["debugfs"],
    "e2fsck": ["e2fsck"],
    "resize2fs": ["resize2fs"],
    "dumpe2fs": ["dumpe2fs"],
    "tune2fs": ["tune2fs"],
    "kmod": ["kmod"],
    "zstd": ["zstd"],
}


def missing_prerequisites() -> list[str]:
    need = ["nix", "patchelf", "git", "busybox", "xz", "dpkg-deb", "apt-get", *HOST_TOOLS]
    path = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"
    return [tool for tool in need if shutil.which(tool, path=path) is None]


def _which(name: str) -> str:
    found = shutil.which(name, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")
    assert found, f"{name} is not installed"
    return os.path.realpath(found)


def host_python() -> dict[str, str]:
    """The distribution's python3 (not a virtualenv's): its binary and its stdlib dir."""
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    for candidate in (f"/usr/bin/python{version}", "/usr/bin/python3"):
        if os.path.exists(candidate):
            real = os.path.realpath(candidate)
            out = subprocess.run(
                [real, "-I", "-c", "import sys, sysconfig; "
                 "print(sys.version_info[0], sys.version_info[1], sysconfig.get_path('stdlib'))"],
                capture_output=True, text=True, check=True,
            ).stdout.split()
            return {"bin": real, "version": f"{out[0]}.{out[1]}", "stdlib": out[2]}
    raise AssertionError("no /usr/bin/python3 to wrap")


def busybox_version(path: str) -> str:
    out = subprocess.run([path], capture_output=True, text=True).stdout
    first = out.splitlines()[0] if out else ""
    parts = first.split()
    return parts[1].lstrip("v") if len(parts) > 1 and parts[0] == "BusyBox" else "static"


@dataclass(frozen=True)
class StandinKernel:
    """An unpacked Debian kernel package: ``boot/`` (the bzImage, its config and System.map)
    and ``lib/modules/<mod_dir_version>/`` with a ``modules.dep`` (made by depmod here, as
    Debian's postinst would)."""

    dir: Path
    version: str  # the upstream version (nixpkgs' `version`), e.g. 6.1.192
    mod_dir_version: str  # `uname -r` (nixpkgs' `modDirVersion`), e.g. 6.1.0-57-amd64


def _run(*argv: str | Path, cwd: Path | None = None) -> str:
    return subprocess.run([str(a) for a in argv], cwd=cwd, capture_output=True, text=True, check=True).stdout


def ensure_standin_kernel(cache: Path) -> StandinKernel:
    """Debian's generic kernel (``linux-image-<arch>``), unpacked once per version."""
    from filelock import FileLock

    root = cache / "nixpkgs-standin"
    root.mkdir(parents=True, exist_ok=True)
    arch = _run("dpkg", "--print-architecture").strip()
    meta = f"linux-image-{arch}"
    try:
        found = re.search(r"Depends:\s+(linux-image-\S+)", _run("apt-cache", "depends", meta))
    except (OSError, subprocess.CalledProcessError):
        found = None
    cached = sorted(p for p in root.iterdir() if (p / "kernel.json").is_file())
    if found is None:
        assert cached, f"apt cannot resolve {meta} (run apt-get update) and no stand-in kernel is cached"
        package = cached[-1].name
    else:
        package = found[1]
    target = root / package
    with FileLock(str(root / ".fetch.lock")):
        if not (target / "kernel.json").is_file():
            _fetch_kernel(package, target)
    info = json.loads((target / "kernel.json").read_text())
    return StandinKernel(target, info["version"], info["modDirVersion"])


def _fetch_kernel(package: str, target: Path) -> None:
    work = Path(tempfile.mkdtemp(prefix=".fetch-", dir=target.parent))
    try:
        _run("apt-get", "download", "-q", "-o", "APT::Sandbox::User=root", package, cwd=work)
        deb = next(work.glob("*.deb"))
        version = _run("dpkg-deb", "-f", deb, "Version").strip()  # e.g. 6.1.192-3
        staged = work / "unpacked"
        _run("dpkg-deb", "-x", deb, staged)
        mod_dir_version = package.removeprefix("linux-image-")
        _run("depmod", "-b", staged, mod_dir_version)
        info = {"package": package, "debianVersion": version, "version": version.split("-")[0],
                "modDirVersion": mod_dir_version}
        (staged / "kernel.json").write_text(json.dumps(info, indent=2) + "\n")
        os.replace(staged, target)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def write_nixpkgs(dest: Path, kernel: StandinKernel, *, pyc: str = "checked-hash") -> Path:
    """A copy of the nixpkgs stand-in with this host's host.json. ``pyc`` is the invalidation
    mode of its Python's bytecode (nixpkgs': checked-hash; the bench also builds unchecked)."""
    shutil.copytree(NIXPKGS_FIXTURE, dest, ignore=shutil.ignore_patterns("host.json", "__pycache__"))
    busybox = _which("busybox")
    host = {
        "python": {**host_python(), "pycInvalidation": pyc},
        "busybox": {"bin": busybox, "version": busybox_version(busybox)},
        "tools": {name: _which(cands[0]) for name, cands in HOST_TOOLS.items()},
        "kernel": {"dir": str(kernel.dir), "version": kernel.version, "modDirVersion": kernel.mod_dir_version},
    }
    (dest / "host.json").write_text(json.dumps(host, indent=2, sort_keys=True) + "\n")
    return dest


def _git(*args: str, cwd: Path) -> str:
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True).stdout


def mvm_flake_url(scratch: Path) -> str:
    """``git+file://...?dir=nix`` for this checkout (or a snapshot of it)."""
    try:
        top = _git("rev-parse", "--show-toplevel", cwd=ROOT).strip()
    except (subprocess.CalledProcessError, FileNotFoundError):
        top = ""
    if top and Path(top).resolve() == ROOT.resolve():
        untracked = _git("ls-files", "--others", "--exclude-standard", "nix", "src/mvm/guest",
                         *FLAKE_SCRIPTS, cwd=ROOT).split()
        assert not untracked, (
            f"flakes see only files git tracks; `git add` these first: {untracked}"
        )
        return f"git+file://{ROOT}?dir=nix"
    snap = scratch / "mvm-snapshot"
    shutil.copytree(ROOT / "nix", snap / "nix")
    shutil.copytree(ROOT / "src" / "mvm" / "guest", snap / "src" / "mvm" / "guest",
                    ignore=shutil.ignore_patterns("__pycache__"))
    for script in FLAKE_SCRIPTS:
        (snap / script).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / script, snap / script)
    _git("init", "-q", cwd=snap)
    _git("add", "-A", cwd=snap)
    _git("-c", "user.name=mvm-tests", "-c", "user.email=tests@mvm", "commit", "-qm", "snapshot", cwd=snap)
    return f"git+file://{snap}?dir=nix"


def override_args(mvm_url: str, nixpkgs: Path) -> list[str]:
    fixture = f"path:{nixpkgs}"
    return [
        "--override-input", "mvm", mvm_url,
        "--override-input", "nixpkgs", fixture,
        "--override-input", "mvm/nixpkgs", fixture,
    ]


def seed_flake(system: str) -> str:
    """The seed guide's hello flake, byte for byte, except ``system``.

    The guide sets ``system = "aarch64-linux"`` (Apple Silicon) and tells Intel/AMD users to
    write ``"x86_64-linux"``; that one line is what a user on this host changes. The input
    URLs stay as the guide has them and are overridden on the command line.
    """
    text = (FIXTURES / "seed-hello" / "flake.nix").read_text()
    line = 'system = "aarch64-linux";'
    assert text.count(line) == 1
    return text.replace(line, f'system = "{system}";')
