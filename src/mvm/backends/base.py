"""What a hypervisor backend must do, and the plain data it is given.

A backend owns its machines: it judges whether a machine can run here (``check_ports``
before anything is built, ``preflight`` once the image exists), starts it, tells whether it
still runs, adds forwards to it and stops it. Orchestration (``mvm._api``) never reaches
past this seam, so QEMU, the in-memory :mod:`~mvm.backends.fake` used by unit tests, and a
later Firecracker backend are interchangeable.

Backends are stateless objects: everything they need to manage a running machine later, from
another ``mvmctl`` process, is in the VM dir (:class:`~mvm.paths.VMFiles`) and the
:class:`MachineRef` recorded at start.

A backend that can save machines and restore them (fast start, suspend) announces
:data:`SAVE_RESTORE`: :meth:`Backend.save` writes a paused machine to a file, and
:meth:`Backend.start` with :attr:`LaunchSpec.incoming` restores one instead of booting. A
machine profile per guest architecture is chosen from :attr:`LaunchSpec.arch`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

from pydantic import TypeAdapter

from .._proc import RunAs as RunAs
from ..names import Arch as Arch
from ..paths import VMFiles

Accel = Literal["kvm", "tcg"]
#: What the user asked for: prove KVM works and use it, or insist on one.
AccelPreference = Literal["auto", "kvm", "tcg"]
Proto = Literal["tcp", "udp"]

#: Capabilities a backend may announce (:meth:`Backend.capabilities`).
HOTPLUG_FORWARD = "hotplug-forward"  #: forwards can be added to a running machine
VOLUMES = "volumes"  #: extra block devices (``-v``)
SHARES = "shares"  #: live host directories (virtiofs), for ``mvmctl dev``
SAVE_RESTORE = "save-restore"  #: save a machine to a file and restore it later (fast start, suspend)
HOTPLUG_DISK = "hotplug-disk"  #: attach a disk to a running machine (volumes of a restored clone)


@dataclass(frozen=True)
class PortForward:
    """A host port forwarded to a guest port. ``host_port`` 0 asks the backend to pick a free
    one; :meth:`Backend.forward` returns the forward it opened, with the port it picked."""

    host_port: int
    guest_port: int
    host_ip: str = "127.0.0.1"
    proto: Proto = "tcp"

    def __str__(self) -> str:
        return f"{self.host_ip}:{self.host_port}->{self.guest_port}/{self.proto}"


@dataclass(frozen=True)
class Disk:
    path: Path
    serial: str
    readonly: bool
    #: The hot-plug slot it was attached to in a running machine (None: attached at start).
    #: A machine saved with it there must be started with it there to be restored.
    slot: int | None = None


@dataclass(frozen=True)
class Share:
    """A host directory the guest mounts live (virtiofs), read-write: ``mount -t virtiofs TAG DIR``."""

    tag: str
    path: Path


@dataclass(frozen=True)
class MemoryFile:
    """Guest RAM in a file instead of anonymous memory. ``shared``: the machine writes to
    the file (a template being made); else the file is mapped copy-on-write, so clones share
    its unchanged pages in the page cache and never each other's writes."""

    path: Path
    shared: bool


@dataclass(frozen=True)
class Incoming:
    """Restore a machine from ``state`` (written by :meth:`Backend.save`) instead of booting.
    ``ignore_shared``: the save left the RAM out (it is in the :class:`MemoryFile`)."""

    state: Path
    ignore_shared: bool


@dataclass(frozen=True)
class Saved:
    bytes: int
    seconds: float


@dataclass(frozen=True)
class MachineRef:
    """How a backend finds a machine it started, from any later process: the pid of the
    process that runs it and that process's start time (a reused pid never matches)."""

    pid: int
    start_time: int | None


@dataclass(frozen=True)
class MachineUsage:
    """What a machine costs the host now: CPU time used so far and resident memory."""

    cpu_seconds: float
    memory_bytes: int


