"""Persistent volumes on the host: where they live, who holds them, and how they are locked.

Layout, under ``<state>/volumes/`` (``$MVM_HOME/state/volumes``):

    <id>/volume.json      schema_version, kind, host path, image path, size (atomic writes)
    <id>/disk.ext4        the volume itself (``managed`` volumes only)
    <id>/baseline.json    what mvm last copied between the host dir and the volume
    <id>/holder.json      who holds the lock: the VM's QEMU pid and start time
    <id>.lock             the lock file (next to the dir, so a volume can be locked before it exists)

A volume's id is derived from its resolved HOST path (``data-1a2b3c4d``), so the same
``-v ./data:...`` finds the same volume on every ``up``. ``managed`` volumes keep their
image in the dir above; ``image`` volumes are ext4 files the user gave as HOST, used in place
(mvm stores only their metadata and never formats them).

The lock: ``flock`` on ``<id>.lock``. ``up`` takes it without waiting and hands the open
descriptor to QEMU, so the lock lives exactly as long as the QEMU process, whatever way it
ends (``down``, a crash, ``kill -9``), with no daemon. ``holder.json`` only says *who* holds
it, for error messages and ``volume ls``; the ``flock`` decides.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from .. import _pids
from .._atomic import remove_tree, write_json_atomic
from .._locks import try_flock
from ..errors import StateError, VolumeError
from ..paths import Layout, VMFiles

VOLUME_SCHEMA = 1
IMAGE_NAME = "disk.ext4"


class VolumeMeta(BaseModel):
    model_config = ConfigDict(extra="ignore")

    schema_version: int = VOLUME_SCHEMA
    id: str
    kind: Literal["managed", "image"]
    host: str
    image: str
    size_mb: int
    created_at: float
    seeded_from: str | None = None
    #: The guest has handed the seeded files to the service user (done on the first boot).
    guest_owned: bool = False
    fs_uuid: str = ""
    last_guest: str | None = None
    last_vm: str | None = None
    last_used_at: float | None = None


class Holder(BaseModel):
    schema_version: int = VOLUME_SCHEMA
    what: str  # "VM 'web' (QEMU pid 123)", "mvmctl up of VM 'web' (pid 122)", "mvmctl volume export (pid 9)"
    vm: str | None = None
    pid: int
    pid_start: int | None = None
    since: float
    #: Held by a suspended VM (``vm``): no process holds the lock, but the guest's memory has
    #: the file system mounted, with writes not yet on disk. It holds while the VM's saved
    #: state exists (until ``resume`` or ``down``).
    suspended: bool = False


def volume_id(host: Path) -> str:
    """``<basename>-<8 hex of the path's digest>``: readable, and unique per host path."""
    base = re.sub(r"[^a-z0-9]+", "-", host.name.lower()).strip("-")[:32] or "volume"
    return f"{base}-{hashlib.sha256(str(host).encode()).hexdigest()[:8]}"


