"""``up``: validate, build, plan once, then execute the plan as a transaction.

Order, and why:
1. :class:`~mvm._api.up_plan.UpRequest` checks every value the caller typed (ports, env,
   names, sizes); the backend's ``check_ports`` and the volume plan check the host side.
   Nothing is created, nothing is built: a typo fails in a second.
2. The image is built (or found in the cache).
3. :func:`~mvm._api.up_plan.plan_up` asks the backend's ``preflight`` for the accelerator
   (the KVM probe boots the *built* kernel, so it comes after the build) and fixes the VM
   record.
4. :class:`~mvm._api.launch.Launch` runs the plan's steps under one ``ExitStack``. Every
   step registers its undo; the stack is disarmed only once the guest agent answers, so a
   failure or Ctrl-C anywhere leaves no VM dir, no machine, no lock and no registry entry
   behind. Its first step claims the name under the image's lock, so that ``rmi`` and
   ``cleanup`` cannot remove the image under it.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from .. import backends
from .._proc import DEFAULT_RUNNER, Runner
from ..backends.accel import refuse_kvm
from ..backends.base import (
    Backend,
    PortForward,
    Share,
)
from ..builders.store import Image
from ..errors import AgentError, AgentTimeout, MvmError, PortInUse, VMError
from ..names import HEALTH_TIMEOUT, host_arch
from ..paths import Layout
from ..runtime.registry import Registry
from ..runtime.templates import TemplateStore
from ..spec import GuestSpec, load_toml, spec_file
from . import templates, volume_attach
from .build import build_image, check_arch_option
from .launch import Launch, exists_error
from .machines import name_the_vm_holding
from .progress import Progress, Quiet
from .up_plan import BOOT_TIMEOUT, UpRequest, plan_up
from .vm import VM

log = logging.getLogger(__name__)


def up(
    path: str | os.PathLike[str] = ".",
    *,
    flake: str | None = None,
    nix_args: Sequence[str] = (),
    name: str | None = None,
    cpus: int | None = None,
    memory: int | None = None,
    ports: Sequence[str | int | PortForward] = (),
    env: Mapping[str, str] | Sequence[str] | None = None,
    volumes: Sequence[str] = (),
    hypervisor: str = "auto",
    wait: bool = False,
    wait_timeout: float = HEALTH_TIMEOUT,
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
    ``ports`` are ``-p`` values (an int is a guest port, given a free host port), ``env`` a
    mapping or ``KEY=VALUE`` strings, ``volumes`` ``-v`` values (see
    :mod:`mvm._api.volume_attach`); they are all checked
    before anything is built or created. ``image`` boots an already-built image instead;
    ``shares`` are host directories the guest can mount live (``mvmctl dev`` shares the
    project directory this way). ``backend`` replaces the one ``hypervisor`` names. ``arch``
    builds for that architecture instead of the spec's (a foreign one is emulated)."""
    layout = layout or Layout.default()
    prog = progress or Quiet()
    request = UpRequest.parse(name=name, cpus=cpus, memory=memory, ports=ports, env=env, volumes=volumes,
                              hypervisor=hypervisor, shares=shares, cold=cold, log_limit_mb=log_limit_mb)
    backend = backend or backends.get(request.backend, runner)
    registry = Registry(layout)
    if request.name is not None and registry.files(request.name).root.exists():
        raise exists_error(request.name, registry, runner)  # said first: its ports are taken by it, too
    try:
        backend.check_ports(request.forwards)  # before the build: a taken port fails fast
    except PortInUse:
        spec = _spec(path) if request.name is None and image is None and flake is None else None
        taken = spec.name if spec is not None else None
        if taken is not None and registry.files(taken).root.exists():
            raise exists_error(taken, registry, runner) from None  # its ports are taken by it: the real cause
        name_the_vm_holding(request.forwards, registry)
        raise
    planned = volume_attach.plan(request.volumes, layout)
    for note in volume_attach.hidden_volumes(planned, layout):
        prog.note(note)
    if request.accel == "kvm":  # a foreign guest: refused now, not after its minutes-long build
        check_arch_option(arch)
        spec = _spec(path) if image is None and arch is None and flake is None else None
        wanted = image.manifest.arch if image is not None else arch or (
            (spec.arch or host_arch()) if spec is not None else None)
        if wanted is not None:
            refuse_kvm(wanted)
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
        kept = Registry(layout).files(plan.name).root.exists()
        if plan.restore is None or guest_said_no or kept:
            if isinstance(exc, AgentError) and not kept:  # its hint sends the user to the VM: there is none
                exc.hint = (f"nothing of {plan.name} was kept (its start was undone): fix what the guest says "
                            "above, then run up again (--debug shows every step)")
            raise  # not a restore, the name is taken, or the undo kept the attempt: a cold boot would hide why
        # Nothing of the attempt is left (its undo ran): say why, forget the template, boot.
        reason = f"restoring failed ({exc.message}); booted cold"
        prog.stage(reason)
        log.warning("%s: %s", plan.name, reason)
        TemplateStore(layout).remove(plan.restore.template.meta.key)
        record = plan.record.model_copy(update={"start": "cold", "start_reason": reason, "start_warning": True})
        plan = dataclasses.replace(plan, restore=None, boot_timeout=boot_timeout, record=record)
        Launch(plan, layout, runner, prog).run()
    vm = VM(plan.name, layout, runner)
    if wait and (plan.record.checks or plan.record.services):
        prog.stage("waiting for health checks" if plan.record.checks else "waiting for the services to start")
        try:
            vm.wait_healthy(wait_timeout)  # a timeout keeps the VM for inspection (the error says so)
        except KeyboardInterrupt:
            vm.down()  # Ctrl-C aborts the whole `up`
            raise
    # Only now, the VM up (and healthy, with --wait): a maker started before the wait took the
    # cores from it, and outlived a Ctrl-C or a failed wait that had undone the rest.
    try:  # a template that cannot be made now must not fail the `up`
        started = templates.make_behind(image, cpus=plan.record.cpus, memory=plan.record.memory,
                                        restore=plan.restore, env=request.env, volumes=bool(plan.volumes),
                                        forced_cold=request.cold or bool(request.shares), backend=backend,
                                        layout=layout, runner=runner)
    except (MvmError, OSError) as exc:
        started = f"no template made for the next `up`: {getattr(exc, 'message', exc)}"
        log.warning("%s: %s", plan.name, started)
    if started:
        prog.note(started)
    return vm


def _spec(path: str | os.PathLike[str]) -> GuestSpec | None:
    """The ``mvm.toml`` at ``path``, read ahead of the build for what is asked before it (its
    name, its architecture), or None where it cannot be read now (the build will say why)."""
    try:
        return load_toml(spec_file(Path(path)))
    except (MvmError, OSError):
        return None
