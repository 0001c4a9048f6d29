"""``-v`` volumes: checking and attaching them to one ``up`` (parsing is :mod:`.args`).

``up`` calls :func:`plan` before it builds anything: it parses every ``-v``, checks the host
side and refuses bad input (missing dir, relative or reserved guest path, duplicates, a bad
size, a file that is not ext4, a shrink, a volume in use) without creating anything. Inside
``up``'s undo stack :func:`attach` then takes the locks, creates or grows writable volumes,
builds the read-only images, and returns the disks and the guest's mount list.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from .. import _ext4 as ext4
from .. import _pids
from .._proc import Runner
from ..backends.base import Disk
from ..errors import CommandFailed, DiskFull, StateError, VolumeError, check_free
from ..names import DEFAULT_UID
from ..paths import Layout, VMFiles
from ..runtime.bootconfig import BootVolume
from ..runtime.registry import VolumeRecord
from ..volumes.args import MIN_SIZE_MB, Mode, VolumeArg, parse_volumes
from ..volumes.store import IMAGE_NAME, Holder, VolumeLock, VolumeMeta, VolumeStore, volume_id

MIB = ext4.MIB
#: Host disk space a new volume needs beyond its seed's files (journal, metadata), and margin.
NEW_VOLUME_BYTES = 32 * MIB
SERVICE_GID = DEFAULT_UID  # group `mvm`: every service user is in it

# --- planning: every check, no side effects --------------------------------------------


@dataclass
class Planned:
    arg: VolumeArg
    serial: str
    kind: Literal["ro", "managed", "image"]
    vid: str | None = None
    meta: VolumeMeta | None = None

    @property
    def label(self) -> str:
        return f"{self.arg.host} ({self.vid})" if self.vid else str(self.arg.host)

    def record(self, store: VolumeStore) -> VolumeRecord:
        image = None
        if self.kind == "managed" and self.vid:
            image = str(store.managed_image(self.vid))
        elif self.kind == "image":
            image = str(self.arg.host)
        mode: Mode = "secret" if self.arg.secret and not self.arg.writable else self.arg.mode
        return VolumeRecord(host=str(self.arg.host), guest=self.arg.guest, mode=mode,
                            size_mb=self.arg.size_mb, image=image, volume=self.vid, secret=self.arg.secret)


def check_readonly_source(arg: VolumeArg) -> None:
    if not arg.host.exists():
        raise VolumeError(f"-v {arg.text!r}: HOSTDIR {arg.host} does not exist",
                          hint="create it and put the files the guest should see in it")
    if not arg.host.is_dir():
        raise VolumeError(f"-v {arg.text!r}: {arg.host} is not a directory; a read-only volume is built "
                          "from a directory's files",
                          hint="put the file in a directory and mount that")
    if not os.access(arg.host, os.R_OK | os.X_OK):
        raise VolumeError(f"-v {arg.text!r}: {arg.host} is not readable by this user",
                          hint=f"give this user read and search permission on it (chmod u+rx {arg.host}), "
                          "or run mvmctl as a user who has it")


def _resolve_writable(plan: Planned, store: VolumeStore) -> None:
    """Decide what a writable ``-v`` refers to, and refuse what would lose or hide data."""
    arg = plan.arg
    assert arg.size_mb is not None
    vid = volume_id(arg.host)
    plan.vid = vid
    meta = store.load(vid)
    plan.meta = meta
    if meta is not None and meta.host != str(arg.host):
        raise VolumeError(f"volume id {vid} already belongs to {meta.host}",
                          hint="move one of the two host paths")
    host_is_file = arg.host.is_file()
    if host_is_file and arg.host.resolve().is_relative_to(store.root.resolve()):
        owner = store.load(arg.host.resolve().relative_to(store.root.resolve()).parts[0])
        raise VolumeError(f"-v {arg.text!r}: {arg.host} is mvm's own image of a volume"
                          + (f" ({owner.id}, for {owner.host})" if owner else ""),
                          hint=f"name the volume by what it was made for: -v {owner.host}:{arg.guest}:SIZE_MB"
                          if owner else "name the volume by the host path it was made for (`mvmctl volume ls`)")
    if (meta is not None and meta.kind == "image") or (meta is None and host_is_file):
        plan.kind = "image"
        if not host_is_file:
            raise VolumeError(f"-v {arg.text!r}: the ext4 image {arg.host} that this volume uses is missing",
                              hint="restore the file; mvm does not create a new, empty one in its place "
                              f"(`mvmctl volume rm {vid}` forgets the volume)")
        if ext4.read_superblock(arg.host) is None:
            raise VolumeError(f"-v {arg.text!r}: {arg.host} is an existing file but not an ext4 image",
                              hint="a writable HOST is a directory (the volume is created from it), a path "
                              "that does not exist yet, or an ext4 image file; nothing was changed")
        image = arg.host
    else:
        plan.kind = "managed"
        image = store.managed_image(vid)
        if meta is None:
            if arg.host.exists() and not arg.host.is_dir():
                raise VolumeError(f"-v {arg.text!r}: {arg.host} is neither a directory nor an ext4 image file")
            if not arg.host.exists() and not arg.host.parent.is_dir():
                raise VolumeError(f"-v {arg.text!r}: neither {arg.host} nor its parent directory exists",
                                  hint="fix the path, or create the parent directory (a new, empty volume is "
                                  "created for a HOST that does not exist yet, if its parent does)")
            if arg.host.is_dir():
                needed, _ = ext4.tree_bytes(arg.host)
                if needed > arg.size_mb * MIB * 9 // 10:
                    raise VolumeError(
                        f"-v {arg.text!r}: the files in {arg.host} (about {needed // MIB + 1} MiB) do not fit "
                        f"in a {arg.size_mb} MiB volume",
                        hint=f"give a larger size, e.g. :{(needed * 2) // MIB + MIN_SIZE_MB}",
                    )
            return
        if not image.is_file():
            raise VolumeError(f"volume {plan.label}: its image {image} is missing",
                              hint="mvm never creates a new, empty volume in place of a lost one: restore the "
                              f"file, or forget the volume with `mvmctl volume rm {vid}`")
    sb = ext4.read_superblock(image)
    if sb is None:
        raise VolumeError(f"volume {plan.label}: {image} is not an ext4 image (any more)",
                          hint="restore it from a backup; nothing was changed")
    current_mb = -(-sb.size_bytes // MIB)
    if arg.size_mb * MIB < sb.size_bytes:
        raise VolumeError(
            f"volume {plan.label} is {current_mb} MiB; shrinking it to {arg.size_mb} MiB is refused",
            hint=f"use :{current_mb} or more. To make it smaller, copy the data out "
            f"(`mvmctl volume export {vid} --to DIR`), `mvmctl volume rm {vid}`, and create it again",
        )


def plan(texts: Sequence[str], layout: Layout, *, cwd: Path | None = None) -> list[Planned]:
    """Validate every ``-v`` and the host side of it. Creates and changes nothing."""
    store = VolumeStore(layout)
    planned: list[Planned] = []
    for i, arg in enumerate(parse_volumes(texts, cwd)):
        p = Planned(arg=arg, serial=f"vol{i}", kind="ro")
        if arg.writable:
            _resolve_writable(p, store)
            assert p.vid is not None
            if store.holder(p.vid) is not None:
                raise store.in_use_error(p.vid, p.label, attaching=True)
        else:
            check_readonly_source(arg)
        planned.append(p)
    return planned


def hidden_volumes(planned: Sequence[Planned], layout: Layout) -> list[str]:
    """A note for each read-only ``-v HOST:GUEST`` whose HOST has a persistent volume: the
    guest sees HOST's files, not the volume's data, which looks lost to a user who only
    forgot ``:SIZE_MB`` (``docker run -v`` mounts read-write without one)."""
    store = VolumeStore(layout)
    notes = []
    mounted = {p.arg.host for p in planned if p.arg.writable}  # this up mounts those volumes itself
    for p in planned:
        if p.arg.writable or p.arg.host in mounted:
            continue
        try:
            meta = store.load(volume_id(p.arg.host))
        except StateError:  # a damaged volume record: `volume ls` says so; a note must not fail the up
            continue
        if meta is not None and meta.host == str(p.arg.host):
            notes.append(f"{p.arg.host} -> {p.arg.guest} is a read-only copy of the directory; its persistent "
                         f"volume {meta.id} ({meta.size_mb} MiB, with the data the guest wrote) is not mounted: "
                         f"to mount it, add its size: -v {p.arg.host}:{p.arg.guest}:{meta.size_mb}")
    return notes


def records(planned: Sequence[Planned], layout: Layout) -> list[VolumeRecord]:
    """What the VM's ``vm.json`` says about its volumes."""
    store = VolumeStore(layout)
    return [p.record(store) for p in planned]


