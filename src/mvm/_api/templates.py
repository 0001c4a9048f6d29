"""Fast start: making templates, and choosing one for an ``up`` (the store is
:mod:`mvm.runtime.templates`, which explains what a template holds).

Making one is a boot with ``mvm.template=1`` and the RAM in a shared file: the guest agent
comes up and waits for its config; the machine is saved (``agent``); then it gets the
image's default config, its services start, its checks turn healthy, and it is saved again
(``ready``). After the first cold ``up`` of an image and shape, a detached ``mvmctl`` makes
one in the background (``MVM_TEMPLATES=restore`` only restores, ``off`` neither);
``mvmctl template create`` makes one now.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .. import backends
from .._proc import DEFAULT_RUNNER, Runner
from ..backends.base import SAVE_RESTORE, Backend, LaunchSpec, MachineRef, MachineRequest, MemoryFile
from ..errors import MvmError, UsageError, check_free
from ..images.store import Image, ImageStore
from ..paths import Layout, VMFiles
from ..runtime import agent, machine_users
from ..runtime.templates import (
    CONFIGURE_TIMEOUT,
    HOTPLUG_SLOTS,
    TEMPLATE_KERNEL_ARGS,
    Damaged,
    Kind,
    Shape,
    Template,
    TemplateMeta,
    TemplateStore,
    template_key,
)
from .machines import preflight, start_confined
from .models import GuestStatus, TemplateInfo
from .progress import Progress, Quiet

log = logging.getLogger(__name__)

VERSION = "template-1"  # the device set and the guest's template protocol
HEALTH_TIMEOUT = 120.0
#: Disk space a template needs beyond twice its RAM (root disk writes, saved state, logs).
TEMPLATE_SPARE_BYTES = 256 << 20
NO_TEMPLATE = "no template yet for this image and shape"


def mode() -> str:
    """``auto`` (restore, and make templates after cold boots), ``restore`` or ``off``."""
    value = os.environ.get("MVM_TEMPLATES", "auto")
    return value if value in ("auto", "restore", "off") else "auto"


def key_for(image: Image, cpus: int, memory: int, backend: Backend) -> str:
    shape = Shape(cpus=cpus, memory=memory, arch=image.manifest.arch)
    return template_key(image.key, shape, backend.machine_version(image.manifest.arch), VERSION)


@dataclass(frozen=True)
class Restore:
    template: Template
    kind: Kind


@dataclass(frozen=True)
class Choice:
    """A template to restore from (or None), why, and whether the reason deserves a warning
    (a template that should have been used could not be)."""

    restore: Restore | None
    reason: str
    warn: bool = False


def choose(image: Image, *, cpus: int, memory: int, env: bool, volumes: int, shares: bool, cold: bool,
           backend: Backend, layout: Layout) -> Choice:
    """A template to restore this ``up`` from, or the reason for a cold boot."""
    if cold:
        return Choice(None, "--cold")
    if mode() == "off":
        return Choice(None, "templates are off (MVM_TEMPLATES=off)")
    if SAVE_RESTORE not in backend.capabilities():
        return Choice(None, f"the {backend.name} backend cannot restore machines")
    if shares:
        return Choice(None, "a shared directory (virtiofs) cannot be restored")
    if volumes > HOTPLUG_SLOTS:
        return Choice(None, f"{volumes} volumes: a restored VM takes at most {HOTPLUG_SLOTS}", warn=True)
    store = TemplateStore(layout)
    key = key_for(image, cpus, memory, backend)
    try:
        template = store.get(key)
    except Damaged as exc:
        store.remove(key)
        return Choice(None, f"the template was damaged ({exc}) and is removed; a new one will be made", warn=True)
    if template is None:
        busy = store.lock_path(key).exists() and not _unheld(store.lock_path(key))
        return Choice(None, "the template for this image and shape is still being made" if busy else
                      NO_TEMPLATE)
    kind: Kind = "agent" if (env or volumes) else "ready"
    if kind not in template.meta.kinds:
        return Choice(None, f"the template has no {kind!r} state (its services never became healthy)", warn=True)
    return Choice(Restore(template, kind), f"restored from template {key[:12]} ({kind})")


def missing(image: Image, *, cpus: int, memory: int, backend: Backend, layout: Layout) -> bool:
    """Should a template be made in the background now? (``auto`` mode, a backend that can
    restore, and no template, not even one being made.)"""
    if mode() != "auto" or SAVE_RESTORE not in backend.capabilities():
        return False
    store = TemplateStore(layout)
    key = key_for(image, cpus, memory, backend)
    lock = store.lock_path(key)
    return not store.dir(key).exists() and (not lock.exists() or _unheld(lock))


def _unheld(lock: Path) -> bool:
    from filelock import FileLock, Timeout

    try:
        with FileLock(str(lock), timeout=0):
            return True
    except Timeout:
        return False


def identity(seed_for: str, hostname: str | None) -> dict[str, object]:
    """What makes a clone its own machine: fresh RNG bytes from the host, its hostname."""
    return {"seed": base64.b64encode(os.urandom(64)).decode(), "hostname": hostname or seed_for}


# -- making one ---------------------------------------------------------------------------


def make_template(image: Image, *, cpus: int, memory: int, layout: Layout, runner: Runner = DEFAULT_RUNNER,
                  backend: Backend | None = None, progress: Progress | None = None) -> Template:
    """Boot ``image`` once as a template and save it (see the module docstring)."""
    from filelock import FileLock

    backend = backend or backends.get("qemu", runner)
    prog = progress or Quiet()
    store = TemplateStore(layout)
    key = key_for(image, cpus, memory, backend)
    store.root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(store.lock_path(key))):
        try:
            existing = store.get(key)
        except Damaged:
            existing = None
        if existing is not None:
            return existing
        # the machine's RAM file, its copy, root disk and state: refuse before booting, not halfway
        # (QEMU dies of SIGBUS when a file-backed RAM page finds no room on disk)
        check_free(store.root, 2 * memory * 2**20 + TEMPLATE_SPARE_BYTES, f"saving a template of a {memory} MB machine")
        started = time.monotonic()
        staging = Path(tempfile.mkdtemp(prefix=f".build-{key[:12]}-", dir=store.root))
        files = VMFiles(staging / "vm")
        files.root.mkdir(mode=0o700)
        try:
            with contextlib.ExitStack() as running:  # stops the machine if anything below fails
                prog.stage("booting the template")
                machine, kinds = _boot_and_save(image, cpus, memory, key, staging, files, backend, runner, prog,
                                                layout, running)
                meta = TemplateMeta(key=key, image_key=image.key, shape=Shape(cpus=cpus, memory=memory,
                                    arch=image.manifest.arch), kinds=kinds, hotplug_slots=HOTPLUG_SLOTS,
                                    created_at=time.time(), create_secs=0.0, files={})
                backend.stop(files, machine, 5.0)
                running.pop_all()
            shutil.rmtree(files.root)
            meta.create_secs = round(time.monotonic() - started, 2)
            return store.publish(staging, meta)
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)


def _boot_and_save(image: Image, cpus: int, memory: int, key: str, staging: Path, files: VMFiles,
                   backend: Backend, runner: Runner, prog: Progress, layout: Layout,
                   running: contextlib.ExitStack) -> tuple[MachineRef, list[Kind]]:
    """Boot the template machine, save it once its agent is ready and again once its services
    are healthy (if they turn healthy). ``running`` stops the machine if this fails."""
    name = f"template-{key[:8]}"
    verdict = preflight(backend, MachineRequest(name=name, kernel=image.kernel, initrd=image.initrd,
                                                probe_cache=layout.probes, arch=image.manifest.arch))
    root = staging / "root.qcow2"
    runner.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", image.rootfs, root],
               desc="creating the template's root disk")
    ram = staging / "ram"
    _ram_file_for_vms(ram)
    spec = LaunchSpec(name=name, files=files, kernel=image.kernel, initrd=image.initrd, rootfs=root,
                      root_backing=(image.rootfs,), cpus=cpus, memory=memory, accel=verdict.accel,
                      arch=image.manifest.arch, memory_file=MemoryFile(ram, shared=True),
                      hotplug_slots=HOTPLUG_SLOTS, kernel_args=TEMPLATE_KERNEL_ARGS)
    machine = start_confined(backend, spec)
    running.callback(_stop_quietly, backend, files, machine)
    agent.wait_ready(files, name, 90.0, lambda: backend.alive(machine))
    prog.stage("saving the template (agent ready)")
    backend.save(files, machine, staging / "agent.state")
    _copy(ram, staging / "agent.ram", runner)
    _ram_file_for_vms(staging / "agent.ram")
    shutil.copyfile(root, staging / "agent.qcow2")
    for log_name in ("console.log", "events.log"):
        shutil.copyfile(files.root / log_name, staging / f"agent.{log_name}")
    backend.resume(files, machine)
    agent.request(files, name, "configure", timeout=CONFIGURE_TIMEOUT,
                  config={"vm": image.name, "env": {}, "volumes": []}, **identity(name, None))
    prog.stage("waiting for the template's services")
    if not _healthy(files, name, image):
        return machine, ["agent"]
    prog.stage("saving the template (services ready)")
    backend.save(files, machine, staging / "ready.state")
    os.rename(ram, staging / "ready.ram")
    os.rename(root, staging / "ready.qcow2")
    for log_name in ("console.log", "events.log"):
        shutil.copyfile(files.root / log_name, staging / f"ready.{log_name}")
    return machine, ["agent", "ready"]


def _stop_quietly(backend: Backend, files: VMFiles, machine: MachineRef) -> None:
    """Stop a template machine whose making failed (the failure is what the caller reports)."""
    try:
        backend.stop(files, machine, 2.0)
    except MvmError as exc:
        log.warning("%s", exc.message)


def _ram_file_for_vms(path: Path) -> None:
    """A template's RAM file, which every VM's QEMU opens (read-write, though a clone maps it
    copy-on-write): the group all their users share (runtime/machine_users), no one else."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o660)
    try:
        group = machine_users.shared_group()
        if group is not None:
            os.fchown(fd, 0, group)
        os.fchmod(fd, 0o660 if group is not None else 0o600)
    finally:
        os.close(fd)


