"""The ``mvm.toml`` builder: Debian packages → ``rootfs.ext4``, no Nix.

Two steps (see :mod:`.layer` for why): the package layer (mmdebstrap: the packages, the
guest agent, trimmed and byte-compiled, as an ext4 file) is cached and shared by every
image with the same packages; the image is a copy of it, finished by :mod:`.assemble`
with the guest's own parts. Editing a service command or a shipped file re-runs only the
second step. Downloaded packages are kept too, so a new package list downloads only what
is new.

The guest's architecture is the spec's ``arch`` (default: the host's). Package layers, the
downloaded packages and kernels are all kept per architecture, so images of both live side
by side; a build for another architecture installs its packages under qemu-user
(:mod:`.arches`).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from pathlib import Path

from .._proc import Runner
from ..names import Arch
from ..paths import Layout
from ..spec import GuestSpec, files_digest
from . import arches, kernel
from .aptsources import host_sources
from .assemble import assemble, copy_image
from .layer import Layer, held_layer
from .store import WAITING_FOR_ANOTHER_BUILD, Image, ImageStore, Manifest, link_or_copy

log = logging.getLogger(__name__)

BUILDER_VERSION = "debian-2"
#: The kernel file's name in the image: what the kernel package calls it once unpacked.
KERNEL_FILE: dict[Arch, str] = {"x86_64": "vmlinux", "aarch64": "Image"}


def image_key(spec: GuestSpec, base: Path, kernel_version: str, layer: Layer, arch: Arch = "x86_64") -> str:
    parts = {
        "builder": BUILDER_VERSION,
        "arch": arch,
        "spec": spec.digest(),
        "files": files_digest(spec, base),
        "layer": layer.id,  # the package versions (and, through the layer key, the agent)
        "layer_key": layer.key,
        "initrd": kernel.initrd_digest(),
        "kernel": kernel_version,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


def build(
    spec: GuestSpec,
    *,
    source: Path,
    layout: Layout,
    runner: Runner,
    pull: bool = False,
    on_stage: Callable[[str], None] | None = None,
    on_line: Callable[[str], None] | None = None,
    on_note: Callable[[str], None] = lambda _: None,
) -> tuple[Image, bool]:
    """Return (image, built): the cached image for ``spec``, building it if needed.
    ``pull`` rebuilds the package layer from the mirrors (newer packages)."""
    stage = on_stage or (lambda _: None)
    arch = arches.resolve(spec.arch)
    sources = host_sources()
    k = kernel.ensure_kernel(layout.kernels, runner, on_stage=stage, arch=arch)
    # the layer stays held until the image is published: cleanup waits for it
    with held_layer(spec.packages, arch=arches.debian(arch), sources=sources, layout=layout, runner=runner,
                    pull=pull, on_stage=stage, on_line=on_line, on_note=on_note) as layer:
        key = image_key(spec, source.parent, k.version, layer, arch)
        store = ImageStore(layout.images)
        hit = store.get(key)
        if hit is not None:
            return hit, False

        def make(staging: Path) -> Manifest:
            stage("assembling the image")
            rootfs = staging / "rootfs.ext4"
            copy_image(layer.image, rootfs, runner)
            assemble(rootfs, spec, spec.guest_json(frontend="toml"), base=source.parent, runner=runner)
            link_or_copy(k.vmlinux, staging / KERNEL_FILE[arch])
            link_or_copy(k.initrd, staging / "initrd")
            return Manifest(
                key=key,
                name=spec.name,
                frontend="toml",
                source={"path": str(source), "spec_digest": spec.digest(), "suite": sources.suite,
                        "mirror": sources.primary, "layer": layer.key, "packages": layer.id},
                kernel=KERNEL_FILE[arch],
                kernel_version=k.version,
                arch=arch,
                guest=spec,
            )

        return store.publish(key, make, on_wait=lambda: stage(WAITING_FOR_ANOTHER_BUILD)), True