# --- attaching: locks, creation, growth, read-only images ------------------------------


@dataclass
class Attached:
    """What :func:`attach` made for one boot: disks, the guest's mount list, and the locks."""

    store: VolumeStore
    vm: str
    disks: list[Disk] = field(default_factory=list)
    boot: list[BootVolume] = field(default_factory=list)
    locks: list[VolumeLock] = field(default_factory=list)
    fresh: list[str] = field(default_factory=list)
    started: bool = False

    @property
    def hold_fds(self) -> tuple[int, ...]:
        """Lock descriptors the hypervisor process must inherit: its life is the lock's."""
        return tuple(lock.fd for lock in self.locks)

    def held_by(self, pid: int, pid_start: int | None) -> None:
        """QEMU runs and holds the locks: from here on a failure never removes a volume."""
        self.started = True
        for lock in self.locks:
            self.store.set_holder(lock.volume, Holder(what=f"VM {self.vm!r} (QEMU pid {pid})", vm=self.vm, pid=pid,
                                                      pid_start=pid_start, since=time.time()))

    def release(self) -> None:
        """Close this process's copies of the lock descriptors (QEMU keeps its own).

        If QEMU never started, this process was the holder: say so no more (a library user
        may call ``up`` again from the same, still living, process)."""
        for lock in self.locks:
            if not self.started and lock.fd >= 0:
                self.store.clear_holder(lock.volume)
            lock.release()

    def booted(self) -> None:
        """The guest agent answered, so the guest mounted every volume: note that fresh ones
        were handed to the service user, then release this process's lock descriptors."""
        for vid in self.fresh:
            meta = self.store.load(vid)
            if meta is not None and not meta.guest_owned:
                meta.guest_owned = True
                self.store.save(meta)
        self.release()

    def _forget_new(self, vid: str, lock: VolumeLock, kind: str) -> None:
        """Undo: a volume created by this ``up`` goes only if no guest ever ran on it. For an
        image file given as HOST only mvm's metadata was created, so that always goes."""
        if (kind == "image" or not self.started) and lock.fd >= 0 and self.store.dir(vid).is_dir():
            self.store.remove(vid, lock)


