"""What the API returns: typed models. The CLI renders them, and ``--json`` is their dump.

The JSON keys are the field names below, documented in docs/json.md (a unit test keeps the
two in step). A key is added, never renamed or given a new meaning, without a note there.
(The output carries no ``schema_version``: most of it is a bare list, and a wrapper would
break every script for nothing a script could not see from the keys themselves.)
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, computed_field

from .._untrusted import printable
from ..errors import AgentError
from ..guest import protocol
from ..runtime.states import VMStatus as VMStatus  # public (mvm.VMStatus): what VMInfo.status holds
from ..spec import GuestSpec

#: A service restarted this often, and backing off again, is crash-looping.
CRASH_LOOP_RESTARTS = 5
#: Without health checks, a service counts as started once it has run this long (supervisord's
#: ``startsecs``): a command run through ``sh -c`` is "running" before the shell finds out that
#: its program is not there (exit 127), and `up --wait` must not call that VM up.
START_SECS = 1.0
#: One word for all of a VM's health checks: the worst state wins.
Health = Literal["healthy", "unhealthy", "starting", "none", "unknown"]


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, defer_build=True)


class PortInfo(_Model):
    host_ip: str
    host_port: int
    guest_port: int
    proto: Literal["tcp", "udp"]

    def __str__(self) -> str:
        return f"{self.host_ip}:{self.host_port}->{self.guest_port}/{self.proto}"


class MountInfo(_Model):
    """One ``-v`` of a VM."""

    host: str
    guest: str
    mode: Literal["ro", "secret", "rw"]
    size_mb: int | None = None
    volume: str | None = None  #: the persistent volume's name (writable volumes)


class VMInfo(_Model):
    """One VM, as ``ls`` and ``up --json`` show it."""

    name: str
    status: VMStatus
    health: Health = "unknown"
    backend: str | None = None
    accel: str | None = None
    arch: str | None = None  #: the guest's CPU architecture
    #: set when the guest's architecture is not the host's: how it runs, what that costs
    emulated: str | None = None
    cpus: int | None = None
    memory: int | None = None
    ports: list[PortInfo] = []
    volumes: list[MountInfo] = []
    services: list[str] = []
    checks: list[str] = []
    #: services that failed for good or crash-loop (known while the VM runs)
    failing: list[str] = []
    env_keys: list[str] = []
    image: str | None = None  #: the image key
    frontend: str | None = None
    source: str | None = None
    pid: int | None = None
    created_at: float | None = None
    started_at: float | None = None
    uptime: float | None = None
    start: Literal["cold", "restored"] | None = None  #: booted, or restored from a template
    start_reason: str | None = None  #: which template, or why it booted cold
    start_warning: bool = False  #: it booted cold although a template should have been restored
    exit_reason: str | None = None  #: why it is no longer running (exited, crashed)
    error: str | None = None  #: why its state is unreadable (broken)
    dir: str


class ServiceStatus(_Model):
    name: str
    state: str
    pid: int | None = None
    restarts: int = 0
    last_exit: int | None = None
    uptime: float | None = None
    user: str | None = None
    restart: str | None = None
    reason: str | None = None  #: why it failed

    def started(self, *, checked: bool) -> bool:
        """Running (or exited 0, as a one-shot does), as ``up --wait`` means it: where no
        health check is ``checked``, running for :data:`START_SECS` at least."""
        if self.state == "exited":
            return True
        return self.state == "running" and (checked or self.uptime is None or self.uptime >= START_SECS)

    def failure(self) -> str:
        """Why it fails, in words: the guest's reason, else what its restarts look like (a
        command that exits 0 under ``restart = "always"`` is a one-shot started again and again)."""
        if self.reason:
            return self.reason
        if self.last_exit == 0 and self.restart in (None, "always"):
            return (f"it exits 0 and is started again ({self.restarts} restarts): for a one-shot command "
                    'set restart = "on-failure" (or "no")')
        return f"crash-looping ({self.restarts} restarts, last exit {self.last_exit})"

    @property
    def failing(self) -> bool:
        """Failed for good, or crash-looping: restarted again and again, or backing off from a
        program the shell could not find or run."""
        return self.state == "failed" or (self.state == "backoff" and (
            self.restarts >= CRASH_LOOP_RESTARTS or (self.last_exit in protocol.SHELL_CANNOT_RUN
                                                     and self.reason is not None)))


class CheckStatus(_Model):
    name: str
    state: Literal["starting", "healthy", "unhealthy"]
    last_exit: int | None = None
    last_output: str | None = None
    checked_at: float | None = None
    failures: int = 0
    interval: float | None = None


class GuestStatus(_Model):
    """What the guest agent reports: its services and health checks."""

    uptime: float | None = None
    services: list[ServiceStatus] = []
    checks: list[CheckStatus] = []
    shutting_down: bool = False

    @computed_field  # type: ignore[prop-decorator]
    @property
    def health(self) -> Health:
        if not self.checks:
            return "none"
        states = {c.state for c in self.checks}
        for state in ("unhealthy", "starting"):
            if state in states:
                return state
        return "healthy"

    def healthy_with(self, services: Iterable[str], checks: Iterable[str]) -> bool:
        """Every one of these services has started (:meth:`ServiceStatus.started`) and every
        one of these checks is reported healthy, as ``up --wait`` means it. (A clone
        restored from an ``agent`` template reports none until its services start: an empty
        report is not "healthy".)"""
        started = {s.name for s in self.services if s.started(checked=bool(checks))}
        return (set(services) <= started and set(checks) <= {c.name for c in self.checks}
                and all(c.state == "healthy" for c in self.checks))

    def failing(self) -> ServiceStatus | None:
        """The first service that failed for good or is crash-looping: no health will come."""
        return next((svc for svc in self.services if svc.failing), None)

    @classmethod
    def from_agent(cls, reply: dict[str, Any], vm: str) -> GuestStatus:
        """The agent's ``status`` reply, checked: a reply of the wrong shape or types is an
        :class:`~mvm.errors.AgentError`, never a crash (the guest is not trusted)."""
        services = reply.get("services") or {}
        checks = reply.get("health") or {}
        try:
            if not isinstance(services, dict) or not isinstance(checks, dict):
                raise ValueError("services and health must be objects")
            return cls(
                uptime=reply.get("uptime"),
                services=[ServiceStatus(name=printable(n, 200), **_known(ServiceStatus, s))
                          for n, s in services.items()],
                checks=[CheckStatus(name=printable(n, 200), **_known(CheckStatus, c)) for n, c in checks.items()],
                shutting_down=bool(reply.get("shutting_down")),
            )
        except (ValueError, TypeError) as exc:  # pydantic's ValidationError is a ValueError
            raise AgentError(vm, "the guest agent sent a malformed status",
                             output=printable(str(exc), 2000, newlines=True)) from None


def _known(model: type[BaseModel], data: Any) -> dict[str, Any]:
    """The fields of ``data`` that ``model`` knows (an older or newer guest may send more),
    with text made printable (it is the guest's)."""
    if not isinstance(data, dict):
        return {}
    return {k: printable(v, newlines=True) if isinstance(v, str) else v
            for k, v in data.items() if k in model.model_fields and k != "name"}


class VMDetails(VMInfo):
    """``status``: the VM, and (while it runs) what its guest agent reports."""

    guest: GuestStatus | None = None


class ImageInfo(_Model):
    key: str
    name: str
    path: str
    frontend: str
    source: dict[str, Any]
    arch: str
    kernel: str  #: file names in ``path``
    initrd: str | None
    rootfs: str
    kernel_version: str
    sizes: dict[str, int]
    created_at: float
    build_secs: float  #: assembling the image (not the package layer or kernel it reused)
    guest: GuestSpec
    vms: list[str] = []  #: VMs (any status) whose record points at this image (``images`` only)


class BuildResult(ImageInfo):
    """The image, and how it was obtained."""

    built: bool  #: False: found in the cache
    seconds: float


@dataclass(frozen=True)
class ExecResult:
    """A finished guest command (the names docker-py and testcontainers use)."""

    exit_code: int
    stdout: bytes = b""
    stderr: bytes = b""


class DownResult(_Model):
    name: str
    how: str  #: gone, shut down cleanly (the guest, on request), quit, terminated, killed, not running


class ServiceUsage(_Model):
    name: str
    pid: int | None = None
    cpu_percent: float  #: of one host core, over the sampling interval
    memory_bytes: int  #: resident, the service and every process it started


class VMUsage(_Model):
    """``stats``: what one running VM costs the host, and what its services use inside it."""

    name: str
    cpu_percent: float  #: of one host core: the whole machine (vCPUs, devices, emulation)
    memory_bytes: int  #: resident on the host
    guest_memory_total: int | None = None  #: bytes, as the guest sees them (MemTotal)
    guest_memory_used: int | None = None  #: bytes (MemTotal - MemAvailable)
    services: list[ServiceUsage] = []


class TemplateInfo(_Model):
    """A saved machine ``up`` restores (fast start)."""

    key: str
    path: str
    image: str | None = None  #: the image key
    name: str | None = None  #: the image's guest name (None: the image is gone)
    kinds: list[str] = []  #: ``agent`` (waits for its config) and/or ``ready`` (services running)
    env_states: int = 0  #: ``ready`` states kept for other ``-e`` values
    cpus: int | None = None
    memory: int | None = None
    arch: str | None = None
    created_at: float | None = None
    create_secs: float | None = None
    bytes_on_disk: int
    #: of ``bytes_on_disk``, what VMs restored from it hold too (hard links): removing the
    #: template frees it only once they are down
    bytes_shared: int = 0
    damaged: str | None = None  #: why it cannot be used


class ExportInfo(_Model):
    """``export --kubevirt``: what was written, and what to run next."""

    out_dir: str
    vm_yaml: str
    layout: str | None = None  #: the OCI image layout dir
    archive: str | None = None  #: the oci-archive tar (``--archive``)
    image: str  #: the image reference vm.yaml points at
    image_key: str = ""  #: the mvm image exported (a guest name picks its newest)
    manifest_digest: str
    ports: list[int] = []
    probe_from: str | None = None  #: the health check the readiness probe comes from
    notes: list[str] = []
    dropped: list[str] = []  #: health checks KubeVirt cannot run, with why
    commands: list[str] = []  #: `skopeo copy ...` and `kubectl apply ...`


class VolumeInfo(_Model):
    name: str
    kind: Literal["managed", "image"] | None = None
    host: str
    image: str
    exists: bool
    size_mb: int | None = None
    used_mb: float | None = None
    allocated_mb: float | None = None
    vm: str | None = None  #: the VM that holds it now
    held_by: str | None = None  #: what holds it now (a VM, an `up` in progress, an export)
    needs_recovery: bool = False
    fs_uuid: str | None = None
    last_guest: str | None = None
    last_vm: str | None = None
    created_at: float | None = None
    seeded_from: str | None = None
    error: str | None = None  #: why its record is unreadable


class VolumeExport(_Model):
    volume: str
    dest: str
    new: list[str] = []
    updated: list[str] = []
    unchanged: list[str] = []
    overwritten: list[str] = []
    kept: list[str] = []
    conflicts: list[str] = []
    host_only: list[str] = []
    skipped: list[str] = []  #: "path: reason": what the volume holds that is not exported


class CleanupItem(_Model):
    kind: Literal["vm", "logs", "build", "lock", "image", "layer", "template"]
    path: str
    bytes: int
    reason: str


class CleanupReport(_Model):
    dry_run: bool
    items: list[CleanupItem] = []
    notes: list[str] = []

    @computed_field  # type: ignore[prop-decorator]
    @property
    def freed_bytes(self) -> int:
        return sum(i.bytes for i in self.items)


class ToolCheck(_Model):
    tool: str
    purpose: str
    found: bool
    path: str | None = None
    version: str | None = None
    fix: str | None = None


class BackendCheck(_Model):
    backend: str
    usable: bool | None  #: None: not known yet (not probed)
    reason: str
    fix: str | None = None


class ArchCheck(_Model):
    """Guests of one architecture on this host: can they boot, and can mvm.toml images of them be built."""

    arch: str
    native: bool  #: the host's own architecture (KVM possible) or emulated (TCG)
    boots: bool
    builds: bool
    reason: str
    fix: str | None = None


class DiskCheck(_Model):
    state_dir: str
    cache_dir: str
    free_bytes: int
    ok: bool
    fix: str | None = None


class IsolationCheck(_Model):
    """Who QEMU runs as: a user of its own per VM (mvm runs as root), or mvm's user."""

    qemu_user: Literal["per-vm", "invoking-user"]
    uid_range: list[int] | None = None  #: first and last uid of the VMs' users (per-vm)
    kvm_group: int | None = None  #: the group through which those users may use /dev/kvm
    reason: str
    fix: str | None = None


class DoctorReport(_Model):
    ok: bool
    backends: list[BackendCheck]
    arches: list[ArchCheck]
    tools: list[ToolCheck]
    disk: DiskCheck
    isolation: IsolationCheck
