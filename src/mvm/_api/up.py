"""``up``: validate, build, plan once, then execute the plan as a transaction.

Order, and why:
1. :class:`UpRequest` checks every value the caller typed (ports, env, names, sizes); the
   backend's ``check_ports`` and the volume plan check the host side. Nothing is created,
   nothing is built: a typo fails in a second.
2. The image is built (or found in the cache).
3. :func:`plan_up` asks the backend's ``preflight`` for the accelerator (the KVM probe
   boots the *built* kernel, so it comes after the build) and fixes the VM record.
4. :class:`Launch` runs the plan's steps under one ``ExitStack``. Every step registers its
   undo; the stack is disarmed only once the guest agent answers, so a failure or Ctrl-C
   anywhere leaves no VM dir, no machine, no lock and no registry entry behind.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import time
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

from .. import backends
from .._atomic import write_json_atomic
from .._proc import DEFAULT_RUNNER, Runner, tail_file
from ..backends.base import (
    LAUNCH_SCHEMA,
    AccelPreference,
    Backend,
    Incoming,
    LaunchSpec,
    MachineRef,
    MachineRequest,
    MemoryFile,
    PortForward,
    Share,
    spec_to_json,
)
from ..errors import AgentError, AgentTimeout, BootError, MvmError, UsageError, VMError, VMExists
from ..images.store import Image
from ..names import MIN_MEMORY_MIB, check_vm_name
from ..paths import Layout, VMFiles
from ..runtime import agent, logs
from ..runtime.bootconfig import BootConfig, write_config_disk
from ..runtime.registry import PortRecord, ProcessRecord, Registry, VMRecord
from ..runtime.templates import CONFIGURE_TIMEOUT, TEMPLATE_KERNEL_ARGS, TemplateStore
from ..spec import spec_file
from ..volumes import attach as volume_attach
from . import templates
from .build import build_image
from .machines import backend_for, create_overlay, preflight, start_undoable, status_of
from .options import check_host_cpus, parse_env, parse_port
from .progress import Progress, Quiet
from .vm import VM

log = logging.getLogger(__name__)

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
    backend: str = "qemu"
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
        ports: Sequence[str | PortForward] = (),
        env: Mapping[str, str] | Sequence[str] | None = None,
        volumes: Sequence[str] = (),
        hypervisor: str = "auto",
        shares: Sequence[Share] = (),
        cold: bool = False,
        log_limit_mb: int | None = None,
    ) -> UpRequest:
        if cpus is not None and not 1 <= cpus <= 64:
            raise UsageError(f"--cpus {cpus}: must be between 1 and 64")
        if cpus is not None:
            check_host_cpus(cpus, f"--cpus {cpus}")
        if memory is not None and not MIN_MEMORY_MIB <= memory <= 65536:
            raise UsageError(f"--memory {memory}: must be between {MIN_MEMORY_MIB} and 65536 MiB",
                             hint=f"a guest needs at least {MIN_MEMORY_MIB} MiB to boot its kernel and agent"
                             if memory < MIN_MEMORY_MIB else "64 GiB is the most mvm gives one VM")
        if name is not None:
            try:
                check_vm_name(name)
            except ValueError as exc:
                raise UsageError(f"--name: {exc}") from None
        if log_limit_mb is not None and log_limit_mb < 1:
            raise UsageError(f"--log-limit {log_limit_mb}: must be at least 1 MiB")
        if hypervisor not in HYPERVISORS:
            raise UsageError(f"unknown hypervisor {hypervisor!r}", hint=f"use one of: {', '.join(HYPERVISORS)}")
        backend, accel = HYPERVISORS[hypervisor]
        return cls(
            name=name,
            cpus=cpus,
            memory=memory,
            forwards=[parse_port(p) if isinstance(p, str) else p for p in ports],
            env=dict(env) if isinstance(env, Mapping) else parse_env(list(env or [])),
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


class Launch:
    """Executes an :class:`UpPlan`. Each step is a method, so tests can fail any one of them."""

    def __init__(self, plan: UpPlan, layout: Layout, runner: Runner, progress: Progress) -> None:
        self.plan = plan
        self.layout = layout
        self.runner = runner
        self.progress = progress
        self.registry = Registry(layout)
        self.clone: tuple[Path, Path] | None = None  # a clone's links to its template's root disk and RAM

    def run(self) -> None:
        with ExitStack() as undo:
            files = self.reserve(undo)
            attached = self.attach_volumes(files, undo)
            self.write_boot_config(files, attached)
            self.create_root(files)
            machine = self.start_machine(files, attached, undo)
            self.wait_for_agent(files, machine)
            self.personalize(files, machine, attached)
            self.open_forwards(files, machine)
            self.record_launch(files)
            self.mark_running()
            attached.booted()
            undo.pop_all()
        shutil.rmtree(self.layout.retained_logs / self.plan.name, ignore_errors=True)  # replaced by this VM's

    def reserve(self, undo: ExitStack) -> VMFiles:
        try:
            files = self.registry.reserve(self.plan.record)
        except VMExists:
            raise self._exists_error() from None
        undo.callback(self._forget, files)
        return files

    def attach_volumes(self, files: VMFiles, undo: ExitStack) -> volume_attach.Attached:
        return volume_attach.attach(self.plan.volumes, vm=self.plan.name, files=files, layout=self.layout, undo=undo,
                              runner=self.runner, stage=self.progress.stage)

    def write_boot_config(self, files: VMFiles, attached: volume_attach.Attached) -> None:
        """The config disk a cold boot reads. A restored clone gets its config through
        ``configure`` instead and is not given the disk, but it is written all the same:
        ``restart`` reads the ``-e`` values back from it."""
        write_config_disk(files.config_disk, self.boot_config(attached))

    def boot_config(self, attached: volume_attach.Attached) -> BootConfig:
        return BootConfig(vm=self.plan.name, env=dict(self.plan.request.env), volumes=attached.boot)

    def root_backing(self) -> tuple[Path, ...]:
        """What the VM's own root disk is a layer over, top down (LaunchSpec.root_backing)."""
        if self.clone is None:
            return (self.plan.image.rootfs,)
        return (self.clone[0], self.plan.image.rootfs)

    def create_root(self, files: VMFiles) -> None:
        """The VM's own copy-on-write layer over the image's root disk (or the template's);
        the cached image is never written. A clone also starts its logs with the template's."""
        restore = self.plan.restore
        if restore is not None:  # the template's root disk and RAM, as long as this VM lives
            self.clone = restore.template.link_for_clone(restore.stem, files.root)
        backing = self.root_backing()[0]
        fmt = "qcow2" if restore else "raw"
        create_overlay(self.runner, backing, fmt, files.root_disk, "the VM's root disk")
        os.chmod(files.root_disk, 0o600)  # like every file in the VM dir
        if restore is not None:
            for name in ("console.log", "events.log"):
                shutil.copyfile(restore.template.log(restore.stem, name), files.root / name)
            # `logs` would show the template's boot, hours old maybe, as this VM's: say where it ends
            logs.note(files, f"{self.plan.name} restored from template {restore.template.meta.key[:12]} "
                      f"({restore.stem} state): the lines above are the template's boot")

    def start_machine(self, files: VMFiles, attached: volume_attach.Attached, undo: ExitStack) -> MachineRef:
        plan, record, restore = self.plan, self.plan.record, self.plan.restore
        spec = LaunchSpec(
            name=plan.name, files=files, kernel=plan.image.kernel, initrd=plan.image.initrd,
            rootfs=files.root_disk, root_backing=self.root_backing(), cpus=record.cpus,
            memory=record.memory, accel=record.accel,  # type: ignore[arg-type]
            arch=plan.image.manifest.arch, ports=plan.request.forwards, hold_fds=attached.hold_fds,
            shares=plan.request.shares,
            log_limit=(plan.request.log_limit_mb or plan.image.manifest.guest.log_limit_mb) * 1024 * 1024,
        )
        if restore is None:
            spec.config_disk, spec.disks = files.config_disk, attached.disks
            self.progress.stage(f"booting ({record.accel}{', emulated ' + record.arch if record.emulated else ''})")
        else:  # the template's device set: its hot-plug slots, its RAM (copy-on-write), its state
            assert self.clone is not None  # create_root linked it
            spec.memory_file = MemoryFile(self.clone[1], shared=False)
            spec.incoming = Incoming(restore.template.state(restore.stem), ignore_shared=True)
            spec.hotplug_slots = restore.template.meta.hotplug_slots
            spec.kernel_args = TEMPLATE_KERNEL_ARGS
            spec.starts_services = restore.kind == "agent"
            self.progress.stage(f"restoring ({record.accel}, {restore.kind} template)")
        self.spec = spec
        machine = start_undoable(plan.backend, dataclasses.replace(spec, ports=[]), undo)  # see open_forwards
        attached.held_by(machine.pid, machine.start_time)

        def started(r: VMRecord) -> None:
            r.machine = ProcessRecord(pid=machine.pid, start_time=machine.start_time)
            r.started_at = time.time()

        self.registry.update(plan.name, started)
        return machine

    def wait_for_agent(self, files: VMFiles, machine: MachineRef) -> None:
        self.progress.stage("waiting for the guest agent")
        backend = self.plan.backend
        try:
            agent.wait_ready(files, self.plan.name, self.plan.boot_timeout, lambda: backend.alive(machine))
        except AgentError as exc:
            raise BootError(self.plan.name, f"the VM did not come up: {exc.message}",
                            hint="the console output below shows how far it got",
                            output=tail_file(files.console_log, 25)) from exc

    def personalize(self, files: VMFiles, machine: MachineRef, attached: volume_attach.Attached) -> None:
        """A clone becomes its own machine: fresh RNG, machine-id and hostname (and, from an
        ``agent`` template, its volumes and its config, after which its services start)."""
        restore = self.plan.restore
        if restore is None:
            return
        guest = self.plan.image.manifest.guest
        who = templates.identity(self.plan.name, guest.hostname or self.plan.name)
        if restore.kind == "ready":
            agent.request(files, self.plan.name, "refresh", timeout=10.0, **who)
            return
        for slot, disk in enumerate(attached.disks):
            self.plan.backend.attach_disk(files, machine, disk, slot)
            self.spec.disks.append(dataclasses.replace(disk, slot=slot))
        # replies once the clone's volumes are mounted and its services started
        agent.request(files, self.plan.name, "configure", timeout=CONFIGURE_TIMEOUT,
                      config=self.boot_config(attached).model_dump(mode="json"), **who)

    def open_forwards(self, files: VMFiles, machine: MachineRef) -> None:
        """The ``-p`` forwards, opened once the guest answers, never at the machine's start.

        A restored clone must not be reachable before its ``refresh``: until then its services
        would answer with the template's kernel RNG state. A booting guest has no address
        until its init configures the network (after starting the services, before the
        agent answers): a connection forwarded earlier loses its SYN and waits for slirp to
        resend it, ~0.9 s after the service was ready (measured on both architectures).
        A client that connects before this is refused at once and can retry.
        """
        if not self.plan.request.forwards:
            return
        opened = [self.plan.backend.forward(files, machine, fwd) for fwd in self.plan.request.forwards]
        self.spec.ports = opened  # `resume` opens the same host ports
        self.registry.update(self.plan.name, lambda r: setattr(r, "ports", [PortRecord.of(f) for f in opened]))

    def record_launch(self, files: VMFiles) -> None:
        """How the machine runs now, so ``resume`` can start it the same way."""
        write_json_atomic(files.launch, {"schema_version": LAUNCH_SCHEMA, "spec": spec_to_json(self.spec)}, mode=0o600)

    def mark_running(self) -> None:
        self.registry.update(self.plan.name, lambda r: setattr(r, "phase", "running"))

    # -- undo --------------------------------------------------------------------------------

    def _forget(self, files: VMFiles) -> None:
        """Remove the VM dir, unless a machine still runs in it (then `down` must see it)."""
        if not self.plan.backend.strays(files):
            self.registry.remove(self.plan.name)

    def _exists_error(self) -> VMExists:
        name = self.plan.name
        try:
            record = self.registry.load(name)
            status = str(status_of(record, self.registry.files(name), backend_for(record, self.runner)))
        except MvmError:
            status = "broken"
        if status in ("running", "starting", "stopping"):
            hint = f"stop it first (`mvmctl down {name}`) or pick another --name"
        elif status == "suspended":
            hint = f"resume it (`mvmctl resume {name}`), remove it (`mvmctl down {name}`) or pick another --name"
        else:
            hint = f"it is {status}: inspect it with `mvmctl logs {name}`, then remove it with `mvmctl down {name}`"
        return VMExists(name, f"a VM named {name!r} already exists ({status})", hint=hint)


