"""Reclaiming what dead VMs and old builds left: the logic behind ``mvmctl cleanup``.

What it removes, and only that:
- runtime dirs of VMs that are not running (exited, crashed, broken state, or a start that
  was interrupted hard), after killing any QEMU still running in such a dir;
- the logs ``down`` kept of VMs that are down;
- leftovers of interrupted builds (``.build-*`` staging dirs whose build is not running, after
  stopping the machine a killed template maker left running in one),
  image-store lock files nobody holds, and ``-e`` values left for a template maker that
  never started;
- images no VM uses, except the newest ``keep`` of each guest (by name and architecture),
  with their locks;
- package layers (mvm.builders.layer) that no remaining image was built from;
- templates (fast start) that are damaged or whose image is gone;
- with ``nix_gc``: also ``nix-collect-garbage`` when Nix is installed. That collects
  the user's whole Nix store, not only what mvm built: the CLI says so.

It never touches a running VM, and never a volume: volumes live elsewhere and are only
removed by ``mvmctl volume rm NAME``.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from .. import backends
from .._atomic import remove_tree, trash_in
from .._locks import held, remove_unheld
from .._proc import DEFAULT_RUNNER, Runner
from ..backends.base import Backend
from ..builders.layer import remove_unused, unmount_below
from ..builders.store import Image, ImageStore, read_manifest
from ..errors import MvmError, StateError
from ..paths import Layout, VMFiles
from ..runtime.registry import Registry
from ..runtime.templates import TemplateStore, bytes_on_disk
from .images import other_users, remove_unneeded
from .machines import backend_for, status_of
from .models import CleanupItem, CleanupReport
from .template_maker import stop_staged_machine

#: A template maker deletes its ``-e`` values file as it starts; one older than this never did.
ENV_FILE_GRACE = 600.0


def disk_usage(path: Path) -> int:
    """Bytes actually allocated (sparse images count what they use)."""
    if path.is_symlink() or not path.exists():
        return 0
    if path.is_file():
        return path.stat().st_blocks * 512
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                st = os.lstat(os.path.join(root, name))
            except OSError:
                continue
            total += st.st_blocks * 512 // max(1, st.st_nlink)  # images share the kernel by hardlink
    return total


def _size(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def _leftovers(root: Path, what: str) -> list[CleanupItem]:
    """Interrupted builds (``.build-*`` whose build lock nobody holds) and the stale locks of
    entries that are gone, in an image or layer store."""
    items = [CleanupItem(kind="build", path=str(staging), bytes=disk_usage(staging),
                         reason=f"interrupted {what} build") for staging in ImageStore(root).stale_staging()]
    if root.is_dir():
        for lock in root.glob(".*.lock"):
            if not _guarded(lock).exists() and not held(lock):
                items.append(CleanupItem(kind="lock", path=str(lock), bytes=0,
                                         reason=f"stale lock of a {what} that is gone"))
    return items


def _guarded(lock: Path) -> Path:
    """What a lock file guards: ``vms/.locks/NAME.lock`` a VM dir, ``.KEY.lock`` a store's entry."""
    if lock.parent.name == ".locks":
        return lock.parent.parent / lock.name.removesuffix(".lock")
    return lock.parent / lock.name[1:].removesuffix(".lock")


def _vm_locks(layout: Layout) -> list[CleanupItem]:
    """The locks of VM names no VM has now (a VM's lock lives beside the VM dirs)."""
    locks = layout.vms / ".locks"
    if not locks.is_dir():
        return []
    return [CleanupItem(kind="lock", path=str(lock), bytes=0, reason="lock of a VM that is gone")
            for lock in sorted(locks.glob("*.lock"))
            if not _guarded(lock).exists() and not held(lock)]