class VolumeLock:
    """An open, ``flock``-ed lock file. Closing the last descriptor releases it."""

    def __init__(self, fd: int, volume: str) -> None:
        self.fd = fd
        self.volume = volume

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class VolumeStore:
    def __init__(self, layout: Layout) -> None:
        self.root = layout.volumes
        self.layout = layout

    # -- names ---------------------------------------------------------------------------

    def dir(self, vid: str) -> Path:
        return self.root / vid

    def meta_path(self, vid: str) -> Path:
        return self.dir(vid) / "volume.json"

    def managed_image(self, vid: str) -> Path:
        return self.dir(vid) / IMAGE_NAME

    def lock_path(self, vid: str) -> Path:
        return self.root / f"{vid}.lock"

    def holder_path(self, vid: str) -> Path:
        return self.dir(vid) / "holder.json"

    def baseline_path(self, vid: str) -> Path:
        return self.dir(vid) / "baseline.json"

    # -- metadata ------------------------------------------------------------------------

    def load(self, vid: str) -> VolumeMeta | None:
        path = self.meta_path(vid)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            if self.dir(vid).is_dir() and any(self.dir(vid).iterdir()):
                raise StateError(f"{self.dir(vid)} has no volume.json",
                                 hint="inspect it; remove it by hand if it holds nothing you need") from None
            return None
        except (OSError, ValueError) as exc:
            raise StateError(f"{path} is unreadable: {exc}", hint="restore it from a backup, or move "
                             f"{self.dir(vid)} away to start this volume over") from None
        try:
            meta = VolumeMeta.model_validate(data)
        except ValidationError as exc:
            raise StateError(f"{path} is invalid: {str(exc).splitlines()[0]}") from None
        if meta.schema_version != VOLUME_SCHEMA:
            raise StateError(f"{path} has schema_version {meta.schema_version}; this mvm reads {VOLUME_SCHEMA}",
                             hint="use the mvm version that created it")
        return meta

    def save(self, meta: VolumeMeta, directory: Path | None = None) -> None:
        target = (directory or self.dir(meta.id)) / "volume.json"
        write_json_atomic(target, meta.model_dump(mode="json"))

    def ids(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))

    def find(self, name: str) -> VolumeMeta:
        """A volume by id (``data-1a2b3c4d``) or by the HOST path it was created for."""
        if "/" not in name and name not in (".", ".."):
            meta = self.load(name) if re.fullmatch(r"[a-z0-9-]+", name) else None
            if meta is not None:
                return meta
        host = Path(name).expanduser().resolve()
        meta = self.load(volume_id(host))
        if meta is not None:
            return meta
        raise VolumeError(f"no volume named {name!r} (as an id or a host path)",
                          hint="list volumes with `mvmctl volume ls`")

    # -- locking -------------------------------------------------------------------------

    def raw_holder(self, vid: str) -> Holder | None:
        """The holder recorded, alive or not (None: none, or unreadable)."""
        try:
            return Holder.model_validate_json(self.holder_path(vid).read_text())
        except (OSError, ValueError):
            return None

    def holder(self, vid: str) -> Holder | None:
        """Who holds the volume now (None if nobody does, or the recorded holder is dead)."""
        holder = self.raw_holder(vid)
        if holder is None:
            return None
        if holder.suspended:
            return holder if holder.vm and VMFiles(self.layout.vm_dir(holder.vm)).saved_state.is_file() else None
        return holder if _pids.alive(holder.pid, holder.pid_start) else None

    def lock(self, vid: str, label: str, *, attaching: bool = False, resuming: str | None = None) -> VolumeLock:
        """Take the volume's lock without waiting, or raise a VolumeError naming the holder. A
        suspended VM holds its volumes too: only its own ``resume`` (``resuming``) takes them."""
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = try_flock(self.lock_path(vid), verify=True)  # `volume rm` unlinks the file it held
        holder = self.holder(vid) if fd is not None else None
        if fd is None or (holder is not None and holder.suspended and holder.vm != resuming):
            if fd is not None:
                os.close(fd)
            raise self.in_use_error(vid, label, attaching=attaching)
        return VolumeLock(fd, vid)

    def in_use_error(self, vid: str, label: str, *, attaching: bool = False) -> VolumeError:
        holder = self.holder(vid)
        if holder and holder.suspended:
            return VolumeError(f"volume {label} belongs to suspended VM {holder.vm!r}: its guest has the file system "
                               "mounted, with writes not yet on disk, and would overwrite changes made meanwhile",
                               hint=f"`mvmctl resume {holder.vm}` then `mvmctl down {holder.vm}` frees it; "
                               f"`mvmctl down {holder.vm}` alone discards the VM's saved state (and its unwritten "
                               "changes)")
        if holder and holder.vm:
            hint = f"stop that VM first (`mvmctl down {holder.vm}`)"
            if attaching:
                hint = f"a volume is attached to one VM at a time: {hint}, or give this VM another HOST path"
            return VolumeError(f"volume {label} is in use by {holder.what}", hint=hint)
        what = holder.what if holder else "another mvm process"
        return VolumeError(f"volume {label} is in use by {what}",
                           hint="wait for it to finish, then try again")

    def set_holder(self, vid: str, holder: Holder) -> None:
        write_json_atomic(self.holder_path(vid), holder.model_dump(mode="json"))

    def clear_holder(self, vid: str) -> None:
        self.holder_path(vid).unlink(missing_ok=True)

    # -- removal -------------------------------------------------------------------------

    def remove(self, vid: str, lock: VolumeLock) -> None:
        """Delete the volume's dir (for ``managed`` volumes: its data) while holding its lock."""
        assert lock.volume == vid and lock.fd >= 0
        remove_tree(self.dir(vid))  # the volume is gone or intact, never half
        self.lock_path(vid).unlink(missing_ok=True)
