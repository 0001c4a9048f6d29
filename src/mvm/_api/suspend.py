"""``suspend`` and ``resume``: a running VM saved to disk and its machine stopped, then
brought back with its processes, ``/tmp`` and volumes as they were.

The machine is saved whole (its RAM too) into the VM dir, and started again the way it
ran (``launch.json``), restoring the saved state instead of booting. While suspended it
keeps its writable volumes: each records the suspended VM as its holder before the machine
lets go of its lock, and only that VM's ``resume`` takes it again (its guest has the file
system mounted, with writes not yet on disk). ``down`` of a suspended VM removes the saved
state with the rest of the VM dir.
"""

from __future__ import annotations

import json
import time
from contextlib import ExitStack
from pathlib import Path

from .._proc import DEFAULT_RUNNER, Runner, signals_deferred
from ..backends.base import LAUNCH_SCHEMA, Backend, Incoming, LaunchSpec, MachineRef, PortForward, spec_from_json
from ..errors import PortInUse, RestoreFailed, StateError, VMError, VMNotRunning
from ..paths import Layout, VMFiles
from ..runtime import agent
from ..runtime.registry import ProcessRecord, Registry, VMRecord
from ..runtime.states import VMStatus
from ..volumes.store import Holder, VolumeStore
from .machines import PAUSED_WHY, backend_for, paused_error, paused_state, start_undoable, status_of
from .models import VMInfo
from .vm import VM

#: How long the guest of a machine an interrupted `resume` left has to answer to be taken.
STRAY_ANSWER_SECS = 5.0


def suspend(name: str, *, layout: Layout | None = None, runner: Runner = DEFAULT_RUNNER) -> VMInfo:
    layout = layout or Layout.default()
    registry = Registry(layout)
    with registry.transaction(name) as (files, record):
        backend = backend_for(record, runner)
        status = status_of(record, files, backend)
        if status is not VMStatus.RUNNING or record.machine is None:
            raise VMNotRunning(name, f"VM {name!r} is {status}: only a running VM can be suspended",
                               hint=f"`mvmctl ls` shows it; a suspended one goes on with `mvmctl resume {name}`")
        if not files.launch.is_file():
            raise StateError(f"{name} was started by an mvm that does not record how (no {files.launch.name})",
                             hint=f"restart it once (`mvmctl restart {name}`); then it can be suspended")
        machine = record.machine.ref
        backend.save(files, machine, files.saved_state)
        store = VolumeStore(layout)
        for v in record.volumes:  # before the machine lets go of their locks: no other VM gets them
            if v.volume is not None:
                store.set_holder(v.volume, Holder(what=f"suspended VM {name!r}", vm=name, pid=0,
                                                  since=time.time(), suspended=True))
        backend.stop(files, machine, 5.0)
        if record.started_at is not None:
            record.ran_for += max(0.0, time.time() - record.started_at)
        record.phase, record.machine, record.started_at = "suspended", None, None
    return VM(name, layout, runner).info()


def resume(name: str, *, layout: Layout | None = None, runner: Runner = DEFAULT_RUNNER,
           ask_guest: bool = True) -> VMInfo:
    layout = layout or Layout.default()
    registry = Registry(layout)
    store = VolumeStore(layout)
    with registry.transaction(name) as (files, record), ExitStack() as undo:
        if record.phase == "running" and _continue_paused(record, files, runner, store):
            return VM(name, layout, runner).info(ask_guest=ask_guest)
        if record.phase != "suspended" or not files.saved_state.is_file():
            raise VMError(name, f"VM {name!r} is not suspended", hint="see `mvmctl ls`")
        spec = _read_launch(name, files)
        spec.incoming = Incoming(files.saved_state, ignore_shared=False)
        spec.starts_services = False  # they run already
        # the forwards of now, not of its `up`: `forward` may have added or removed some since
        spec.ports = [PortForward(p.host_port, p.guest_port, p.host_ip, p.proto) for p in record.ports]
        missing = [f for f in (spec.kernel, spec.initrd, *spec.root_backing) if f is not None and not f.exists()]
        if missing:  # removed by hand, or by another MVM_HOME's rmi before this VM's mark existed
            raise StateError(f"VM {name!r} cannot be resumed: its image is gone ({missing[0]} was removed)",
                             hint=f"`mvmctl down {name}` discards the saved machine; build the image again and "
                             "`up` it (a VM made by an mvm older than its mark in the cache is not seen by rmi and "
                             "cleanup of another MVM_HOME sharing MVM_CACHE)")
        gone = [v.host for v in record.volumes if v.image is not None and not Path(v.image).exists()]
        if gone:
            raise StateError(f"VM {name!r} cannot be resumed: its volume {gone[0]} is gone (removed by hand?)",
                             hint=f"`mvmctl down {name}` discards the saved machine; `up` it again with the volume")
        backend = backend_for(record, runner)
        machine = _left_by_an_interrupted_resume(backend, files, name)
        if machine is None:
            locks = [store.lock(v.volume, f"{v.host} ({v.volume})", attaching=True, resuming=name)
                     for v in record.volumes if v.volume is not None]
            try:
                spec.hold_fds = tuple(lock.fd for lock in locks)
                try:
                    machine = start_undoable(backend, spec, undo, stop_timeout=2.0)  # stopped unless it comes back
                except RestoreFailed as exc:
                    exc.hint = (f"the saved machine may be damaged (QEMU's words above): `mvmctl down {name}` "
                                "discards it; its volumes are kept")
                    raise
                except PortInUse as exc:  # its hint is `up`'s: resume has no -p
                    raise PortInUse(exc.message, hint=f"free it (`ss -ltnup` shows who has it), or change the forward "
                                    f"while {name} is suspended: `mvmctl forward {name} --rm -p HOST:GUEST`, and "
                                    f"`mvmctl forward {name} -p OTHER:GUEST`; then resume") from None
            finally:
                for lock in locks:
                    lock.release()
        running = machine
        agent.wait_ready(files, name, 30.0, lambda: backend.alive(running))  # and sets the clock
        # It runs: the rest happens whole, an interrupt held until the record says so (one in
        # between stopped the machine after its saved state was gone, the record "suspended").
        with signals_deferred():
            _hold_volumes(store, record, machine)  # only now: a resume that failed left them the suspended VM's
            record.phase, record.machine = "running", ProcessRecord(pid=machine.pid, start_time=machine.start_time)
            record.started_at = time.time()
            registry.write(files, record)
            undo.pop_all()
            files.saved_state.unlink(missing_ok=True)
    return VM(name, layout, runner).info(ask_guest=ask_guest)


