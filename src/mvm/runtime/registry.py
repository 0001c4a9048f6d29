"""The VM registry: one directory per VM under ``<state>/vms/<name>/``, no daemon.

A name is reserved by ``mkdir`` (atomic: of eight concurrent ``up`` calls exactly one
wins). ``vm.json`` carries a ``schema_version`` and is rewritten atomically under the VM's
lock. The record says what the last command meant (its phase) and which machine it
started; whether that machine still runs is asked of its backend each time, so the status
(:mod:`.states`) is derived, never stored.
"""

from __future__ import annotations

import errno
import json
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from .. import _pids
from .._atomic import remove_tree, write_json_atomic
from .._locks import locked
from ..backends.base import MachineRef, PortForward
from ..errors import StateError, VMExists, VMNotFound, check_free
from ..names import NAME_RE
from ..paths import Layout, VMFiles
from .states import Phase

VM_SCHEMA = 2
#: Free space ``up`` wants on the state dir's disk: a VM's logs (capped) and root disk writes go there.
MIN_FREE_BYTES = 128 << 20


class PortRecord(BaseModel):
    host_ip: str = "127.0.0.1"
    host_port: int
    guest_port: int
    proto: Literal["tcp", "udp"] = "tcp"

    @classmethod
    def of(cls, fwd: PortForward) -> PortRecord:
        return cls(host_ip=fwd.host_ip, host_port=fwd.host_port, guest_port=fwd.guest_port, proto=fwd.proto)


class VolumeRecord(BaseModel):
    host: str
    guest: str
    mode: Literal["ro", "secret", "rw"]
    size_mb: int | None = None
    image: str | None = None
    volume: str | None = None  # the persistent volume's id (writable volumes)
    secret: bool = False

    def as_arg(self) -> str:
        """The ``-v`` value that attaches this volume again."""
        text = f"{self.host}:{self.guest}"
        if self.mode == "rw":
            text += f":{self.size_mb}"
        return text + (":secret" if self.secret else "")


class ProcessRecord(BaseModel):
    """A process by identity: its pid and its start time (see :mod:`mvm._pids`)."""

    pid: int
    start_time: int | None = None

    @property
    def ref(self) -> MachineRef:
        return MachineRef(self.pid, self.start_time)


class VMRecord(BaseModel):
    model_config = ConfigDict(extra="ignore")

    schema_version: int = VM_SCHEMA
    name: str
    phase: Phase = "starting"
    owner: ProcessRecord | None = None  # the `mvmctl up` that reserved the VM
    machine: ProcessRecord | None = None  # what the backend started
    backend: str = "qemu"
    accel: str = "tcg"
    image_key: str = ""
    image_path: str = ""
    frontend: str = "toml"
    source: str = ""
    cpus: int = 1
    memory: int = 512
    ports: list[PortRecord] = []
    volumes: list[VolumeRecord] = []
    env_keys: list[str] = []
    services: list[str] = []
    checks: list[str] = []
    created_at: float = 0.0
    started_at: float | None = None
    #: seconds it ran before its last `suspend` (its boot's earlier runs): `uptime` goes on from it
    ran_for: float = 0.0
    #: how the machine started: booted ("cold"), or restored from a template
    start: Literal["cold", "restored"] = "cold"
    start_reason: str = ""
    start_warning: bool = False  #: a template that should have been restored could not be
    arch: str = "x86_64"  #: the guest's architecture
    #: the guest's architecture is not the host's: how it is run, and what that costs (one line)
    emulated: str = ""
    #: what `up` was asked for (`--hypervisor`, `--log-limit`; None: the spec's), so `restart` asks again
    hypervisor: str = "auto"
    log_limit_mb: int | None = None

    @property
    def owner_alive(self) -> bool:
        return self.owner is not None and _pids.alive(self.owner.pid, self.owner.start_time)


def _read(files: VMFiles) -> VMRecord:
    try:
        data = json.loads(files.state.read_text())
        record = VMRecord.model_validate(data)
    except FileNotFoundError:
        raise
    except (OSError, ValueError, ValidationError) as exc:
        raise StateError(
            f"{files.state} is unreadable: {str(exc).splitlines()[0]}",
            hint=f"remove the VM's state with `mvmctl down {files.root.name}` or `mvmctl cleanup`",
        ) from None
    if record.schema_version != VM_SCHEMA:
        raise StateError(
            f"{files.state} has schema_version {record.schema_version}; this mvm reads {VM_SCHEMA}",
            hint=f"`mvmctl down {files.root.name}` stops it (found by its VM dir) and forgets it",
        )
    return record


