"""``get``, ``ls`` and ``logs``: VMs from the registry, with their status derived now."""

from __future__ import annotations

from collections.abc import Iterator

from .._proc import DEFAULT_RUNNER, Runner
from ..errors import MvmError, UsageError, VMNotFound
from ..paths import Layout, VMFiles
from ..runtime import agent
from ..runtime import logs as logs_mod
from ..runtime.logs import LogLine as LogLine  # public (mvm.LogLine): what logs() yields
from ..runtime.registry import Registry
from ..runtime.states import VMStatus
from .machines import backend_for, broken_info, status_of, vm_info
from .models import GuestStatus, VMInfo
from .vm import VM


def vm_names(*, layout: Layout | None = None) -> list[str]:
    """The names of this host's VMs, none of them looked at (shell completion: cheap)."""
    return Registry(layout or Layout.default()).names()


def get(name: str, *, layout: Layout | None = None, runner: Runner = DEFAULT_RUNNER) -> VM:
    """The handle on VM ``name``; raises VMNotFound (or StateError) if there is none."""
    vm = VM(name, layout or Layout.default(), runner)
    vm.record()
    return vm


def ls(*, layout: Layout | None = None, health: bool = True, runner: Runner = DEFAULT_RUNNER) -> list[VMInfo]:
    """Every VM in the registry, with its status (and, if ``health``, what its agent says:
    health and failing services)."""
    registry = Registry(layout or Layout.default())
    rows: list[VMInfo] = []
    for name in registry.names():
        files = registry.files(name)
        try:
            record = registry.load(name)
            status = status_of(record, files, backend_for(record, runner))
        except MvmError as exc:
            rows.append(broken_info(name, files, exc.message))
            continue
        guest = None
        if health and status is VMStatus.RUNNING and (record.checks or record.services):
            try:
                guest = GuestStatus.from_agent(agent.request(files, name, "status", timeout=2.0), name)
            except MvmError:
                pass
        rows.append(vm_info(record, files, status, guest))
    return rows


def logs(
    name: str,
    *,
    follow: bool = False,
    lines: int | None = None,
    console: bool = True,
    services: bool = True,
    service: str | None = None,
    since: float | None = None,
    layout: Layout | None = None,
) -> Iterator[LogLine]:
    """A VM's logs (see :meth:`VM.logs`); for a VM that was brought down, the logs ``down``
    kept (until ``cleanup`` or a new ``up`` of the name)."""
    layout = layout or Layout.default()
    registry = Registry(layout)
    if registry.files(name).root.is_dir():
        return VM(name, layout).logs(follow=follow, lines=lines, console=console, services=services,
                                     service=service, since=since)
    kept = VMFiles(layout.retained_logs / name)
    if not kept.root.is_dir():
        raise VMNotFound(name, f"no VM named {name!r}, and no logs of one",
                         hint="list VMs with `mvmctl ls`; `mvmctl cleanup` removes the logs of VMs that are down")
    if service is not None:  # no record any more: the services are those its logs name
        named = sorted({str(ev["svc"]) for ev in logs_mod.read_events(kept)
                        if ev.get("kind") in ("service", "log") and ev.get("svc") is not None})
        if service not in named:
            raise UsageError(f"the kept logs of {name} have no service {service!r}",
                             hint=f"its services: {', '.join(named) or 'none'}")
    return logs_mod.stream(kept, console=console, services=services, lines=lines,
                           keep=logs_mod.LogFilter(service, since))
