"""What an ``up`` is asked for and what it will do: :class:`UpRequest` checks every value the
caller typed before anything is built or created; :func:`plan_up` decides the rest once the
image is built (the accelerator, a template to restore, the VM's record)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from .. import backends
from ..backends.base import (
    AccelPreference,
    Backend,
    MachineRequest,
    PortForward,
    Share,
)
from ..builders.store import Image
from ..errors import UsageError
from ..names import MIN_MEMORY_MIB, check_vm_name
from ..paths import Layout
from ..runtime.registry import PortRecord, VMRecord
from . import templates, volume_attach
from .machines import preflight
from .options import check_host_cpus, check_host_memory, parse_env, parse_port

BOOT_TIMEOUT = 90.0
#: A restored guest answers in well under a second; one that does not is broken.
RESTORE_BOOT_TIMEOUT = 20.0
HYPERVISORS: dict[str, tuple[str, AccelPreference]] = {"auto": ("qemu", "auto"), "qemu-kvm": ("qemu", "kvm"),
                                                       "qemu-tcg": ("qemu", "tcg")}


@dataclass(frozen=True)
class UpRequest:
    """What the caller asked for, every value checked. Nothing is created yet."""

    name: str | None = None
    cpus: int | None = None
    memory: int | None = None
    forwards: list[PortForward] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    volumes: list[str] = field(default_factory=list)
    backend: str = backends.DEFAULT
    accel: AccelPreference = "auto"
    shares: list[Share] = field(default_factory=list)
    cold: bool = False  #: boot, even where a template could be restored
    log_limit_mb: int | None = None  #: None: the spec's (logLimitMb, default 64)
    hypervisor: str = "auto"  #: as asked for (a HYPERVISORS key): what `restart` asks for again
    source: str = ""  #: this up's spec file or flake (an identical spec elsewhere may have built the image)

    @classmethod
    def parse(
        cls,
        *,
        name: str | None = None,
        cpus: int | None = None,
        memory: int | None = None,
        ports: Sequence[str | int | PortForward] = (),
        env: Mapping[str, str] | Sequence[str] | None = None,
        volumes: Sequence[str] = (),
        hypervisor: str = "auto",
        shares: Sequence[Share] = (),
        cold: bool = False,
        log_limit_mb: int | None = None,
    ) -> UpRequest:
        for what, value in (("cpus", cpus), ("memory", memory), ("log_limit_mb", log_limit_mb)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
                raise UsageError(f"{what}={value!r}: must be a whole number")
        for what, values in (("ports", ports), ("volumes", volumes)):
            if isinstance(values, (str, int)):
                raise UsageError(f"{what}={values!r}: give a list", hint=f"{what}=[{values!r}]")
        if cpus is not None and not 1 <= cpus <= 64:
            raise UsageError(f"--cpus {cpus}: must be between 1 and 64",
                             hint=f"this host has {os.cpu_count() or 1}: give 1 to that many")
        if cpus is not None:
            check_host_cpus(cpus, f"--cpus {cpus}")
        if memory is not None and not MIN_MEMORY_MIB <= memory <= 65536:
            raise UsageError(f"--memory {memory}: must be between {MIN_MEMORY_MIB} and 65536 MiB",
                             hint=f"a guest needs at least {MIN_MEMORY_MIB} MiB to boot its kernel and agent"
                             if memory < MIN_MEMORY_MIB else "64 GiB is the most mvm gives one VM")
        if memory is not None:
            check_host_memory(memory, f"--memory {memory}")
        if name is not None:
            try:
                check_vm_name(name)
            except ValueError as exc:
                raise UsageError(f"--name: {exc}") from None
        if log_limit_mb is not None and log_limit_mb < 1:
            raise UsageError(f"--log-limit {log_limit_mb}: must be at least 1 MiB",
                             hint="the cap on the VM's console and service logs on the host (default: the spec's "
                             "logLimitMb, else 64); logs cannot be turned off, only kept small, e.g. --log-limit 1")
        if hypervisor not in HYPERVISORS:
            raise UsageError(f"unknown hypervisor {hypervisor!r}", hint=f"use one of: {', '.join(HYPERVISORS)}")
        backend, accel = HYPERVISORS[hypervisor]
        return cls(
            name=name,
            cpus=cpus,
            memory=memory,
            forwards=[p if isinstance(p, PortForward) else parse_port(str(p)) for p in ports],  # 8080: a guest port
            env=parse_env(env),
            volumes=list(volumes),
            backend=backend,
            accel=accel,
            shares=list(shares),
            cold=cold,
            log_limit_mb=log_limit_mb, hypervisor=hypervisor,
        )


@dataclass
class UpPlan:
    """What ``up`` will do, decided once, after the build and before anything is created."""

    request: UpRequest
    image: Image
    backend: Backend
    volumes: list[volume_attach.Planned]
    record: VMRecord
    boot_timeout: float = BOOT_TIMEOUT
    restore: templates.Restore | None = None

    @property
    def name(self) -> str:
        return self.record.name


def plan_up(request: UpRequest, image: Image, backend: Backend, planned: list[volume_attach.Planned],
            layout: Layout, boot_timeout: float = BOOT_TIMEOUT) -> UpPlan:
    """Ask the backend's preflight for the accelerator and fix the VM's record."""
    guest = image.manifest.guest
    name = request.name or image.name
    verdict = preflight(backend, MachineRequest(
        name=name, kernel=image.kernel, initrd=image.initrd, probe_cache=layout.probes, accel=request.accel,
        arch=image.manifest.arch, shares=bool(request.shares), disks=len(planned),
    ))
    source = image.manifest.source
    cpus, memory = request.cpus or guest.cpus, request.memory or guest.memory
    if not request.cpus:
        check_host_cpus(cpus, f"the spec's cpus = {cpus}")
    if not request.memory:
        check_host_memory(memory, f"the spec's memory = {memory}")
    choice = templates.choose(image, cpus=cpus, memory=memory, env=request.env, volumes=len(planned),
                              shares=bool(request.shares), cold=request.cold, backend=backend, layout=layout)
    restore = choice.restore
    record = VMRecord(
        name=name,
        backend=backend.name,
        accel=verdict.accel,
        image_key=image.key,
        image_path=str(image.path),
        frontend=image.manifest.frontend,
        source=request.source or str(source.get("path") or source.get("flake") or ""),
        cpus=cpus,
        memory=memory,
        ports=[PortRecord.of(f) for f in request.forwards],
        env_keys=sorted(request.env),
        services=sorted(guest.services),
        checks=sorted(guest.health_checks),
        volumes=volume_attach.records(planned, layout),
        start="restored" if restore else "cold",
        start_reason=choice.reason,
        start_warning=choice.warn,
        arch=image.manifest.arch,
        emulated=verdict.emulated or "",
        hypervisor=request.hypervisor, log_limit_mb=request.log_limit_mb,
    )
    timeout = min(boot_timeout, RESTORE_BOOT_TIMEOUT) if restore else boot_timeout
    return UpPlan(request, image, backend, planned, record, timeout, restore)