def up(
    path: str | os.PathLike[str] = ".",
    *,
    flake: str | None = None,
    nix_args: Sequence[str] = (),
    name: str | None = None,
    cpus: int | None = None,
    memory: int | None = None,
    ports: Sequence[str | PortForward] = (),
    env: Mapping[str, str] | Sequence[str] | None = None,
    volumes: Sequence[str] = (),
    hypervisor: str = "auto",
    wait: bool = False,
    wait_timeout: float = 120.0,
    boot_timeout: float = BOOT_TIMEOUT,
    layout: Layout | None = None,
    backend: Backend | None = None,
    runner: Runner = DEFAULT_RUNNER,
    progress: Progress | None = None,
    image: Image | None = None,
    shares: Sequence[Share] = (),
    cold: bool = False,
    log_limit_mb: int | None = None,
    arch: str | None = None,
) -> VM:
    """Build if needed, boot, and return once the guest agent answers (or is healthy).
    ``volumes`` are ``-v`` values (see :mod:`mvm.volumes.attach`); they are all checked
    before anything is built or created. ``image`` boots an already-built image instead;
    ``shares`` are host directories the guest can mount live (``mvmctl dev`` shares the
    project directory this way). ``backend`` replaces the one ``hypervisor`` names. ``arch``
    builds for that architecture instead of the spec's (a foreign one is emulated)."""
    layout = layout or Layout.default()
    prog = progress or Quiet()
    request = UpRequest.parse(name=name, cpus=cpus, memory=memory, ports=ports, env=env, volumes=volumes,
                              hypervisor=hypervisor, shares=shares, cold=cold, log_limit_mb=log_limit_mb)
    backend = backend or backends.get(request.backend, runner)
    backend.check_ports(request.forwards)  # before the build: a taken port fails fast
    planned = volume_attach.plan(request.volumes, layout)
    if image is None:
        image, _ = build_image(path, flake=flake, nix_args=nix_args, arch=arch, layout=layout, runner=runner,
                               progress=prog)
        request = dataclasses.replace(request, source=flake or str(spec_file(Path(path)).resolve()))
    prog.stage("choosing accelerator")
    plan = plan_up(request, image, backend, planned, layout, boot_timeout)  # after the build: the KVM probe
    try:
        Launch(plan, layout, runner, prog).run()
    except VMError as exc:  # the restore, or the clone's set-up (a volume's hot-plug, an agent that went quiet)
        guest_said_no = isinstance(exc, AgentError) and not isinstance(exc, AgentTimeout)  # would say it cold too
        if plan.restore is None or guest_said_no or Registry(layout).files(plan.name).root.exists():
            raise  # not a restore, the name is taken, or the undo kept the attempt: a cold boot would hide why
        # Nothing of the attempt is left (its undo ran): say why, forget the template, boot.
        reason = f"restoring failed ({exc.message}); booted cold"
        prog.stage(reason)
        log.warning("%s: %s", plan.name, reason)
        TemplateStore(layout).remove(plan.restore.template.meta.key)
        record = plan.record.model_copy(update={"start": "cold", "start_reason": reason, "start_warning": True})
        plan = dataclasses.replace(plan, restore=None, boot_timeout=boot_timeout, record=record)
        Launch(plan, layout, runner, prog).run()
    try:  # the VM runs: a template that cannot be made now must not fail its `up`
        started = templates.make_behind(image, cpus=plan.record.cpus, memory=plan.record.memory,
                                        restore=plan.restore, env=request.env, volumes=bool(plan.volumes),
                                        forced_cold=request.cold or bool(request.shares), backend=backend,
                                        layout=layout, runner=runner)
    except (MvmError, OSError) as exc:
        started = f"no template made for the next `up`: {getattr(exc, 'message', exc)}"
        log.warning("%s: %s", plan.name, started)
    if started:
        prog.note(started)
    vm = VM(plan.name, layout, runner)
    if wait and plan.record.checks:
        prog.stage("waiting for health checks")
        try:
            vm.wait_healthy(wait_timeout)  # a timeout keeps the VM for inspection (the error says so)
        except KeyboardInterrupt:
            vm.down()  # Ctrl-C aborts the whole `up`
            raise
    return vm

