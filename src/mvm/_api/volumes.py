"""The library API for persistent volumes: list, remove, export (``mvmctl volume ...``).

Volumes are created by ``up`` (``-v HOST:/path:SIZE_MB``); these calls manage them
afterwards. Each call that reads or changes a volume's data takes the volume's lock first,
so it refuses a volume that a running VM holds, and a VM cannot start on a volume that is
being exported or removed.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from .. import _ext4 as ext4
from .. import _pids
from .._proc import DEFAULT_RUNNER, Runner
from ..errors import MvmError, VolumeError
from ..paths import Layout
from ..volumes.export import export_image
from ..volumes.store import Holder, VolumeMeta, VolumeStore
from .models import VolumeExport, VolumeInfo

__all__ = ["volume_export", "volume_info", "volume_ls", "volume_rm"]


def _store(layout: Layout | None) -> VolumeStore:
    return VolumeStore(layout or Layout.default())


def _view(store: VolumeStore, meta: VolumeMeta) -> VolumeInfo:
    image = Path(meta.image)
    sb = ext4.read_superblock(image)
    holder = store.holder(meta.id)
    try:
        allocated: int | None = image.stat().st_blocks * 512
    except OSError:
        allocated = None
    return VolumeInfo(
        name=meta.id,
        kind=meta.kind,
        host=meta.host,
        image=meta.image,
        exists=sb is not None,
        size_mb=(sb.size_bytes // ext4.MIB) if sb else meta.size_mb,
        used_mb=round(sb.used_bytes / ext4.MIB, 1) if sb else None,
        allocated_mb=round(allocated / ext4.MIB, 1) if allocated is not None else None,
        vm=holder.vm if holder else None,
        held_by=holder.what if holder else None,
        needs_recovery=bool(sb and sb.needs_recovery and not holder),  # mounted volumes always say so
        fs_uuid=sb.uuid if sb else meta.fs_uuid,  # read now: the same UUID means the same filesystem
        last_guest=meta.last_guest,
        last_vm=meta.last_vm,
        created_at=meta.created_at,
        seeded_from=meta.seeded_from,
    )


def volume_ls(*, layout: Layout | None = None) -> list[VolumeInfo]:
    """Every persistent volume: where it lives, its size and use, and which VM holds it.

    ``used_mb`` comes from the superblock, as of the filesystem's last sync: while a VM
    writes to the volume it lags behind (``df`` in the guest is exact).
    """
    store = _store(layout)
    rows: list[VolumeInfo] = []
    for vid in store.ids():
        try:
            meta = store.load(vid)
        except MvmError as exc:
            rows.append(VolumeInfo(name=vid, error=exc.message, exists=False, host="?", image=str(store.dir(vid))))
            continue
        if meta is not None:
            rows.append(_view(store, meta))
    return rows


def volume_info(name: str, *, layout: Layout | None = None) -> VolumeInfo:
    """One volume, by name or HOST path; VolumeError if there is none."""
    store = _store(layout)
    return _view(store, store.find(name))


def volume_rm(name: str, *, layout: Layout | None = None) -> VolumeInfo:
    """Delete a volume (by id or HOST path). Refused while a VM holds it.

    A ``managed`` volume's image is deleted with its data. For an ``image`` volume (an ext4
    file the user gave as HOST) only mvm's record of it goes; the file is left alone.
    """
    store = _store(layout)
    meta = store.find(name)
    lock = store.lock(meta.id, f"{meta.host} ({meta.id})")
    try:
        view = _view(store, meta)
        store.remove(meta.id, lock)
    finally:
        lock.release()
    return view


def volume_export(
    name: str,
    *,
    to: str | os.PathLike[str] | None = None,
    force: bool = False,
    layout: Layout | None = None,
    runner: Runner = DEFAULT_RUNNER,
) -> VolumeExport:
    """Copy a volume's files to the host: into its HOST dir, or into ``to``.

    Refused while a VM holds the volume (stop it with ``down`` first). Host files the user
    changed since mvm last copied them are never overwritten unless ``force`` (see
    :mod:`mvm.volumes.export`); host files that are not in the volume are kept.
    """
    store = _store(layout)
    meta = store.find(name)
    if to is None and meta.kind == "image":
        raise VolumeError(f"volume {meta.id} is the ext4 image {meta.host}: there is no host dir to export into",
                          hint=f"name one: mvmctl volume export {meta.id} --to DIR")
    dest = Path(to).expanduser().absolute() if to is not None else Path(meta.host)
    label = f"{meta.host} ({meta.id})"
    lock = store.lock(meta.id, label)
    try:
        store.set_holder(meta.id, Holder(what=f"mvmctl volume export (pid {os.getpid()})", pid=os.getpid(),
                                         pid_start=_pids.start_time(os.getpid()), since=time.time()))
        image = Path(meta.image)
        if ext4.read_superblock(image) is None:
            raise VolumeError(f"volume {label}: {image} is missing or not an ext4 image",
                              hint="its data cannot be read back; `mvmctl volume ls` shows what is left")
        ext4.replay_journal(image, runner)
        result = export_image(image, dest, store.baseline_path(meta.id), force=force, volume=meta.id)
    finally:
        store.clear_holder(meta.id)
        lock.release()
    return VolumeExport(volume=meta.id, **result.as_dict())
