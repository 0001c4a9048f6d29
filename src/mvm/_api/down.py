"""``down``: stop a VM, gracefully first, and forget it.

The ladder: the guest agent stops the services, syncs and powers off (nothing is lost);
if the agent does not answer or the machine outlives ``timeout``, the backend stops it
(QMP ``quit``, SIGTERM, SIGKILL: unsynced guest data is lost on these rungs). Only a
machine that is gone lets the VM dir go: if the machine survives everything, ``down``
raises :class:`~mvm.errors.StopFailed` and the VM stays listed (status ``stopping``), so a
later ``down`` (with more rights) can finish the job. Volume locks belong to the machine's
process and are released exactly when it ends. The VM's logs are kept (``Layout.retained_logs``)
until ``cleanup`` or the next ``up`` of the same name.
"""

from __future__ import annotations

import errno
import time

from .. import backends
from .._atomic import remove_tree
from .._proc import DEFAULT_RUNNER, Runner
from ..backends.base import Backend, MachineRef
from ..builders.store import ImageStore
from ..errors import MvmError, StopFailed, VMError, VMNotFound
from ..guest import protocol
from ..paths import Layout, VMFiles
from ..runtime import agent, logs
from ..runtime.registry import Registry, VMRecord
from ..volumes.store import VolumeStore
from .machines import backend_for
from .models import DownResult

#: Seconds `down` waits for the guest to power off; its services get all but SHUTDOWN_MARGIN
#: of them to stop (docker stop's 10 s by default).
SHUTDOWN_TIMEOUT = 15.0
SHUTDOWN_MARGIN = 5.0


def _machines(record: VMRecord | None, files: VMFiles, backend: Backend) -> list[MachineRef]:
    """The recorded machine, and any other the backend finds running in the VM dir."""
    found = [record.machine.ref] if record is not None and record.machine is not None else []
    found += [m for m in backend.strays(files) if m.pid not in {f.pid for f in found}]
    return found


def _wait_gone(backend: Backend, machine: MachineRef, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while backend.alive(machine):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def stop_grace(timeout: float) -> float:
    """The seconds services get between SIGTERM and SIGKILL within a ``down`` of ``timeout``:
    the rest of the guest's shutdown (sync, unmount, power-off) keeps SHUTDOWN_MARGIN of it."""
    return min(max(0.0, timeout - SHUTDOWN_MARGIN), protocol.MAX_STOP_GRACE)


def _stop(name: str, files: VMFiles, backend: Backend, machine: MachineRef, timeout: float) -> str:
    grace = stop_grace(timeout)
    try:
        agent.request(files, name, "shutdown", grace=grace, timeout=3.0)
    except MvmError:
        return backend.stop(files, machine, 5.0)  # no agent: straight to the hypervisor's rungs
    if _wait_gone(backend, machine, timeout):
        killed = logs.services_killed_at_stop(files)
        return "shut down cleanly" + (f"; {', '.join(killed)} killed after {grace:g}s: ignored SIGTERM"
                                      if killed else "")
    how = backend.stop(files, machine, 5.0)
    return (f"{how}: the guest had not powered off after {timeout:g}s; what it wrote since its shutdown "
            "began may be lost")


def down(name: str, *, timeout: float = SHUTDOWN_TIMEOUT, layout: Layout | None = None,
         runner: Runner = DEFAULT_RUNNER, keep_logs: bool = True) -> DownResult:
    """Stop a VM and remove its runtime dir. Raises VMNotFound for an unknown name (the CLI
    reports that and exits 0, so ``mvmctl down`` can be repeated safely), StopFailed when
    the machine cannot be stopped (the VM is then kept). ``keep_logs=False`` drops the VM's
    logs with its dir instead of keeping them for ``mvmctl logs`` (the pytest plugin's
    throwaway VMs), and the logs an earlier ``down`` of the name kept, if it is gone."""
    layout = layout or Layout.default()
    registry = Registry(layout)
    files = registry.files(name)
    if not files.root.exists():
        if not keep_logs:  # brought down before, its logs kept: "nothing of it stays" holds for those too
            remove_tree(layout.retained_logs / name, ignore_errors=True)
        raise VMNotFound(name, f"no VM named {name!r}", hint="list VMs with `mvmctl ls`")
    try:
        record: VMRecord | None = registry.load(name)
    except MvmError:
        record = None  # unreadable state: its machine is still found by the VM dir
    backend = backend_for(record, runner) if record is not None else backends.get(backends.DEFAULT, runner)
    # while its `up` runs, even once its machine does: that `up` then failed with "no VM named"
    if record is not None and record.phase == "starting" and record.owner_alive:
        assert record.owner is not None
        raise VMError(name, f"VM {name!r} is being started by process {record.owner.pid}",
                      hint="wait for that `mvmctl up` to finish (or interrupt it), then run down")
    how = "not running" if record is None or record.phase != "suspended" else "not running; its saved state discarded"
    for machine in _machines(record, files, backend):
        if not backend.alive(machine):
            continue
        try:
            registry.update(name, lambda r: setattr(r, "phase", "stopping"))
        except (MvmError, OSError):
            pass  # unreadable state, or a full disk: stop the machine anyway
        how = _stop(name, files, backend, machine, timeout)
    def no_machine(files: VMFiles) -> None:  # asked again under the VM's lock, just before it goes
        if backend.strays(files):  # a machine we could not see before (a resume started it meanwhile?)
            raise StopFailed(name, f"a machine still runs in {files.root}", hint=f"run `mvmctl down {name}` again")

    no_machine(files)
    if keep_logs:
        try:
            logs.retain(files, layout.retained_logs / name)  # `mvmctl logs NAME` still works
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            how += "; its logs were not kept (the disk is full)"  # a full disk must not keep a VM from going
    registry.remove(name, no_machine)
    if record is not None and record.phase == "suspended":  # its volumes are free now, and stay free
        _release_volumes(name, record, layout)  # (a new VM of this name, suspended later, must not own them)
    if record is not None:
        ImageStore(layout.images).remove_user(record.image_key, files.root)
    return DownResult(name=name, how=how)


def _release_volumes(name: str, record: VMRecord, layout: Layout) -> None:
    store = VolumeStore(layout)
    for v in record.volumes:
        if v.volume is not None:
            holder = store.raw_holder(v.volume)
            if holder is not None and holder.suspended and holder.vm == name:
                store.clear_holder(v.volume)