def _copy(src: Path, dest: Path, runner: Runner) -> None:
    runner.run(["cp", "--sparse=always", src, dest], desc=f"copying {src.name}")


def _healthy(files: VMFiles, name: str, image: Image) -> bool:
    """Every service running and every check healthy (no checks: services running a moment)."""
    deadline = time.monotonic() + HEALTH_TIMEOUT
    want_services, want_checks = set(image.manifest.guest.services), set(image.manifest.guest.health_checks)
    while time.monotonic() < deadline:
        try:
            status = GuestStatus.from_agent(agent.request(files, name, "status", timeout=5.0), name)
        except MvmError:
            return False
        services = {s.name: s for s in status.services}
        checks = {c.name: c for c in status.checks}
        if any(s.state == "failed" for s in services.values()):
            return False
        if (set(services) == want_services and all(s.state == "running" for s in services.values())
                and set(checks) == want_checks and all(c.state == "healthy" for c in checks.values())):
            if not want_checks:
                time.sleep(1.0)  # no checks: give the services a moment to finish starting
            return True
        time.sleep(0.2)
    return False


def make_in_background(image: Image, *, cpus: int, memory: int, layout: Layout, backend: str,
                       runner: Runner = DEFAULT_RUNNER) -> None:
    """Start a detached, niced ``python -m mvm._api.templates`` that makes the template (its
    output goes to the template store's ``.background.log``); returns at once."""
    store = TemplateStore(layout)
    store.root.mkdir(parents=True, exist_ok=True)
    with open(store.root / ".background.log", "ab") as out:
        # `setsid --fork` returns at once, leaving the maker in a session of its own (no zombie
        # of ours, no tie to this terminal); `nice` keeps it behind the VMs the user runs.
        spawned = runner.spawn(["setsid", "--fork", "nice", "-n", "10", sys.executable, "-m", "mvm._api.templates",
                                backend, str(image.path), str(cpus), str(memory)], stdout=out,
                               env={"MVM_STATE": str(layout.state), "MVM_CACHE": str(layout.cache)})
    spawned.wait()