def create_managed(store: VolumeStore, vid: str, arg: VolumeArg, runner: Runner) -> VolumeMeta:
    """Create, format and (from HOST's files) seed a new volume; publish it by one rename."""
    assert arg.size_mb is not None
    store.root.mkdir(parents=True, exist_ok=True, mode=0o700)
    seed = arg.host if arg.host.is_dir() else None
    # mkfs writes the seed's files, the journal and the metadata: refuse before, not halfway
    check_free(store.root, (ext4.tree_bytes(seed)[0] if seed else 0) + NEW_VOLUME_BYTES,
               f"creating the {arg.size_mb} MiB volume for {arg.host}")
    work = Path(tempfile.mkdtemp(prefix=f".{vid}.new-", dir=store.root))
    try:
        image = work / IMAGE_NAME
        ext4.create_sparse(image, arg.size_mb * MIB)
        try:
            ext4.format_new(image, runner, label=vid, journal=True, root_owner=(DEFAULT_UID, SERVICE_GID),
                            seed=seed, desc=f"creating the {arg.size_mb} MiB volume for {arg.host}")
        except CommandFailed as exc:
            if exc.hint == DiskFull.HINT:
                raise DiskFull(exc.message + "; nothing was created", output=exc.output) from exc
            raise VolumeError(exc.message, output=exc.output,
                              hint="if HOST's files do not fit, give a larger size; nothing was created") from exc
        sb = ext4.read_superblock(image)
        meta = VolumeMeta(id=vid, kind="managed", host=str(arg.host), image=str(store.managed_image(vid)),
                          size_mb=arg.size_mb, created_at=time.time(),
                          seeded_from=str(seed) if seed else None, fs_uuid=sb.uuid if sb else "")
        store.save(meta, work)
        if seed is not None:
            from ..volumes import export as volexport  # here: only a volume seeded from a directory needs it

            volexport.write_baseline(work / "baseline.json", seed, volexport.scan_tree(seed))
        os.rename(work, store.dir(vid))
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return meta


