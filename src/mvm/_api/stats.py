"""``stats``: CPU and memory of running VMs (host side) and of their services (guest side).

CPU is a rate, so it is measured over an interval: usage is sampled, the interval passes,
usage is sampled again. The host figures come from the backend (the QEMU process), the
guest's from its agent (each service's session: the service and what it started).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from .._proc import DEFAULT_RUNNER, Runner
from .._untrusted import as_float, as_int
from ..backends.base import MachineUsage
from ..errors import MvmError
from ..paths import Layout
from ..runtime import agent
from ..runtime.registry import Registry
from .machines import backend_for, status_of
from .models import ServiceUsage, VMUsage
from .vm import VM


@dataclass(frozen=True)
class _ServiceSample:
    pid: int | None
    cpu_seconds: float
    memory_bytes: int


@dataclass(frozen=True)
class _GuestSample:
    """What the agent's ``stats`` says, only well-typed values kept (the guest is not trusted)."""

    services: dict[str, _ServiceSample] = field(default_factory=dict)
    memory_total: int | None = None
    memory_available: int | None = None

    @classmethod
    def of(cls, reply: dict[str, Any]) -> _GuestSample:
        raw = reply.get("services")
        services = {str(name): _ServiceSample(pid=as_int(svc.get("pid"), 0) or None,
                                              cpu_seconds=as_float(svc.get("cpu_seconds")) or 0.0,
                                              memory_bytes=max(0, as_int(svc.get("memory_bytes"), 0)))
                    for name, svc in (raw.items() if isinstance(raw, dict) else ()) if isinstance(svc, dict)}
        return cls(services, _bytes(reply.get("memory_total")), _bytes(reply.get("memory_available")))


def _sample(vm: VM, runner: Runner) -> tuple[float, MachineUsage, _GuestSample]:
    record = vm.record()
    assert record.machine is not None
    machine = backend_for(record, runner).usage(record.machine.ref)
    try:
        guest = _GuestSample.of(agent.request(vm.files, vm.name, "stats", timeout=5.0))
    except MvmError:
        guest = _GuestSample()
    return time.monotonic(), machine, guest


def _bytes(value: object) -> int | None:
    number = as_int(value, -1)
    return number if number >= 0 else None


def stats(names: list[str] | None = None, *, interval: float = 1.0, layout: Layout | None = None,
          runner: Runner = DEFAULT_RUNNER) -> list[VMUsage]:
    """Usage of the named VMs (all running ones if none are named), over ``interval`` seconds."""
    layout = layout or Layout.default()
    registry = Registry(layout)
    vms = []
    for name in names or registry.names():
        try:
            record = registry.load(name)
            running = status_of(record, registry.files(name), backend_for(record, runner)).active
        except MvmError:
            if names:
                raise
            continue
        if running:
            vms.append(VM(name, layout, runner))
        elif names:
            VM(name, layout, runner).require_running()  # raises, with the hint its status calls for
    first = {vm.name: _sample(vm, runner) for vm in vms}
    time.sleep(interval)
    out = []
    for vm in vms:
        t0, m0, g0 = first[vm.name]
        t1, m1, g1 = _sample(vm, runner)
        wall = max(t1 - t0, 1e-3)
        services = []
        for svc, now in sorted(g1.services.items()):
            was = g0.services.get(svc)
            cpu = (now.cpu_seconds - (was.cpu_seconds if was is not None and was.pid == now.pid else 0)) / wall
            services.append(ServiceUsage(name=svc, pid=now.pid, cpu_percent=round(max(cpu, 0) * 100, 1),
                                         memory_bytes=now.memory_bytes))
        total, available = g1.memory_total, g1.memory_available
        out.append(VMUsage(
            name=vm.name,
            cpu_percent=round((m1.cpu_seconds - m0.cpu_seconds) / wall * 100, 1),
            memory_bytes=m1.memory_bytes,
            guest_memory_total=total,
            guest_memory_used=total - available if total is not None and available is not None else None,
            services=services,
        ))
    return out