def _main(argv: list[str]) -> int:
    backend_name, image_path, cpus, memory = argv[0], Path(argv[1]), int(argv[2]), int(argv[3])
    layout = Layout.default()
    image = ImageStore(image_path.parent).get(image_path.name)
    if image is None:
        return 1
    try:
        make_template(image, cpus=cpus, memory=memory, layout=layout, backend=backends.get(backend_name))
    except MvmError as exc:
        print(f"template for {image.name}: {exc.message}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))


# -- the public API: create, list, remove ---------------------------------------------------


def template_create(path: str | os.PathLike[str] = ".", *, flake: str | None = None, nix_args: Sequence[str] = (),
                    cpus: int | None = None, memory: int | None = None, arch: str | None = None,
                    layout: Layout | None = None, runner: Runner = DEFAULT_RUNNER,
                    progress: Progress | None = None) -> TemplateInfo:
    """Build the image if needed and make its template for this shape now (an ``up`` of the
    same image and shape then restores it)."""
    from .build import build_image

    layout = layout or Layout.default()
    image, _ = build_image(path, flake=flake, nix_args=nix_args, arch=arch, layout=layout, runner=runner,
                           progress=progress)
    guest = image.manifest.guest
    template = make_template(image, cpus=cpus or guest.cpus, memory=memory or guest.memory, layout=layout,
                             runner=runner, progress=progress)
    return _info(template.meta.key, template, None, layout)


def _info(key: str, template: Template | None, damaged: str | None, layout: Layout) -> TemplateInfo:
    if template is None:
        path = TemplateStore(layout).dir(key)
        size = sum(f.stat().st_blocks * 512 for f in path.iterdir() if f.is_file()) if path.is_dir() else 0
        return TemplateInfo(key=key, path=str(path), bytes_on_disk=size, damaged=damaged)
    meta = template.meta
    image = ImageStore(layout.images).get(meta.image_key)
    return TemplateInfo(key=key, path=str(template.path), image=meta.image_key, name=image.name if image else None,
                        kinds=list(meta.kinds), cpus=meta.shape.cpus, memory=meta.shape.memory,
                        arch=meta.shape.arch, created_at=meta.created_at, create_secs=meta.create_secs,
                        bytes_on_disk=template.bytes_on_disk)


def templates_list(*, layout: Layout | None = None) -> list[TemplateInfo]:
    """Every template, with its image, shape and disk use (damaged ones say why)."""
    layout = layout or Layout.default()
    return [_info(key, t, why, layout) for key, t, why in TemplateStore(layout).all()]


def template_rm(key: str, *, layout: Layout | None = None) -> TemplateInfo:
    """Remove a template (by key, or its first 4+ characters)."""
    layout = layout or Layout.default()
    matches = [info for info in templates_list(layout=layout) if len(key) >= 4 and info.key.startswith(key)]
    if len(matches) != 1:
        raise UsageError(f"{'no' if not matches else 'more than one'} template {key!r}",
                         hint="list them with `mvmctl template ls`")
    TemplateStore(layout).remove(matches[0].key)
    return matches[0]
