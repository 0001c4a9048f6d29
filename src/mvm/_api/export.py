"""``export --kubevirt``: a built image (or a spec to build) as a KubeVirt VirtualMachine
(the work is :mod:`mvm.export.kubevirt`'s; this resolves what to export and builds it)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from .._proc import DEFAULT_RUNNER, Runner
from ..builders.store import Image, ImageStore
from ..errors import MvmError, UsageError
from ..export import kubevirt
from ..paths import Layout
from ..runtime.registry import Registry
from ..spec import load_toml
from .build import build_image, check_arch_option
from .models import ExportInfo
from .options import parse_env
from .progress import Progress, Quiet


def _resolve(target: str, flake: str | None, nix_args: Sequence[str], arch: str | None, layout: Layout,
             runner: Runner, progress: Progress) -> Image:
    """A spec path or flake is built (or found in the cache), for ``arch`` if given, else for
    x86_64 (the only architecture the export writes; a spec that says another is refused);
    otherwise ``target`` names an image in the store: a key (4+ first characters) or a guest
    name, of ``arch`` if given. Of several, the newest x86_64 one (what the export writes)."""
    check_arch_option(arch)
    if flake is not None or Path(target).exists():
        if arch is None:  # what the export writes, whatever this host is
            if flake is None:
                declared = load_toml(target).arch
                if declared not in (None, "x86_64"):
                    raise UsageError(f"{target}: the spec says arch = \"{declared}\"; the KubeVirt export writes "
                                     "x86_64 (amd64) images only",
                                     hint="add --arch x86_64 to build the guest for x86_64 and export that")
            if flake is None or "#" not in flake:
                arch = "x86_64"
        image, _ = build_image(target if flake is None else ".", flake=flake, nix_args=nix_args, arch=arch,
                               layout=layout, runner=runner, progress=progress)
        return image
    everything = ImageStore(layout.images).all()
    found = [i for i in everything if len(target) >= 4 and i.key.startswith(target)] or \
        [i for i in everything if i.name == target]
    fits = [i for i in found if arch in (None, i.manifest.arch)]
    if not found:
        raise UsageError(f"{target!r} is neither a spec directory nor an image in the store",
                         hint=_vm_hint(target, layout) or "give the directory holding mvm.toml, --flake REF, or a "
                         "name from `mvmctl images`")
    if not fits:
        have = ", ".join(sorted({i.manifest.arch for i in found}))
        raise UsageError(f"the store has no {arch} image of {target!r} (only {have})",
                         hint=f"build one: mvmctl export SPEC_DIR --arch {arch} "
                         f"(or mvmctl build SPEC_DIR --arch {arch})")
    return ([i for i in fits if i.manifest.arch == "x86_64"] or fits)[-1]


def _vm_hint(target: str, layout: Layout) -> str | None:
    """A VM is not exported, its image is: say which, with what the VM was started with."""
    try:
        record = Registry(layout).load(target)
    except MvmError:
        return None
    ports = "".join(f" -p {p.guest_port}" for p in record.ports if p.proto == "tcp")
    env = "".join(f" -e {key}=..." for key in record.env_keys)
    return (f"{target} is a VM; export its image, with what it was started with: "
            f"mvmctl export {record.image_key[:12]} --name {target}{ports}{env}")


def export_kubevirt(
    target: str = ".",
    *,
    out: str | os.PathLike[str],
    flake: str | None = None,
    nix_args: Sequence[str] = (),
    image_ref: str | None = None,
    name: str | None = None,
    ports: Sequence[int | str] = (),
    env: Mapping[str, str] | Sequence[str] | None = None,
    arch: str | None = None,
    archive: bool = False,
    force: bool = False,
    layout: Layout | None = None,
    runner: Runner = DEFAULT_RUNNER,
    progress: Progress | None = None,
) -> ExportInfo:
    prog = progress or Quiet()
    dest = Path(out).expanduser().absolute()
    values = parse_env(env)
    numbers = kubevirt.check_inputs(dest, name=name, image=image_ref, ports=ports, env=values,
                                    force=force)  # before a build
    if arch is not None and arch != "x86_64":
        check_arch_option(arch)
        raise UsageError(f"--arch {arch}: the KubeVirt export writes x86_64 (amd64) images only",
                         hint="drop --arch, or give --arch x86_64")
    image = _resolve(target, flake, nix_args, arch, layout or Layout.default(), runner, prog)
    spec = kubevirt.spec_from_image(image.path, name=name, image=image_ref, ports=numbers, env=values)
    prog.stage("writing the OCI image and vm.yaml")
    result = kubevirt.export(spec, dest, archive=archive, force=force, runner=runner)
    return ExportInfo(
        out_dir=str(result.out_dir), vm_yaml=str(result.vm_yaml),
        layout=str(result.layout) if result.layout else None, archive=str(result.archive) if result.archive else None,
        image=result.image, image_key=image.key, manifest_digest=result.manifest_digest, ports=list(result.ports),
        probe_from=result.probe_from, notes=list(result.notes),
        dropped=[f"{d.name}: {d.reason}" for d in result.dropped], commands=result.commands,
    )
