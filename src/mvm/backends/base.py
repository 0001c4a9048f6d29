"""What a hypervisor backend must do, and the plain data it is given.

The seam is small on purpose (start, stop, add a forward, capabilities), so QEMU and a
future Firecracker backend are interchangeable and ``up`` can be handed a fake in tests.
Backends are stateless objects: everything they need to manage a running VM later (from a
different ``mvmctl`` process) is in :class:`LaunchSpec`'s file layout and the recorded pid.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol

from ..paths import VMFiles

Protocol_ = Literal["tcp", "udp"]


@dataclass(frozen=True)
class PortForward:
    host_port: int
    guest_port: int
    host_ip: str = "127.0.0.1"
    proto: Protocol_ = "tcp"

    def __str__(self) -> str:
        return f"{self.host_ip}:{self.host_port}->{self.guest_port}/{self.proto}"


@dataclass(frozen=True)
class Disk:
    path: Path
    serial: str
    readonly: bool


@dataclass(frozen=True)
class Share:
    """A host directory the guest mounts live (virtiofs), read-write: ``mount -t virtiofs TAG DIR``."""

    tag: str
    path: Path


@dataclass
class LaunchSpec:
    name: str
    files: VMFiles
    kernel: Path
    initrd: Path | None
    rootfs: Path
    cpus: int
    memory: int
    accel: Literal["kvm", "tcg"]
    ports: list[PortForward] = field(default_factory=list)
    disks: list[Disk] = field(default_factory=list)
    config_disk: Path | None = None
    init: str = "/usr/lib/mvm/init"
    #: Open descriptors the hypervisor process inherits and keeps for its whole life: the
    #: volume locks (``flock``), which are thereby released exactly when the VM process ends.
    hold_fds: tuple[int, ...] = ()
    shares: list[Share] = field(default_factory=list)


class Backend(Protocol):
    name: str

    def start(self, spec: LaunchSpec) -> int:
        """Start the VM in the background; return its pid. Cleans up after itself on failure."""
        ...

    def stop(self, files: VMFiles, pid: int | None, timeout: float, started: int | None = None) -> str:
        """Stop a VM whose agent did not power it off; return how (``quit``, ``killed``...)."""
        ...

    def add_forward(self, files: VMFiles, forward: PortForward) -> None: ...

    def capabilities(self) -> set[str]: ...
