"""From a VM record to its backend, its status and its public :class:`~.models.VMInfo`."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from pathlib import Path

from .. import backends
from .._proc import DEFAULT_RUNNER, Runner
from ..backends.base import Backend, LaunchSpec, MachineRef, MachineRequest, PortForward, Preflight
from ..errors import AgentError, BootError, MvmError, PortInUse
from ..paths import VMFiles
from ..runtime import logs, machine_users, states
from ..runtime.registry import Registry, VMRecord
from ..runtime.states import VMStatus
from .models import GuestStatus, MountInfo, PortInfo, VMInfo

log = logging.getLogger(__name__)


def backend_for(record: VMRecord, runner: Runner = DEFAULT_RUNNER) -> Backend:
    """The backend that runs the recorded VM (by ``record.backend``), with ``runner``."""
    return backends.get(record.backend, runner)


def preflight(backend: Backend, request: MachineRequest) -> Preflight:
    """The backend's verdict, for a machine that runs as a user of its own when mvm is root:
    KVM only if /dev/kvm is open to a group that user is in (an explicit KVM request is
    refused at start, by :func:`start_confined`)."""
    verdict = backend.preflight(request)
    if (verdict.accel == "kvm" and request.accel == "auto" and machine_users.confining()
            and machine_users.kvm_group() is None):
        return dataclasses.replace(verdict, accel="tcg", reason=verdict.reason + "; but QEMU runs as a user of its "
                                   "own and /dev/kvm is open to no group: TCG (see `mvmctl doctor`)")
    return verdict


def start_confined(backend: Backend, spec: LaunchSpec,
                   on_started: Callable[[MachineRef], None] | None = None) -> MachineRef:
    """Start ``spec``, as a user of its own when mvm is root (:mod:`~mvm.runtime.machine_users`):
    the machine holds the lease on that user for as long as it runs."""
    lease = machine_users.lease(spec.name)
    if lease is None:
        return backend.start(spec, on_started)
    if spec.accel == "kvm" and machine_users.kvm_group() is None:
        lease.release()
        raise BootError(spec.name, "KVM works for root here, but QEMU runs as a user of its own and /dev/kvm is "
                        "open to no group it could be in",
                        hint="give /dev/kvm to a group (`chgrp kvm /dev/kvm && chmod 660 /dev/kvm`, as udev "
                        "does on most distributions), or use --hypervisor qemu-tcg")
    try:
        return backend.start(dataclasses.replace(spec, run_as=lease.run_as, hold_fds=(*spec.hold_fds, lease.fd)),
                             on_started)
    finally:
        lease.release()


def start_undoable(backend: Backend, spec: LaunchSpec, undo: ExitStack, stop_timeout: float = 5.0) -> MachineRef:
    """:func:`start_confined`, with the machine's stop put on ``undo`` by the backend, as it
    hands the machine over (``on_started``): a Ctrl-C as the start returns would otherwise
    leave a machine no undo knows."""
    def arm(machine: MachineRef) -> None:
        undo.callback(stop_quietly, backend, spec.files, machine, stop_timeout)

    return start_confined(backend, spec, arm)


def stop_quietly(backend: Backend, files: VMFiles, machine: MachineRef, timeout: float) -> None:
    """Stop a machine whose start failed. That failure is what the caller reports, so a stop
    that fails too is only logged (its VM dir then stays, for ``down`` to retry)."""
    try:
        backend.stop(files, machine, timeout)
    except MvmError as exc:
        log.warning("%s", exc.message)


def create_overlay(runner: Runner, backing: Path, backing_format: str, disk: Path, what: str) -> None:
    """A qcow2 ``disk`` that writes over ``backing``, which is never written."""
    runner.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", backing_format, "-b", backing, disk],
               desc=f"creating {what}")


def machine_alive(record: VMRecord, backend: Backend) -> bool:
    return record.machine is not None and backend.alive(record.machine.ref)


def status_of(record: VMRecord, files: VMFiles, backend: Backend) -> VMStatus:
    alive = machine_alive(record, backend)
    return states.derive(record.phase, alive, record.owner_alive, not alive and logs.clean_poweroff(files))


#: Why QEMU holds a machine's CPUs, in a user's words (QMP query-status's names), for the
#: states a `cont` ends: `resume` continues those.
PAUSED_WHY = {
    "io-error": "a write to one of its disks failed, most likely because the host disk holding it is full",
    "postmigrate": "a suspend was cut short after saving it (its mvmctl killed)",
    "paused": "it was paused (a QMP `stop`)",
}


def paused_state(record: VMRecord, files: VMFiles, backend: Backend) -> str | None:
    """Why the VM's machine does not run (QEMU holds it: its agent cannot answer), in QEMU's
    words, or None if it runs or cannot be asked."""
    if record.machine is None:
        return None
    try:
        state = backend.run_state(files, record.machine.ref)
    except MvmError:
        return None
    return None if state == "running" else state


def paused_error(record: VMRecord, files: VMFiles, backend: Backend) -> AgentError | None:
    """An error saying that the VM's machine does not run, why, and what gets it going (its
    agent cannot answer: an AgentError); None if it runs."""
    state = paused_state(record, files, backend)
    if state is None:
        return None
    name = record.name
    if state not in PAUSED_WHY:  # internal-error, guest-panicked, shutdown ...: no `cont` ends those
        return AgentError(name, f"VM {name!r} does not run: QEMU says {state!r}",
                          hint=f"`mvmctl restart {name}` boots it again (`mvmctl logs {name}` may say why)")
    first = (f"free space where its disks are (its VM dir {files.root}, its volumes' files), then "
             if state == "io-error" else "")
    return AgentError(name, f"VM {name!r} is paused: {PAUSED_WHY[state]}",
                      hint=f"{first}`mvmctl resume {name}` continues it")


def vm_info(record: VMRecord, files: VMFiles, status: VMStatus, guest: GuestStatus | None = None) -> VMInfo:
    """The public view of a record; ``guest`` (what the agent reports) adds health and
    failing services."""
    running = status is VMStatus.RUNNING
    return VMInfo(
        name=record.name,
        status=status,
        health="none" if not record.checks else (guest.health if guest else "unknown"),
        backend=record.backend,
        accel=record.accel,
        arch=record.arch,
        emulated=record.emulated or None,
        cpus=record.cpus,
        memory=record.memory,
        ports=[PortInfo(**p.model_dump()) for p in record.ports],
        volumes=[MountInfo(host=v.host, guest=v.guest, mode=v.mode, size_mb=v.size_mb, volume=v.volume)
                 for v in record.volumes],
        services=record.services,
        checks=record.checks,
        failing=[svc.name for svc in guest.services if svc.failing] if guest else [],
        env_keys=record.env_keys,
        image=record.image_key,
        frontend=record.frontend,
        source=record.source,
        pid=record.machine.pid if record.machine and status.active else None,
        created_at=record.created_at,
        started_at=record.started_at,
        # suspended time not counted, as in the guest's own uptime and its services'
        uptime=round(record.ran_for + time.time() - record.started_at, 1) if running and record.started_at else None,
        start=record.start,
        start_reason=record.start_reason or None,
        start_warning=record.start_warning,
        exit_reason=None if status.kept else logs.exit_reason(files),
        dir=str(files.root),
    )


def broken_info(name: str, files: VMFiles, error: str) -> VMInfo:
    return VMInfo(name=name, status=VMStatus.BROKEN, health="unknown", error=error, dir=str(files.root))


def name_the_vm_holding(forwards: Sequence[PortForward], registry: Registry) -> None:
    """A host port one of our own VMs forwards: raise PortInUse naming it (``ss`` would show a
    QEMU process only), with the ways to free it."""
    wanted = {(f.host_port, f.proto): f for f in forwards if f.host_port}
    for vm in registry.names():
        try:
            record = registry.load(vm)
        except MvmError:
            continue
        for p in record.ports:
            if (p.host_port, p.proto) in wanted:
                raise PortInUse(f"host port {p.host_port}/{p.proto} is forwarded by VM {vm!r} (to its guest port "
                                f"{p.guest_port})",
                                hint=f"pick another host port with -p, or free it: `mvmctl forward {vm} --rm -p "
                                f"{p.host_ip}:{p.host_port}:{p.guest_port}` or `mvmctl down {vm}`") from None
