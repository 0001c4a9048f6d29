"""The ``mvm.toml`` builder: Debian packages → ``rootfs.ext4`` with mmdebstrap, no Nix.

mmdebstrap builds the tree in a temporary chroot (``--format=null``); a customize hook then
adds the guest files, trims docs and locales, byte-compiles the agent with the guest's own
Python and runs ``mkfs.ext4 -d`` *inside* mmdebstrap's namespace, so file ownership comes
out right even when the build does not run as root. Downloaded packages are kept in a
shared cache so the next image with overlapping packages downloads nothing twice.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shlex
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from .._proc import Runner, require_tool
from ..errors import BuildError, SpecError
from ..paths import Layout
from ..spec import GuestSpec, files_digest
from . import guestfiles, kernel
from .store import Image, ImageStore, Manifest, link_or_copy

log = logging.getLogger(__name__)

BUILDER_VERSION = "debian-1"
#: Always installed: the agent's Python. The rest of the Essential set comes with the variant.
BASE_PACKAGES = ["python3"]
TRIM = [
    "usr/share/doc/*", "usr/share/man/*", "usr/share/locale/*", "usr/share/info/*",
    "usr/share/lintian/*", "var/cache/apt/*.bin", "var/cache/apt/archives/*.deb",
    "var/lib/apt/lists/*", "var/log/*",
]


def host_suite() -> tuple[str, str]:
    """The Debian suite and mirror to build from: the host's release, deb.debian.org."""
    suite = "bookworm"
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("VERSION_CODENAME=") and line.split("=", 1)[1].strip():
                suite = line.split("=", 1)[1].strip().strip('"')
    except OSError:
        pass
    return suite, "http://deb.debian.org/debian"


def image_key(spec: GuestSpec, base: Path, kernel_version: str, suite: str, mirror: str) -> str:
    parts = {
        "builder": BUILDER_VERSION,
        "spec": spec.digest(),
        "files": files_digest(spec, base),
        "agent": guestfiles.agent_digest(),
        "initrd": kernel.initrd_digest(),
        "kernel": kernel_version,
        "suite": suite,
        "mirror": mirror,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


def customize_script(overlay: Path, out: Path, users: list[tuple[str, int]]) -> str:
    q = shlex.quote
    homes = "\n".join(
        f'mkdir -p "$root/home/{u}" && chown {uid}:{uid} "$root/home/{u}" '
        f'&& chmod 0750 "$root/home/{u}"'
        for u, uid in users
    )
    trims = " ".join(f'"$root"/{pattern}' for pattern in TRIM)
    return f"""#!/bin/sh
set -eu
root="$1"
cp -a {q(str(overlay))}/. "$root"/
for f in passwd group shadow; do
  cat "$root/etc/mvm/accounts/$f" >> "$root/etc/$f"
done
rm -rf "$root/etc/mvm/accounts"
{homes}
rm -rf {trims}
chroot "$root" python3 -m compileall -q -j0 /usr/lib/mvm >/dev/null
# A non-recursive bind mount shows the tree without the proc/sys/dev mounted over it.
view=$(mktemp -d)
trap 'umount "$view" 2>/dev/null; rmdir "$view"' EXIT
mount --bind "$root" "$view"
size=$(du -smx "$view" | cut -f1)
size=$((size + size / 5 + 64))
mkfs.ext4 -q -F -T default -O ^has_journal -L mvm-root -E root_owner=0:0 -d "$view" {q(str(out))} "${{size}}M"
"""


def apt_errors(output: str) -> str | None:
    """The apt complaint in mmdebstrap's output, e.g. an unknown package name."""
    errors = [ln.strip() for ln in output.splitlines() if re.match(r"^\s*E:", ln)]
    markers = ("Unable to locate package", "has no installation candidate")
    unknown = [e.removeprefix("E: ") for e in errors if any(m in e for m in markers)]
    return "; ".join(dict.fromkeys(unknown)) if unknown else None


def unmount_below(path: Path, runner: Runner) -> None:
    """Detach anything still mounted under ``path`` (an interrupted mmdebstrap's chroot
    mounts), so removing the temp dir can never reach into a mounted /proc or /dev."""
    try:
        with open("/proc/self/mounts") as f:
            targets = [line.split()[1] for line in f]
    except OSError:
        return
    prefix = str(path.resolve()) + "/"
    for target in sorted((t for t in targets if t.startswith(prefix)), key=len, reverse=True):
        runner.run(["umount", "--lazy", target], desc=f"unmounting {target}", ok_codes=(0, 1, 32))


def stage_files(spec: GuestSpec, base: Path, overlay: Path) -> None:
    """Copy ``files`` into the overlay, root-owned, keeping the exec bit."""
    for target, source in spec.files.items():
        src, dest = base / source, overlay / target.lstrip("/")
        dest.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dest, dirs_exist_ok=True, symlinks=True)
        else:
            shutil.copy2(src, dest)