@dataclass(frozen=True)
class MachineRequest:
    """What :meth:`Backend.preflight` judges: the machine an ``up`` is about to ask for."""

    name: str
    kernel: Path
    initrd: Path | None
    #: Where verdicts that cost a boot (the KVM probe) are cached.
    probe_cache: Path
    accel: AccelPreference = "auto"
    arch: Arch = "x86_64"
    shares: bool = False
    disks: int = 0


@dataclass(frozen=True)
class Preflight:
    """The backend's verdict: which accelerator the machine gets, and why. ``emulated`` is
    set when the guest's architecture is not the host's: one line saying so and what it costs."""

    accel: Accel
    reason: str
    emulated: str | None = None


@dataclass
class LaunchSpec:
    name: str
    files: VMFiles
    kernel: Path
    initrd: Path | None
    rootfs: Path
    cpus: int
    memory: int
    accel: Accel
    arch: Arch = "x86_64"
    ports: list[PortForward] = field(default_factory=list)
    disks: list[Disk] = field(default_factory=list)
    config_disk: Path | None = None
    #: Open descriptors the hypervisor process inherits and keeps for its whole life: the
    #: volume locks (``flock``), which are thereby released exactly when the VM process ends.
    hold_fds: tuple[int, ...] = ()
    shares: list[Share] = field(default_factory=list)
    #: What ``rootfs`` (the VM's own qcow2, written) is a copy-on-write layer over, top
    #: down, all read-only: a template's qcow2 disk, then the image's raw ``rootfs.ext4``
    #: (the last one is raw, the others qcow2). Given explicitly, so the backend never
    #: follows a path written in a qcow2 header.
    root_backing: tuple[Path, ...] = ()
    memory_file: MemoryFile | None = None
    #: Empty slots for disks attached later (:meth:`Backend.attach_disk`); part of the device
    #: set, so a template and its clones must agree on it.
    hotplug_slots: int = 0
    incoming: Incoming | None = None
    kernel_args: tuple[str, ...] = ()
    #: The most the VM's console and event logs may take on the host, in bytes, whatever
    #: the guest writes (older output is dropped first).
    log_limit: int = 64 * 1024 * 1024
    #: None: the machine runs as mvm's own user.
    run_as: RunAs | None = None
    #: The guest starts its services from nothing after this launch (a boot, or a restore
    #: from before they started), rather than running them already (a clone of a ``ready``
    #: state, a resumed VM). A backend that translates guest code (QEMU's TCG) gives such a
    #: launch a larger translation cache: service start-ups fill it.
    starts_services: bool = True


@dataclass(frozen=True)
class ProbeKernel:
    """A built kernel a backend may boot to find out whether an accelerator works here."""

    vmlinux: Path
    initrd: Path | None
    arch: Arch


@dataclass(frozen=True)
class Diagnosis:
    """One way a backend runs machines (QEMU: under TCG, under KVM), as it fares on this
    host: ``usable`` None when it cannot tell yet; ``fix`` what to do about it."""

    name: str
    usable: bool | None
    reason: str
    fix: str | None = None