def _remove(path: Path, runner: Runner) -> None:
    if path.is_dir() and not path.is_symlink():
        unmount_below(path, runner)  # an interrupted mmdebstrap may have left its chroot mounts
        remove_tree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def cleanup(
    layout: Layout | None = None,
    *,
    dry_run: bool = False,
    nix_gc: bool = False,
    keep: int = 3,
    runner: Runner = DEFAULT_RUNNER,
) -> CleanupReport:
    """Remove what dead VMs and old builds left (see the module docstring); never a VM
    whose machine runs, never a volume. ``dry_run`` only reports."""
    layout = layout or Layout.default()
    items: list[CleanupItem] = []
    notes: list[str] = []
    in_use = _dead_vms(layout, dry_run, runner, items, notes)
    if layout.retained_logs.is_dir():
        for kept in sorted(layout.retained_logs.iterdir()):
            items.append(CleanupItem(kind="logs", path=str(kept), bytes=disk_usage(kept),
                                     reason=f"logs of VM {kept.name}, which is down"))

    items += (_leftovers(layout.images, "image") + _leftovers(layout.layers, "package layer")
              + _leftovers(layout.templates, "template") + _vm_locks(layout))
    for root in (layout.vms, layout.images, layout.layers, layout.templates, layout.volumes):
        items += [CleanupItem(kind="build", path=str(trash), bytes=disk_usage(trash),
                              reason="the rest of a removal that was cut short") for trash in trash_in(root)]
    if layout.templates.is_dir():  # a maker deletes its file as it starts: this one never started
        for values in layout.templates.glob(".env-*.json"):
            if time.time() - values.stat().st_mtime > ENV_FILE_GRACE:
                items.append(CleanupItem(kind="build", path=str(values), bytes=disk_usage(values),
                                         reason="-e values left for a template maker that never started"))
    in_use |= {key for key in ImageStore(layout.images).marked_keys() if other_users(layout, key)}  # other state dirs'
    images = _unused_images(layout, in_use, keep)
    if not dry_run:
        images = [item for item in images if _removed_image(layout, item, notes)]
    items += images
    removed_images = {Path(i.path).name for i in images}
    store = ImageStore(layout.images)
    for key, template, damaged in TemplateStore(layout).all():
        path = layout.templates / key
        own = bytes_on_disk(path) - bytes_on_disk(path, shared_only=True)  # what removing it frees, as template rm
        if template is None:
            items.append(CleanupItem(kind="template", path=str(path), bytes=own,
                                     reason=f"damaged template ({damaged})"))
        elif template.meta.image_key in removed_images:
            items.append(CleanupItem(kind="template", path=str(path), bytes=own,
                                     reason=f"template of image {template.meta.image_key[:12]}, removed with it"))
        elif store.get(template.meta.image_key) is None:
            items.append(CleanupItem(kind="template", path=str(path), bytes=own,
                                     reason="template of an image that is gone"))
        else:
            notes.append(f"kept: template {key[:12]} of {template.meta.image_key[:12]} "
                         f"({_size(own)}; `mvmctl template rm {key[:12]}` removes it)")
    layers = _unused_layers(layout, removed_images)
    if not dry_run:
        layers = [item for item in layers if _removed_layer(layout, item, notes, runner)]
    items += layers

    if not dry_run:
        for item in items:
            path = Path(item.path)
            if item.kind == "lock":
                remove_unheld(path, _guarded(path))
            elif item.kind not in ("vm", "image", "layer"):  # those went already
                if item.kind == "build" and path.parent == layout.templates:  # a killed maker's machine
                    stop_staged_machine(path, backends.get(backends.DEFAULT, runner))
                _remove(path, runner)
            if item.kind in ("layer", "template"):  # and its lock, unless a build holds it now
                remove_unheld(path.parent / f".{path.name}.lock", path)

    if nix_gc:
        if shutil.which("nix-collect-garbage"):
            if dry_run:
                notes.append("would run nix-collect-garbage (the whole Nix store of this user, not only mvm's)")
            else:
                out = runner.run(["nix-collect-garbage"], desc="collecting Nix garbage").output
                last = out.strip().splitlines()[-1] if out.strip() else "done"
                notes.append(f"nix-collect-garbage (the whole Nix store of this user): {last}")
        else:
            notes.append("Nix is not installed: nothing to collect")
    return CleanupReport(dry_run=dry_run, items=items, notes=notes)


