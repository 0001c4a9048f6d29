"""Reclaiming what dead VMs and old builds left: the logic behind ``mvmctl cleanup``.

What it removes, and only that:
- runtime dirs of VMs that are not running (exited, crashed, broken state, or a start that
  was interrupted hard), after killing any QEMU still running in such a dir;
- leftovers of interrupted builds (``.build-*`` staging dirs whose build is not running)
  and image-store lock files nobody holds;
- images no VM uses, except the newest ``keep``;
- with ``everything``: also ``nix-collect-garbage`` when Nix is installed.

It never touches a running VM, and never a volume: volumes live elsewhere and are only
removed by ``mvmctl volume rm NAME``.
"""

from __future__ import annotations

import fcntl
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import _proc
from .._proc import DEFAULT_RUNNER, Runner
from ..errors import MvmError, StateError
from ..images.debian import unmount_below
from ..images.store import ImageStore, read_manifest
from ..paths import Layout
from ..runtime.registry import Registry, derive_status

RUNNING = ("running", "starting", "stopping")


@dataclass
class Item:
    kind: str
    path: str
    bytes: int
    reason: str


@dataclass
class Report:
    dry_run: bool
    items: list[Item] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def freed(self) -> int:
        return sum(i.bytes for i in self.items)

    def as_dict(self) -> dict[str, Any]:
        return {
            "dry_run": self.dry_run,
            "freed_bytes": self.freed,
            "items": [i.__dict__ for i in self.items],
            "notes": self.notes,
        }


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


def _unheld(lock: Path) -> bool:
    try:
        fd = os.open(lock, os.O_RDWR)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


def _remove(path: Path, runner: Runner) -> None:
    if path.is_dir() and not path.is_symlink():
        unmount_below(path, runner)  # an interrupted mmdebstrap may have left its chroot mounts
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def cleanup(
    layout: Layout,
    *,
    dry_run: bool = False,
    everything: bool = False,
    keep: int = 3,
    runner: Runner = DEFAULT_RUNNER,
) -> Report:
    report = Report(dry_run)
    registry = Registry(layout)
    in_use: set[str] = set()

    for name in registry.names():
        files = registry.files(name)
        status: str
        orphan_start = False
        try:
            record = registry.load(name)
            status = derive_status(record, files)
            in_use.add(record.image_key)
            orphan_start = record.state == "starting"
        except MvmError:  # corrupt vm.json: the VM is "broken" and its dir is removable
            status = "broken"
        if status in RUNNING:
            continue
        if status == "broken" and _proc.pids_with_cwd(files.root):
            report.notes.append(f"{name}: state is unreadable but its QEMU is running; "
                                f"stop it with `mvmctl down {name}`")
            continue
        report.items.append(Item("vm", str(files.root), disk_usage(files.root), f"VM {name} is {status}"))
        if not dry_run:
            if orphan_start:  # `up` died between starting QEMU and recording it
                for pid in _proc.pids_with_cwd(files.root):
                    _proc.terminate(pid, _proc.start_time(pid), timeout=3.0)
            registry.remove(name)

    store = ImageStore(layout.images)
    for staging in store.stale_staging():
        report.items.append(Item("build", str(staging), disk_usage(staging), "interrupted build"))
    if layout.images.is_dir():
        for lock in layout.images.glob(".*.lock"):
            key = lock.name[1:-len(".lock")]
            if not (layout.images / key).exists() and _unheld(lock):
                report.items.append(Item("lock", str(lock), 0, "stale lock of an image that is gone"))
        for entry in layout.images.iterdir():
            if entry.name.startswith(".") or not entry.is_dir():
                continue
            try:
                read_manifest(entry)
            except StateError as exc:
                report.items.append(Item("image", str(entry), disk_usage(entry), f"broken image: {exc.message}"))
    images = store.all()
    unused = [img for img in images if img.key not in in_use]
    for img in unused[: max(0, len(unused) - keep)]:
        report.items.append(Item("image", str(img.path), disk_usage(img.path),
                                 f"image {img.name} ({img.key[:12]}) is unused and not among the newest {keep}"))

    if not dry_run:
        for item in report.items:
            if item.kind != "vm":
                _remove(Path(item.path), runner)

    if everything:
        if shutil.which("nix-collect-garbage"):
            if dry_run:
                report.notes.append("would run nix-collect-garbage")
            else:
                out = runner.run(["nix-collect-garbage"], desc="collecting Nix garbage").output
                report.notes.append(out.strip().splitlines()[-1] if out.strip() else "nix-collect-garbage done")
        else:
            report.notes.append("Nix is not installed: nothing to collect")
    return report
