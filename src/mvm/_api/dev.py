"""``mvmctl dev``: a shell where ``nix`` (with flakes) works, in the project directory.

Two ways, chosen by whether the host has Nix:

- **host**: the user's ``$SHELL`` (or one command), in the project directory, with
  ``NIX_CONFIG`` extended so flakes and ``nix-command`` are on. Nothing else changes.
- **vm**: a dev microVM built by the Debian builder (``nix-bin``, git, CA certificates),
  with the project directory shared live and read-write over virtiofs at ``/project``
  and a tmpfs ``/nix`` for the store. The VM is booted for the session and stopped after
  it; nothing in it survives except what was written to ``/project``.

Commands run as root in the VM. A project owned by a user is served by a virtiofsd running
as that user (:func:`mvm.backends.qemu_argv.virtiofsd_argv`), so what they create there
belongs to the project's owner on the host; in a root-owned project, to root.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from .._proc import DEFAULT_RUNNER, Runner, interactive, require_tool
from ..backends.base import Share
from ..builders import debian, initrd, kernel, nix
from ..builders.store import Image, ImageStore, Manifest, link_or_copy
from ..errors import BootError, UsageError
from ..paths import Layout
from ..spec import GuestSpec
from .models import DownResult
from .progress import Progress, Quiet

if TYPE_CHECKING:
    from .vm import VM

log = logging.getLogger(__name__)

Mode = Literal["host", "vm"]

#: What the dev VM carries besides the agent's Python.
DEV_PACKAGES = ["nix-bin", "git", "ca-certificates", "mount", "procps", "less", "xz-utils"]
#: The guest's kernel modules for virtiofs, on top of the usual ones.
SHARE_MODULES = ["fuse", "virtiofs"]
SHARE_TAG = "mvm-project"
GUEST_PROJECT = "/project"
FLAKES = "experimental-features = nix-command flakes"
#: In the VM, nix runs as root with no nixbld group (Debian's nix-bin creates none).
VM_NIX_CONFIG = "\n".join([FLAKES, nix.NO_BUILD_USERS])


def choose_mode(force_vm: bool = False) -> Mode:
    if force_vm:
        return "vm"
    return "host" if shutil.which("nix") else "vm"


def host_env(environ: Mapping[str, str], *, root_without_build_users: bool | None = None) -> dict[str, str]:
    """The environment for the host dev shell: the user's, with flakes switched on, and as
    root on a Nix without build users, building as root (the shell says so when it starts;
    ``mvmctl build --flake`` never does this)."""
    if root_without_build_users is None:
        root_without_build_users = nix.root_without_build_users()
    extra = [nix.NO_BUILD_USERS] if root_without_build_users else []
    return {**environ, **nix.config_env(environ, "extra-" + FLAKES, *extra), "MVM_DEV": "host"}


def builds_as_root() -> bool:
    """Whether the host dev shell tells nix to build as root (see :func:`host_env`)."""
    return nix.root_without_build_users()


def project_dir(path: str | os.PathLike[str]) -> Path:
    project = Path(path).expanduser().resolve()
    if not project.is_dir():
        raise UsageError(f"{path}: not a directory", hint="run `mvmctl dev` in your project, or pass --dir")
    return project


def run_on_host(project: Path, command: Sequence[str] | None) -> int:
    """Run ``command`` (or an interactive shell) on the host with flakes enabled."""
    require_tool("nix")
    argv = list(command) if command else [os.environ.get("SHELL") or "/bin/sh"]
    return interactive(argv, cwd=project, env=host_env(os.environ))


# --- the dev VM ---------------------------------------------------------------------------


def dev_spec() -> GuestSpec:
    return GuestSpec.model_validate({"name": "mvm-dev", "packages": DEV_PACKAGES, "memory": 1024})


def share_image(base: Image, layout: Layout, runner: Runner) -> Image:
    """``base`` with an initrd that also loads fuse and virtiofs (the stock one does not)."""
    k = kernel.ensure_kernel(layout.kernels, runner)
    wanted = initrd.WANTED_MODULES + SHARE_MODULES
    parts = {
        "base": base.key,
        "kernel": k.version,
        "modules": wanted,
        "initrd": kernel.initrd_digest(),
    }
    key = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]

    def make(staging: Path) -> Manifest:
        link_or_copy(base.kernel, staging / base.manifest.kernel)
        link_or_copy(base.rootfs, staging / base.manifest.rootfs)
        kernel.write_initrd(k, staging / "initrd", runner, wanted)
        manifest = base.manifest.model_copy(deep=True)
        manifest.initrd = "initrd"
        manifest.source = {**base.manifest.source, "dev_base": base.key, "initrd_modules": wanted}
        return manifest

    return ImageStore(layout.images).publish(key, make)


def build_image(layout: Layout, runner: Runner, progress: Progress) -> Image:
    base, _ = debian.build(dev_spec(), source=Path("<mvmctl dev>"), layout=layout, runner=runner,
                           on_stage=progress.stage, on_line=progress.line, on_note=progress.note)
    return share_image(base, layout, runner)


@dataclass
class DevVM:
    """A booted dev VM with the project at /project; ``down()`` stops it."""

    vm: VM
    project: Path
    env: dict[str, str] = field(default_factory=lambda: {"NIX_CONFIG": VM_NIX_CONFIG, "MVM_DEV": "vm"})
    cwd: str = GUEST_PROJECT

    def down(self) -> DownResult:
        return self.vm.down()

    def __enter__(self) -> DevVM:
        """``with mvm.dev.boot_vm(...) as session:``: the VM stops when the block ends."""
        return self

    def __exit__(self, *exc: object) -> None:
        self.down()


def boot_vm(project: Path, *, memory: int | None = None, cpus: int | None = None,
            layout: Layout | None = None, runner: Runner = DEFAULT_RUNNER,
            progress: Progress | None = None) -> DevVM:
    """Build (cached) and boot a dev VM sharing ``project``; mount the share and a /nix."""
    from .up import up

    layout = layout or Layout.default()
    prog: Progress = progress or Quiet()
    prog.stage("looking up the dev image (built on first use)")
    image = build_image(layout, runner, prog)
    name = f"dev-{os.getpid()}"
    vm = up(image=image, name=name, memory=memory, cpus=cpus, layout=layout, runner=runner,
                 shares=[Share(SHARE_TAG, project)], progress=prog)
    try:
        prog.stage(f"mounting {project} at {GUEST_PROJECT}")
        setup = (f"mkdir -p {GUEST_PROJECT} /nix && mount -t virtiofs {SHARE_TAG} {GUEST_PROJECT} "
                 "&& mount -t tmpfs -o mode=0755,size=75% nix-store /nix")
        result = vm.exec(["sh", "-c", setup], timeout=60)
        if result.exit_code != 0:
            raise BootError(name, f"could not mount the project in the dev VM (exit {result.exit_code})",
                            output=(result.stdout + result.stderr).decode(errors="replace"))
    except BaseException:
        vm.down()
        raise
    return DevVM(vm, project)
