"""Every error mvm raises on purpose.

A leaf module: it imports nothing from mvm, so any layer can raise these without cycles.
Each error carries a one-line ``message``, an optional ``hint`` (what to do next) and an
optional ``output`` (the tail of a child process or console that explains the failure).
The CLI renders them and maps them to exit codes in exactly one place (``mvm.cli.app``).

    MvmError
    ├── SpecError            mvm.toml / flake attributes are invalid
    ├── UsageError           a command-line value is malformed (-p, -e, -v, names)
    ├── ToolMissing          qemu, mmdebstrap, nix, ... is not installed
    ├── CommandFailed        a child process (mmdebstrap, mkfs, nix) exited non-zero
    │   └── BuildError       ... while building an image
    ├── StateError           vm.json / manifest.json is unreadable
    ├── DiskFull             the host's disk has no room for what a command must write
    ├── PortInUse            a host port cannot be bound
    ├── VolumeError          a -v volume is unusable or would lose data
    │   └── ExportConflicts  `volume export` would overwrite what is in its destination
    └── VMError              something about one named VM
        ├── VMNotFound
        ├── VMExists
        ├── VMNotRunning
        ├── BootError        the guest never answered (console tail attached)
        │   └── RestoreFailed    a saved machine could not be restored (up then boots cold)
        ├── AgentError       the control channel failed or the guest refused a request
        │   └── AgentTimeout
        ├── HealthTimeout    `up --wait` gave up (check output attached)
        ├── ServiceFailed    a service failed for good while `up --wait` waited (its log attached)
        ├── ExecTimeout      `exec --timeout` expired and the guest process was killed
        └── StopFailed       the VM's process survived every way of stopping it
"""

from __future__ import annotations

import os


class MvmError(Exception):
    """Base of every deliberate mvm failure."""

    reference = "mvm-error"

    def __init__(self, message: str, *, hint: str | None = None, output: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.output = output

    def __str__(self) -> str:
        return self.message

    @property
    def hint(self) -> str | None:
        """What to do next: the CLI prints it under the message. It is also the error's one
        note (PEP 678), so a traceback, and pytest's report of a test that raised it, shows it
        too, where ``str(exc)`` stays the message alone."""
        return self._hint

    @hint.setter
    def hint(self, hint: str | None) -> None:
        self._hint = hint
        self.__notes__ = [f"hint: {hint}"] if hint else []


class SpecError(MvmError):
    reference = "invalid-spec"


class UsageError(MvmError):
    reference = "invalid-argument"


class ToolMissing(MvmError):
    reference = "tool-missing"


class CommandFailed(MvmError):
    reference = "command-failed"

    def __init__(
        self,
        message: str,
        *,
        argv: list[str] | None = None,
        returncode: int | None = None,
        hint: str | None = None,
        output: str | None = None,
    ) -> None:
        super().__init__(message, hint=hint, output=output)
        self.argv = argv or []
        self.returncode = returncode


class BuildError(CommandFailed):
    reference = "build-failed"


class StateError(MvmError):
    reference = "corrupt-state"


class DiskFull(MvmError):
    reference = "disk-full"

    #: What to do about it, for every place that finds a full disk.
    HINT = ("free some space where mvm writes ($MVM_CACHE for builds, $MVM_HOME for VMs and volumes; "
            "`mvmctl doctor` shows both, `mvmctl cleanup` frees old state), then retry")

    def __init__(self, message: str, *, hint: str | None = None, output: str | None = None) -> None:
        super().__init__(message, hint=hint or self.HINT, output=output)


def check_free(path: str | os.PathLike[str], needed: int, what: str) -> None:
    """Raise :class:`DiskFull` unless the file system holding ``path`` has ``needed`` bytes
    free for ``what`` (a phrase: "a VM's logs and root disk")."""
    st = os.statvfs(path)
    free = st.f_bavail * st.f_frsize
    if free < needed:
        raise DiskFull(f"the disk holding {path} has {free / 2**20:.0f} MiB free; {what} needs "
                       f"{needed / 2**20:.0f} MiB; nothing was written")


class PortInUse(MvmError):
    reference = "port-in-use"


class VolumeError(MvmError):
    reference = "volume-error"


class ExportConflicts(VolumeError):
    """``volume export`` stopped before writing anything: these host paths (relative to
    ``dest``) were changed both on the host and in the volume ``volume``, or are in the way."""

    def __init__(self, message: str, *, volume: str, dest: str, conflicts: list[str], hint: str | None = None,
                 output: str | None = None) -> None:
        super().__init__(message, hint=hint, output=output)
        self.volume, self.dest, self.conflicts = volume, dest, conflicts


class VMError(MvmError):
    reference = "vm-error"

    def __init__(
        self, vm: str, message: str, *, hint: str | None = None, output: str | None = None
    ) -> None:
        super().__init__(message, hint=hint, output=output)
        self.vm = vm


class VMNotFound(VMError):
    reference = "vm-not-found"


class VMExists(VMError):
    reference = "vm-exists"


class VMNotRunning(VMError):
    reference = "vm-not-running"


class BootError(VMError):
    reference = "boot-failed"


class RestoreFailed(BootError):
    reference = "restore-failed"


class AgentError(VMError):
    """The guest agent failed or refused a request. Without a hint of its own, it points at
    what says why: the VM's state and its logs (a stopping VM, a crashed guest)."""

    reference = "agent-error"

    def __init__(
        self, vm: str, message: str, *, hint: str | None = None, output: str | None = None
    ) -> None:
        super().__init__(vm, message, output=output,
                         hint=hint or f"`mvmctl status {vm}` and `mvmctl logs {vm}` show what the VM is doing")


class AgentTimeout(AgentError):
    reference = "agent-timeout"


class HealthTimeout(VMError):
    reference = "health-timeout"


class ServiceFailed(VMError):
    reference = "service-failed"


class ExecTimeout(VMError):
    reference = "exec-timeout"


class StopFailed(VMError):
    reference = "stop-failed"


__all__ = [
    "AgentError",
    "AgentTimeout",
    "BootError",
    "BuildError",
    "CommandFailed",
    "DiskFull",
    "ExecTimeout",
    "ExportConflicts",
    "HealthTimeout",
    "MvmError",
    "PortInUse",
    "RestoreFailed",
    "ServiceFailed",
    "SpecError",
    "StateError",
    "StopFailed",
    "ToolMissing",
    "UsageError",
    "VMError",
    "VMExists",
    "VMNotFound",
    "VMNotRunning",
    "VolumeError",
]