def build_readonly_image(arg: VolumeArg, dest: Path, runner: Runner) -> None:
    """An ext4 image of HOSTDIR's tree, owned by root, readable by the service users."""
    size, inodes = ext4.image_size_for(arg.host)
    for attempt in range(2):
        ext4.create_sparse(dest, size)
        try:
            ext4.format_new(dest, runner, label=arg.host.name or "volume", journal=False,
                            root_owner=(0, 0), seed=arg.host, inodes=inodes,
                            desc=f"building the read-only image of {arg.host}")
            break
        except CommandFailed as exc:
            dest.unlink()
            full = any(m in (exc.output or "") for m in ("No space left", "Could not allocate"))
            if attempt or not full:
                raise VolumeError(f"-v {arg.text!r}: {exc.message}", output=exc.output) from exc
            size *= 2
    if arg.secret:
        ext4.set_tree_owner(dest, arg.host, runner, uid=0, gid=SERVICE_GID, dir_mode=0o750, file_mode=0o640)
    else:
        ext4.set_tree_owner(dest, arg.host, runner, uid=0, gid=0, dir_mode=0o755, file_mode=0o644)


def attach(
    planned: Sequence[Planned],
    *,
    vm: str,
    files: VMFiles,
    layout: Layout,
    undo: ExitStack,
    runner: Runner,
    stage: Callable[[str], None] = lambda _: None,
) -> Attached:
    """Lock, create, grow and build every volume of ``planned``; register undos on ``undo``."""
    store = VolumeStore(layout)
    attached = Attached(store=store, vm=vm)
    undo.callback(attached.release)
    me = Holder(what=f"mvmctl up of VM {vm!r} (pid {os.getpid()})", vm=vm, pid=os.getpid(),
                pid_start=_pids.start_time(os.getpid()), since=time.time())
    writable = sorted((p for p in planned if p.arg.writable), key=lambda p: p.vid or "")
    for p in writable:
        assert p.vid is not None
        attached.locks.append(store.lock(p.vid, p.label, attaching=True))
    for p, lock in zip(writable, attached.locks, strict=True):
        assert p.vid is not None and p.arg.size_mb is not None
        _resolve_writable(p, store)  # again, now that the lock makes the answer stable
        fresh = p.meta is None
        if fresh and p.kind == "managed":
            stage(f"creating volume {p.vid} ({p.arg.size_mb} MiB)")
            p.meta = create_managed(store, p.vid, p.arg, runner)
            undo.callback(attached._forget_new, p.vid, lock, p.kind)
        elif fresh:
            sb = ext4.read_superblock(p.arg.host)
            assert sb is not None
            p.meta = VolumeMeta(id=p.vid, kind="image", host=str(p.arg.host), image=str(p.arg.host),
                                size_mb=-(-sb.size_bytes // MIB), created_at=time.time(), fs_uuid=sb.uuid)
            store.dir(p.vid).mkdir(parents=True, exist_ok=True, mode=0o700)
            store.save(p.meta)
            undo.callback(attached._forget_new, p.vid, lock, p.kind)
        meta = p.meta
        assert meta is not None
        if meta.kind == "managed" and not meta.guest_owned:
            attached.fresh.append(p.vid)
        image = Path(meta.image)
        sb = ext4.read_superblock(image)
        assert sb is not None
        if p.arg.size_mb * MIB > sb.size_bytes:
            stage(f"growing volume {p.vid} to {p.arg.size_mb} MiB")
            # resize2fs writes new group metadata (inode tables: ~2 % of the growth)
            check_free(image.parent, (p.arg.size_mb * MIB - sb.size_bytes) // 32 + NEW_VOLUME_BYTES,
                       f"growing volume {p.vid} to {p.arg.size_mb} MiB")
            ext4.grow(image, p.arg.size_mb * MIB, runner)
        meta.size_mb = p.arg.size_mb
        meta.last_guest, meta.last_vm, meta.last_used_at = p.arg.guest, vm, time.time()
        store.save(meta)
        store.set_holder(p.vid, me)
        p.meta = meta
    for p in planned:
        if p.arg.writable:
            assert p.meta is not None
            path = Path(p.meta.image)
        else:
            stage(f"building the read-only image of {p.arg.host}")
            files.volumes.mkdir(mode=0o700, exist_ok=True)
            path = files.volumes / f"{p.serial}.ext4"
            build_readonly_image(p.arg, path, runner)
        attached.disks.append(Disk(path=path, serial=p.serial, readonly=not p.arg.writable))
        attached.boot.append(BootVolume(serial=p.serial, target=p.arg.guest, readonly=not p.arg.writable,
                                        secret=p.arg.secret, fresh=p.vid in attached.fresh))
    return attached
