"""The VM registry: one directory per VM under ``<state>/vms/<name>/``, no daemon.

A name is reserved by ``mkdir`` (atomic: of eight concurrent ``up`` calls exactly one
wins). ``vm.json`` carries a ``schema_version`` and is rewritten atomically under the VM's
lock. Liveness is derived, never stored: the recorded QEMU pid must exist *and* have the
recorded start time, so a reused pid never makes a dead VM look alive.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from .. import _proc
from .._atomic import write_json_atomic
from ..errors import StateError, VMExists, VMNotFound
from ..paths import Layout, VMFiles

VM_SCHEMA = 1
Status = Literal["starting", "running", "stopping", "exited", "crashed"]


class PortRecord(BaseModel):
    host_ip: str = "127.0.0.1"
    host_port: int
    guest_port: int
    proto: Literal["tcp", "udp"] = "tcp"


class VolumeRecord(BaseModel):
    host: str
    guest: str
    mode: Literal["ro", "secret", "rw"]
    size_mb: int | None = None
    image: str | None = None
    volume: str | None = None  # the persistent volume's id (writable volumes)


class VMRecord(BaseModel):
    model_config = ConfigDict(extra="ignore")

    schema_version: int = VM_SCHEMA
    name: str
    state: Literal["starting", "running", "stopping"] = "starting"
    owner_pid: int | None = None  # the mvmctl process that is starting the VM
    owner_start: int | None = None
    pid: int | None = None
    pid_start: int | None = None
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
            hint="stop it with the mvm that started it, or `mvmctl cleanup` to forget it",
        )
    return record


class Registry:
    def __init__(self, layout: Layout) -> None:
        self.layout = layout

    def files(self, name: str) -> VMFiles:
        return VMFiles(self.layout.vm_dir(name))

    def reserve(self, record: VMRecord) -> VMFiles:
        """Claim ``record.name`` (mkdir is the atomic test) and write its first vm.json."""
        self.layout.vms.mkdir(parents=True, exist_ok=True, mode=0o700)
        files = self.files(record.name)
        try:
            os.mkdir(files.root, 0o700)
        except FileExistsError:
            status = self.status_of(record.name)
            hint = (
                f"stop it first (`mvmctl down {record.name}`) or pick another --name"
                if status in ("running", "starting", "stopping")
                else f"it is {status}: inspect it with `mvmctl logs {record.name}`, "
                f"then remove it with `mvmctl down {record.name}`"
            )
            raise VMExists(record.name, f"a VM named {record.name!r} already exists ({status})",
                           hint=hint) from None
        record.created_at = time.time()
        record.owner_pid = os.getpid()
        record.owner_start = _proc.start_time(os.getpid())
        write_json_atomic(files.state, record.model_dump(mode="json"), mode=0o600)
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
    def transaction(self, name: str) -> Iterator[tuple[VMFiles, VMRecord]]:
        """The VM's record under its lock; written back (atomically) if the block succeeds."""
        from filelock import FileLock

        files = self.files(name)
        if not files.root.is_dir():
            raise VMNotFound(name, f"no VM named {name!r}", hint="list VMs with `mvmctl ls`")
        with FileLock(str(files.lock), mode=0o600):
            record = _read(files)
            yield files, record
            write_json_atomic(files.state, record.model_dump(mode="json"), mode=0o600)

    def update(self, name: str, change: Callable[[VMRecord], None]) -> VMRecord:
        with self.transaction(name) as (_, record):
            change(record)
        return record

    def names(self) -> list[str]:
        if not self.layout.vms.is_dir():
            return []
        return sorted(p.name for p in self.layout.vms.iterdir() if p.is_dir())

    def remove(self, name: str) -> None:
        shutil.rmtree(self.files(name).root, ignore_errors=True)

    def status_of(self, name: str) -> str:
        try:
            return derive_status(self.load(name), self.files(name))
        except (StateError, VMNotFound):
            return "broken"


def derive_status(record: VMRecord, files: VMFiles) -> Status:
    if _proc.alive(record.pid, record.pid_start):
        if record.state == "stopping":
            return "stopping"
        return "running" if record.state == "running" else "starting"
    if record.state == "starting" and _proc.alive(record.owner_pid, record.owner_start):
        return "starting"
    return "exited" if clean_poweroff(files) else "crashed"


def clean_poweroff(files: VMFiles) -> bool:
    """The guest said it was powering off (as opposed to QEMU being killed, or a panic)."""
    try:
        with open(files.events_log, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 4096))
            tail = f.read().decode(errors="replace")
    except OSError:
        return False
    return '"msg":"powering off"' in tail


def exit_reason(files: VMFiles) -> str:
    """A short human reason for a VM that is no longer running."""
    if clean_poweroff(files):
        return "powered off"
    try:
        console = files.console_log.read_bytes()[-8192:].decode(errors="replace")
    except OSError:
        console = ""
    if "Kernel panic" in console:
        line = next((ln for ln in console.splitlines() if "Kernel panic" in ln), "kernel panic")
        return line.split("] ", 1)[-1].strip()
    if "boot failed" in console:
        return "guest init failed to boot"
    return "QEMU exited unexpectedly (killed?)"


def record_view(record: VMRecord, files: VMFiles) -> dict[str, Any]:
    status = derive_status(record, files)
    view = record.model_dump(mode="json")
    view["status"] = status
    view["uptime"] = (
        round(time.time() - record.started_at, 1)
        if status == "running" and record.started_at
        else None
    )
    if status in ("exited", "crashed"):
        view["exit_reason"] = exit_reason(files)
    view["dir"] = str(files.root)
    return view