class Backend(Protocol):
    name: str

    def diagnose(self, kernel: ProbeKernel | None, probes: Path) -> list[Diagnosis]:
        """For ``doctor``: each way this backend runs machines, whether it works here and
        why not. ``kernel``: a built one to probe with (None: none built yet); ``probes``:
        where verdicts are cached."""
        ...

    def capabilities(self) -> frozenset[str]:
        """What this backend can do beyond start and stop (the constants above)."""
        ...

    def machine_version(self, arch: Arch) -> str:
        """What a saved machine depends on besides the guest: the hypervisor binary. A saved
        machine restores only where this is the same."""
        ...

    def check_ports(self, ports: Sequence[PortForward]) -> None:
        """Raise :class:`~mvm.errors.PortInUse` for a host port that cannot be bound.

        Called by ``up`` *before* the build, so a taken port fails in a second, not after
        minutes of building, and creates nothing."""
        ...

    def preflight(self, request: MachineRequest) -> Preflight:
        """Decide the accelerator and refuse what this backend cannot run.

        Called by ``up`` *after* the build: the KVM probe boots the built kernel."""
        ...

    def start(self, spec: LaunchSpec, on_started: Callable[[MachineRef], None] | None = None) -> MachineRef:
        """Start the machine in the background and return once it runs. Cleans up after
        itself on failure (nothing of the attempt is left running). ``on_started`` is called
        with the machine before the start lets go of it, with SIGINT and SIGTERM held: the
        caller arms its own undo there, so no interrupt falls between the two."""
        ...

    def alive(self, machine: MachineRef) -> bool:
        """Whether the machine still runs."""
        ...

    def stop(self, files: VMFiles, machine: MachineRef, timeout: float) -> str:
        """Stop a machine whose guest did not power it off: soft first (the hypervisor's
        own quit), then hard. Returns how (``gone``, ``quit``, ``terminated``, ``killed``);
        raises :class:`~mvm.errors.StopFailed` if the machine still runs afterwards."""
        ...

    def save(self, files: VMFiles, machine: MachineRef, state: Path) -> Saved:
        """Pause the machine and write it to ``state`` (needs :data:`SAVE_RESTORE`). The RAM
        is left out when it lives in a shared :class:`MemoryFile`. The machine stays paused."""
        ...

    def resume(self, files: VMFiles, machine: MachineRef) -> None:
        """Run a paused machine again."""
        ...

    def run_state(self, files: VMFiles, machine: MachineRef) -> str:
        """``running`` while the machine's CPUs run, else why not, in QEMU's words
        (``io-error``: a disk write failed and the machine was paused, ``postmigrate``: a save
        ended without a stop, ``paused`` ...)."""
        ...

    def attach_disk(self, files: VMFiles, machine: MachineRef, disk: Disk, slot: int) -> None:
        """Attach ``disk`` to a running machine in hot-plug slot ``slot`` (needs :data:`HOTPLUG_DISK`)."""
        ...

    def forward(self, files: VMFiles, machine: MachineRef, forward: PortForward) -> PortForward:
        """Add a host→guest forward to a running machine (needs :data:`HOTPLUG_FORWARD`);
        return it with the host port in effect (picked if it was 0)."""
        ...

    def unforward(self, files: VMFiles, machine: MachineRef, forward: PortForward) -> None:
        """Remove a forward from a running machine (needs :data:`HOTPLUG_FORWARD`)."""
        ...

    def forwards(self, files: VMFiles, machine: MachineRef) -> list[PortForward]:
        """The forwards in effect now, with the host ports the backend picked."""
        ...

    def usage(self, machine: MachineRef) -> MachineUsage:
        """CPU seconds and resident memory of the machine's host process(es)."""
        ...

    def strays(self, files: VMFiles) -> list[MachineRef]:
        """Machines running in this VM dir whatever the record says (found even when
        ``vm.json`` is unreadable, or when ``up`` died before recording the machine)."""
        ...


#: The format of :func:`spec_to_json` (the VM dir's ``launch.json``). 2: the root disk's
#: backing chain is explicit.
LAUNCH_SCHEMA = 2


#: What a start takes anew each time, so launch.json leaves it out: the VM dir, the held
#: descriptors, the saved state to restore, the user.
_NOT_RECORDED = {"files", "hold_fds", "incoming", "run_as"}


@functools.cache
def _launch_adapter() -> TypeAdapter[LaunchSpec]:
    return TypeAdapter(LaunchSpec)


def spec_to_json(spec: LaunchSpec) -> dict[str, Any]:
    """What is needed to start the same machine again (``resume``), as JSON: every field of
    :class:`LaunchSpec` but those in ``_NOT_RECORDED``."""
    doc: dict[str, Any] = _launch_adapter().dump_python(spec, mode="json", exclude=_NOT_RECORDED)
    return doc


def spec_from_json(doc: dict[str, Any], files: VMFiles) -> LaunchSpec:
    """The :class:`LaunchSpec` ``doc`` records, in ``files``' VM dir. ValueError (pydantic's
    ValidationError) if it is not one."""
    return _launch_adapter().validate_python({**{k: v for k, v in doc.items() if k not in _NOT_RECORDED},
                                              "files": files})
