"""``build``: a spec or flake → an image in the content-addressed store (or a cache hit)."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path

from .._proc import DEFAULT_RUNNER, Runner
from ..builders.store import Image
from ..errors import UsageError
from ..names import ARCH_ALIASES, ARCHES
from ..paths import Layout
from .models import BuildResult, ImageInfo
from .progress import Progress, Quiet


def image_info(image: Image) -> ImageInfo:
    m = image.manifest
    return ImageInfo(key=m.key, name=m.name, path=str(image.path), frontend=m.frontend, source=m.source,
                     arch=m.arch, kernel=m.kernel, initrd=m.initrd, rootfs=m.rootfs,
                     kernel_version=m.kernel_version, sizes=m.sizes, created_at=m.created_at,
                     build_secs=m.build_secs, guest=m.guest)


def check_arch_option(arch: str | None) -> None:
    """``--arch`` names one of mvm's architectures, by the kernel's name (``arm64`` gets a
    did-you-mean)."""
    if arch is not None and arch not in ARCHES:
        same = ARCH_ALIASES.get(arch.lower())
        raise UsageError(f"--arch {arch}: mvm builds {' and '.join(ARCHES)} guests",
                         hint=f"did you mean --arch {same}? (mvm uses the kernel's names)" if same else None)


def build_image(
    path: str | os.PathLike[str] = ".",
    *,
    flake: str | None = None,
    nix_args: Sequence[str] = (),
    pull: bool = False,
    arch: str | None = None,
    layout: Layout,
    runner: Runner = DEFAULT_RUNNER,
    progress: Progress | None = None,
) -> tuple[Image, bool]:
    """The image for ``path``'s mvm.toml (or ``flake``), and whether it was built now.
    ``arch`` overrides the spec's architecture (for a flake: picks ``packages.<arch>-linux.default``)."""
    prog = progress or Quiet()
    check_arch_option(arch)
    if flake is None and nix_args:
        raise UsageError("--override-input and --nix-arg are for --flake builds")
    if flake is not None and pull:
        raise UsageError("--pull is for mvm.toml builds", hint="nix decides what a flake build fetches")
    if flake is not None:
        from ..builders import nix

        if str(path) != ".":
            raise UsageError(f"give either a path ({path}) or --flake, not both")
        if arch is not None:
            if "#" in flake:
                raise UsageError("--arch picks the flake's packages.<system>.default; with #ATTR it has nothing "
                                 "to pick", hint="drop one of them")
            flake = f"{flake}#packages.{arch}-linux.default"
        nix.check_local(nix.parse_ref(flake).url)
        return nix.build(flake, nix_args=nix_args, layout=layout, runner=runner,
                         on_stage=prog.stage, on_line=prog.line)
    from .. import spec as spec_mod
    from ..builders import debian

    source = Path(path)
    guest = spec_mod.load_toml(source)
    if arch is not None:
        guest = guest.model_copy(update={"arch": arch})
    prog.stage(f"resolving guest {guest.name}" + (f" ({guest.arch})" if guest.arch else ""))
    return debian.build(guest, source=spec_mod.spec_file(source).resolve(), layout=layout, runner=runner,
                        pull=pull, on_stage=prog.stage, on_line=prog.line, on_note=prog.note)


def build(
    path: str | os.PathLike[str] = ".",
    *,
    flake: str | None = None,
    nix_args: Sequence[str] = (),
    pull: bool = False,
    arch: str | None = None,
    layout: Layout | None = None,
    runner: Runner = DEFAULT_RUNNER,
    progress: Progress | None = None,
) -> BuildResult:
    """Build (or find in the cache) the image for the ``mvm.toml`` at ``path``, or, with
    ``flake="REF[#ATTR]"``, for a flake output made by ``mkGuest`` (``nix_args`` are passed
    to nix, e.g. ``["--override-input", "nixpkgs", "path:/src/nixpkgs"]``). ``pull``
    refreshes the Debian package layer from the mirrors (otherwise the cached one is reused,
    which also works offline). ``arch`` (``"x86_64"`` or ``"aarch64"``) builds for that
    architecture instead of the spec's (default: the host's)."""
    started = time.monotonic()
    image, built = build_image(path, flake=flake, nix_args=nix_args, pull=pull, arch=arch,
                               layout=layout or Layout.default(), runner=runner, progress=progress)
    return BuildResult(**image_info(image).model_dump(), built=built, seconds=round(time.monotonic() - started, 3))