def _continue_paused(record: VMRecord, files: VMFiles, runner: Runner, store: VolumeStore) -> bool:
    """Run again a machine QEMU paused (a disk write failed on a full host disk, a suspend cut
    short after saving it) and wait for its agent; False if it was not paused. What a cut
    short suspend left goes: its saved state, and its volumes' "suspended" holders."""
    backend = backend_for(record, runner)
    if record.machine is None or not backend.alive(machine := record.machine.ref):
        return False
    state = paused_state(record, files, backend)
    if state is None:
        return False
    if state not in PAUSED_WHY:
        raise paused_error(record, files, backend) or VMError(record.name, f"VM {record.name!r} is {state}")
    backend.resume(files, machine)
    if state == "io-error":  # QEMU retries the failed write at once: paused again if the disk is still full
        for _ in range(10):
            time.sleep(0.05)
            if (again := paused_error(record, files, backend)) is not None:
                raise again
    agent.wait_ready(files, record.name, 30.0, lambda: backend.alive(machine))  # and sets the clock
    _hold_volumes(store, record, machine)
    files.saved_state.unlink(missing_ok=True)
    return True


def _hold_volumes(store: VolumeStore, record: VMRecord, machine: MachineRef) -> None:
    """The VM's writable volumes are its running machine's again (not the suspended VM's)."""
    for v in record.volumes:
        if v.volume is not None:
            store.set_holder(v.volume, Holder(what=f"VM {record.name!r} (pid {machine.pid})", vm=record.name,
                                              pid=machine.pid, pid_start=machine.start_time, since=time.time()))


def _left_by_an_interrupted_resume(backend: Backend, files: VMFiles, name: str) -> MachineRef | None:
    """The machine a `resume` killed before it recorded it (SIGKILL, a lost session) left in
    the VM dir, if its guest answers: it is this VM resumed, and is taken as it is. (Another
    machine restored from the saved state would hold the same root disk, and its memory would
    be older than the disks the first one's guest has written since.) One whose guest does not
    answer (its restore cut short) is stopped, and the resume starts anew."""
    for machine in backend.strays(files):
        def alive(m: MachineRef = machine) -> bool:
            return backend.alive(m)

        try:
            agent.wait_ready(files, name, STRAY_ANSWER_SECS, alive)
        except VMError:
            backend.stop(files, machine, 2.0)
        else:
            return machine
    return None


def _read_launch(name: str, files: VMFiles) -> LaunchSpec:
    """How the suspended machine ran (``launch.json``); a damaged or foreign record is a
    clear error, never a traceback: ``down`` still removes the VM and keeps its volumes."""
    discard = f"`mvmctl down {name}` discards the saved machine (its volumes are kept)"
    try:
        launch = json.loads(files.launch.read_text())
        if not isinstance(launch, dict) or launch.get("schema_version") != LAUNCH_SCHEMA:
            raise VMError(name, f"VM {name!r} was suspended by another version of mvm and cannot be resumed",
                          hint=discard)
        return spec_from_json(launch["spec"], files)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise StateError(f"VM {name!r} cannot be resumed: its {files.launch.name} is unreadable or damaged "
                         f"({type(exc).__name__}: {exc})", hint=discard) from None
