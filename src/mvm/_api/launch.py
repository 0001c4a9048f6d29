"""Executing an ``up``'s plan as one transaction (:class:`Launch`): each step registers its
undo on one ``ExitStack``, disarmed only once the guest answers and the VM is recorded as
running."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import time
from contextlib import ExitStack
from pathlib import Path

from .._atomic import write_json_atomic
from .._proc import Runner, tail_file
from ..backends.base import (
    LAUNCH_SCHEMA,
    Incoming,
    LaunchSpec,
    MachineRef,
    MemoryFile,
    spec_to_json,
)
from ..builders.store import ImageStore
from ..errors import AgentError, BootError, MvmError, StateError, VMExists
from ..paths import Layout, VMFiles
from ..runtime import agent, logs
from ..runtime.bootconfig import BootConfig, write_config_disk
from ..runtime.registry import PortRecord, ProcessRecord, Registry, VMRecord
from ..runtime.templates import CONFIGURE_TIMEOUT, TEMPLATE_KERNEL_ARGS, identity
from . import volume_attach
from .machines import backend_for, create_overlay, start_undoable, status_of
from .progress import Progress
from .up_plan import UpPlan


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
        """Claim the name, under the image's lock: from then on the record names the image,
        and ``rmi`` or ``cleanup`` would not remove it (they look under that lock)."""
        image = self.plan.image
        store = ImageStore(image.path.parent)
        with store.locked(image.key):
            if not image.path.is_dir():
                raise StateError(f"image {image.key[:12]} of {image.name} was removed (`mvmctl rmi` or "
                                 "`cleanup`) before this VM could use it", hint="run the same `mvmctl up` again: "
                                 "it builds the image anew")
            try:
                files = self.registry.reserve(self.plan.record)
            except VMExists:
                raise exists_error(self.plan.name, self.registry, self.runner) from None
            undo.callback(self._forget, files)
            store.add_user(image.key, files.root)  # seen by rmi and cleanup of other state dirs too
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
            r.started_at, r.ran_for = time.time(), 0.0

        self.registry.update(plan.name, started)
        return machine

    def wait_for_agent(self, files: VMFiles, machine: MachineRef) -> None:
        self.progress.stage("waiting for the guest agent")
        backend = self.plan.backend
        try:
            agent.wait_ready(files, self.plan.name, self.plan.boot_timeout, lambda: backend.alive(machine))
        except AgentError as exc:
            raise BootError(self.plan.name, f"the VM did not come up: {exc.message}",
                            hint=f"its console shows how far it got (the end of it here; `mvmctl logs "
                            f"{self.plan.name}` shows all of it)",
                            output=tail_file(files.console_log, 25)) from exc

    def personalize(self, files: VMFiles, machine: MachineRef, attached: volume_attach.Attached) -> None:
        """A clone becomes its own machine: fresh RNG, machine-id and hostname (and, from an
        ``agent`` template, its volumes and its config, after which its services start)."""
        restore = self.plan.restore
        if restore is None:
            return
        guest = self.plan.image.manifest.guest
        who = identity(self.plan.name, guest.hostname or self.plan.name)
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
        write_json_atomic(files.launch, {"schema_version": LAUNCH_SCHEMA, "spec": spec_to_json(self.spec)})

    def mark_running(self) -> None:
        self.registry.update(self.plan.name, lambda r: setattr(r, "phase", "running"))

    # -- undo --------------------------------------------------------------------------------

    def _forget(self, files: VMFiles) -> None:
        """Remove the VM dir, unless a machine still runs in it (then `down` must see it). The
        logs of a machine that started are kept, as `down` keeps them: `mvmctl logs NAME` showed
        an older VM's of that name, and the failed boot's were gone."""
        if not self.plan.backend.strays(files):
            if files.console_log.exists():
                with contextlib.suppress(OSError):  # a full disk: the error says why it failed anyway
                    logs.retain(files, self.layout.retained_logs / self.plan.name)
            self.registry.remove(self.plan.name)
            ImageStore(self.plan.image.path.parent).remove_user(self.plan.image.key, files.root)



def exists_error(name: str, registry: Registry, runner: Runner) -> VMExists:
    """The VM named ``name`` is there already: what it is doing, and what to do about it."""
    try:
        record = registry.load(name)
        status = str(status_of(record, registry.files(name), backend_for(record, runner)))
    except MvmError:
        status = "broken"
    if status in ("running", "starting", "stopping"):
        hint = f"stop it first (`mvmctl down {name}`) or pick another --name"
    elif status == "suspended":
        hint = f"resume it (`mvmctl resume {name}`), remove it (`mvmctl down {name}`) or pick another --name"
    else:
        hint = f"it is {status}: inspect it with `mvmctl logs {name}`, then remove it with `mvmctl down {name}`"
    return VMExists(name, f"a VM named {name!r} already exists ({status})", hint=hint)