class Registry:
    def __init__(self, layout: Layout) -> None:
        self.layout = layout

    def files(self, name: str) -> VMFiles:
        return VMFiles(self.layout.vm_dir(name))

    def reserve(self, record: VMRecord) -> VMFiles:
        """Claim ``record.name`` (mkdir is the atomic test) and write its first vm.json.

        Refused (:class:`~mvm.errors.DiskFull`, nothing created) when the state dir's disk
        has less than ``MIN_FREE_BYTES`` free: a VM writes its logs and root disk there."""
        self.layout.vms.mkdir(parents=True, exist_ok=True, mode=0o700)
        check_free(self.layout.vms, MIN_FREE_BYTES, "a VM (its logs and the writes to its root disk)")
        files = self.files(record.name)
        try:
            os.mkdir(files.root, 0o700)
        except FileExistsError:
            raise VMExists(record.name, f"a VM named {record.name!r} already exists") from None
        record.created_at = time.time()
        record.owner = ProcessRecord(pid=os.getpid(), start_time=_pids.start_time(os.getpid()))
        try:
            self.write(files, record)
        except BaseException:  # a full disk, a Ctrl-C: the name must not stay taken by an empty dir
            os.rmdir(files.root)
            raise
        return files

    def load(self, name: str) -> VMRecord:
        files = self.files(name)
        try:
            return _read(files)
        except FileNotFoundError:
            if files.root.is_dir():
                raise StateError(
                    f"{files.root} has no vm.json (an interrupted start?)",
                    hint=f"remove it with `mvmctl down {name}`",
                ) from None
            raise VMNotFound(name, f"no VM named {name!r}",
                             hint="list VMs with `mvmctl ls`") from None

    @contextmanager
    def locked(self, name: str) -> Iterator[VMFiles]:
        """The VM's lock. It lives beside the VM dirs, not in one, so that removing a VM
        (under this lock) cannot pull it from under a command waiting for it: that command
        then finds the VM gone, instead of recreating its dir or locking a deleted file."""
        files = self.files(name)
        files.lock.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        with locked(files.lock):
            yield files

    @contextmanager
    def transaction(self, name: str) -> Iterator[tuple[VMFiles, VMRecord]]:
        """The VM's record under its lock; written back (atomically) if the block succeeds.
        :class:`~mvm.errors.VMNotFound` if the VM is gone, also if it went while waiting."""
        if not self.files(name).root.is_dir():
            raise VMNotFound(name, f"no VM named {name!r}", hint="list VMs with `mvmctl ls`")
        with self.locked(name) as files:
            if not files.root.is_dir():  # it went while we waited: the lock file we made goes too
                files.lock.unlink(missing_ok=True)
                raise VMNotFound(name, f"no VM named {name!r}", hint="list VMs with `mvmctl ls`")
            record = self.load(name)
            yield files, record
            self.write(files, record)

    @staticmethod
    def write(files: VMFiles, record: VMRecord) -> None:
        """Write the record now, inside a :meth:`transaction` (whose lock this needs), where a
        step must be on disk before the next one (``resume``)."""
        write_json_atomic(files.state, record.model_dump(mode="json"))

    def update(self, name: str, change: Callable[[VMRecord], None]) -> VMRecord:
        with self.transaction(name) as (_, record):
            change(record)
        return record

    def names(self) -> list[str]:
        if not self.layout.vms.is_dir():
            return []
        return sorted(p.name for p in self.layout.vms.iterdir() if p.is_dir() and NAME_RE.fullmatch(p.name))

    def remove(self, name: str, check: Callable[[VMFiles], None] | None = None) -> None:
        """Forget the VM: its dir goes in one rename under its lock (a command that waited for
        the lock finds no VM once it has it), then its lock file, still held here, so that a
        gone VM leaves no lock behind. A command waiting for the lock polls it, opening the
        path afresh each time, so it next locks a new file there; one that opened the old
        file just before the unlink sees it unlinked once locked and tries again (filelock
        checks ``st_nlink``, from 3.21). ``check`` runs under the lock first and
        may refuse by raising (``down`` asks whether a machine runs in the dir: a ``resume``
        may have started one since it looked)."""
        try:
            with self.locked(name) as files:
                if check is not None:
                    check(files)
                remove_tree(files.root, ignore_errors=True)
                files.lock.unlink(missing_ok=True)
        except OSError as exc:  # no room for a lock file: a full disk must not keep a VM from going
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            remove_tree(self.files(name).root, ignore_errors=True)