def build_rootfs(
    spec: GuestSpec,
    guest: dict[str, object],
    out: Path,
    *,
    base: Path,
    layout: Layout,
    runner: Runner,
    suite: str,
    mirror: str,
    on_line: Callable[[str], None] | None = None,
) -> None:
    require_tool("mmdebstrap")
    require_tool("mkfs.ext4")
    debs = layout.debs
    debs.mkdir(parents=True, exist_ok=True)
    packages = list(dict.fromkeys(BASE_PACKAGES + spec.packages))
    # The work dir lives in the image's staging dir: it is covered by the same build lock,
    # and an interrupted build leaves one leftover (which `mvmctl cleanup` removes), not two.
    with tempfile.TemporaryDirectory(prefix=".work-", dir=out.parent) as tmp:
        work = Path(tmp)
        overlay = work / "overlay"
        guestfiles.stage(overlay, dict(guest), python="/usr/bin/python3")
        stage_files(spec, base, overlay)
        script = work / "customize.sh"
        script.write_text(customize_script(overlay, out, guestfiles.service_users(dict(guest))))
        argv = [
            "mmdebstrap",
            "--variant=essential",
            f"--include={','.join(packages)}",
            "--format=null",
            "--aptopt=Acquire::Languages \"none\"",
            "--dpkgopt=path-exclude=/usr/share/doc/*",
            "--dpkgopt=path-exclude=/usr/share/man/*",
            "--dpkgopt=path-exclude=/usr/share/locale/*",
            "--dpkgopt=path-exclude=/usr/share/info/*",
            "--skip=essential/unlink",
            "--setup-hook=mkdir -p \"$1\"/var/cache/apt/archives/",
            f"--setup-hook=sync-in {shlex.quote(str(debs))} /var/cache/apt/archives/",
            f"--customize-hook=sync-out /var/cache/apt/archives {shlex.quote(str(debs))}",
            f"--customize-hook=sh {shlex.quote(str(script))} \"$1\"",
            suite,
            "/dev/null",
            mirror,
        ]
        try:
            try:
                runner.run(
                    argv,
                    desc="building the root filesystem with mmdebstrap",
                    env={"TMPDIR": str(work)},
                    on_line=on_line,
                    error=BuildError,
                )
            except BuildError as exc:
                complaint = apt_errors(exc.output or "")
                if complaint:
                    raise SpecError(
                        f"apt could not install the packages: {complaint}",
                        hint="check the names in `packages` (apt-cache search NAME); "
                        f"packages come from Debian {suite}",
                    ) from None
                raise
        finally:
            unmount_below(work, runner)


def build(
    spec: GuestSpec,
    *,
    source: Path,
    layout: Layout,
    runner: Runner,
    on_stage: Callable[[str], None] | None = None,
    on_line: Callable[[str], None] | None = None,
) -> tuple[Image, bool]:
    """Return (image, built): the cached image for ``spec``, building it if needed."""
    suite, mirror = host_suite()
    k = kernel.ensure_kernel(layout.kernels, runner)
    key = image_key(spec, source.parent, k.version, suite, mirror)
    store = ImageStore(layout.images)
    hit = store.get(key)
    if hit is not None:
        return hit, False

    def make(staging: Path) -> Manifest:
        guest = spec.guest_json(frontend="toml")
        if on_stage:
            on_stage("rootfs")
        build_rootfs(spec, guest, staging / "rootfs.ext4", base=source.parent, layout=layout, runner=runner,
                     suite=suite, mirror=mirror, on_line=on_line)
        if on_stage:
            on_stage("kernel")
        link_or_copy(k.vmlinux, staging / "vmlinux")
        link_or_copy(k.initrd, staging / "initrd")
        return Manifest(
            key=key,
            name=spec.name,
            frontend="toml",
            source={"path": str(source), "spec_digest": spec.digest(), "suite": suite, "mirror": mirror},
            kernel_version=k.version,
            guest=spec,
        )

    return store.publish(key, make), True