def _unused_images(layout: Layout, in_use: set[str], keep: int) -> list[CleanupItem]:
    """The images no VM uses that are broken, outdated, or older than the newest ``keep`` of
    their guest (by name and architecture: an aarch64 build is no older version of an x86_64 one)."""
    items = []
    if layout.images.is_dir():
        for entry in layout.images.iterdir():
            if entry.name.startswith(".") or not entry.is_dir() or entry.name in in_use:
                continue  # an image a VM uses stays, even one this mvm cannot read
            try:
                read_manifest(entry)
            except StateError as exc:
                items.append(CleanupItem(kind="image", path=str(entry), bytes=disk_usage(entry),
                                         reason=f"broken or outdated image: {exc.message}"))
    by_guest: dict[tuple[str, str], list[Image]] = {}
    for img in ImageStore(layout.images).all():  # oldest first
        if img.key not in in_use:
            by_guest.setdefault((img.name, img.manifest.arch), []).append(img)
    for (name, arch), unused in sorted(by_guest.items()):
        items += [CleanupItem(kind="image", path=str(img.path), bytes=disk_usage(img.path),
                              reason=f"image {img.key[:12]} of {name} ({arch}) is unused and not among its "
                              f"newest {keep}")
                  for img in unused[:max(0, len(unused) - keep)]]
    return items


def _removed_image(layout: Layout, item: CleanupItem, notes: list[str]) -> bool:
    """Remove an unused image unless an ``up`` took it since cleanup looked (see
    :func:`~mvm._api.images.remove_unneeded`); False, with a note, if one did."""
    taken_by = remove_unneeded(layout, Path(item.path).name)
    if taken_by:
        notes.append(f"kept: image {Path(item.path).name[:12]}, which {', '.join(taken_by)} started using "
                     "while cleanup looked")
    return not taken_by


def _layers_named(layout: Layout, removed_images: set[str]) -> set[str]:
    """The layers the images that stay were built from."""
    return {str(img.manifest.source.get("layer")) for img in ImageStore(layout.images).all()
            if img.key not in removed_images}


def _unused_layers(layout: Layout, removed_images: set[str]) -> list[CleanupItem]:
    """The package layers no image that stays was built from."""
    if not layout.layers.is_dir():
        return []
    kept = _layers_named(layout, removed_images)
    return [CleanupItem(kind="layer", path=str(entry), bytes=disk_usage(entry),
                        reason="package layer of no image that is kept")
            for entry in sorted(layout.layers.iterdir())
            if not entry.name.startswith(".") and entry.is_dir() and entry.name not in kept]


def _removed_layer(layout: Layout, item: CleanupItem, notes: list[str], runner: Runner) -> bool:
    """Remove an unused layer unless a build took it since cleanup looked; False, with a note, if one did."""
    key = Path(item.path).name
    why_not = remove_unused(layout, key, lambda k: k in _layers_named(layout, set()), runner)
    if why_not:
        notes.append(f"kept: package layer {key[:12]} ({why_not})")
    return why_not is None


def _dead_vms(layout: Layout, dry_run: bool, runner: Runner, items: list[CleanupItem], notes: list[str]) -> set[str]:
    """Collect (and unless ``dry_run`` remove) the dirs of VMs that do not run; return the
    image keys that VMs still use."""
    registry = Registry(layout)
    in_use: set[str] = set()
    for name in registry.names():
        files = registry.files(name)
        orphan_start = False
        backend = backends.get(backends.DEFAULT, runner)  # the one that can run a VM whose record is unreadable
        try:
            record = registry.load(name)
            backend = backend_for(record, runner)
            status = str(status_of(record, files, backend))
            in_use.add(record.image_key)
            orphan_start = record.phase == "starting"
        except MvmError:  # corrupt vm.json: the VM is "broken" and its dir is removable
            status = "broken"
        if status == "suspended":
            notes.append(f"kept: suspended VM {name} ({_size(disk_usage(files.root))} saved; "
                         f"`mvmctl down {name}` removes it)")
            continue
        if status in ("starting", "running", "stopping"):
            continue
        if status == "broken" and backend.strays(files):
            notes.append(f"{name}: state is unreadable but its machine is running; "
                         f"stop it with `mvmctl down {name}`")
            continue
        items.append(CleanupItem(kind="vm", path=str(files.root), bytes=disk_usage(files.root),
                                 reason=f"VM {name} is {status}"))
        if not dry_run:
            if orphan_start:  # `up` died between starting its machine and recording it
                for machine in backend.strays(files):
                    backend.stop(files, machine, 3.0)

            def still_dead(files: VMFiles, backend: Backend = backend) -> None:  # under its lock: not resumed since
                if backend.strays(files):
                    raise StateError(f"{files.root.name} runs again")

            try:
                registry.remove(name, still_dead)
            except StateError:
                items.pop()
                notes.append(f"{name}: kept, it was started again while cleanup looked")
    return in_use
