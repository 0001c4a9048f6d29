"""Making templates: a boot saved twice (``agent``, then ``ready``), and ``ready`` states for
other ``-e`` values, restored from ``agent`` and saved again. Run detached in the background
after an ``up`` (``python -m mvm._api.template_maker``), or by ``mvmctl template create``. What
the saved states hold, and when ``up`` uses them: :mod:`mvm._api.templates`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

from .. import backends
from .._locks import locked
from .._proc import DEFAULT_RUNNER, Runner
from ..backends.base import Backend, Incoming, LaunchSpec, MachineRef, MachineRequest, MemoryFile
from ..builders.store import Image, ImageStore
from ..errors import HealthTimeout, MvmError, StateError, check_free
from ..names import HEALTH_TIMEOUT
from ..paths import Layout, VMFiles
from ..runtime import agent, machine_users
from ..runtime.bootconfig import BootConfig
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
    env_digest,
    identity,
    key_for,
)
from .machines import create_overlay, preflight, start_undoable
from .models import GuestStatus
from .progress import Progress, Quiet

log = logging.getLogger(__name__)

#: A ``ready`` state for ``-e`` values is made behind an ``up``, by a VM ``ls`` does not show:
#: values its services are not healthy with by then get none (their ``up`` restores the
#: ``agent`` state, and the next one tries again).
ENV_STATE_HEALTH_TIMEOUT = 30.0
#: Disk space a template needs beyond twice its RAM (root disk writes, saved state, logs).
TEMPLATE_SPARE_BYTES = 256 << 20


def make_template(image: Image, *, cpus: int, memory: int, layout: Layout, runner: Runner = DEFAULT_RUNNER,
                  backend: Backend | None = None, progress: Progress | None = None,
                  health_timeout: float = HEALTH_TIMEOUT) -> Template:
    """Boot ``image`` once as a template and save it (see the module docstring). A guest not
    healthy within ``health_timeout`` gets an ``agent`` state only (0: never wait)."""
    backend = backend or backends.get(backends.DEFAULT, runner)
    prog = progress or Quiet()
    store = TemplateStore(layout)
    key = key_for(image, cpus, memory, backend)
    store.root.mkdir(parents=True, exist_ok=True)
    with locked(store.lock_path(key)):
        try:
            existing = store.get(key)
        except Damaged:
            existing = None
        if existing is not None:
            return existing
        # the machine's RAM file, its copy, root disk and state: refuse before booting, not halfway
        # (QEMU dies of SIGBUS when a file-backed RAM page finds no room on disk)
        check_free(store.root, 2 * memory * 2**20 + TEMPLATE_SPARE_BYTES,
                   f"saving a template of a {memory} MiB machine")
        for dead in store.root.glob(f".build-{key[:12]}-*"):  # we hold the key's lock: its maker died
            stop_staged_machine(dead, backend)
            shutil.rmtree(dead, ignore_errors=True)
        started = time.monotonic()
        with _staging(store, f".build-{key[:12]}-") as (staging, files):
            with contextlib.ExitStack() as running:  # stops the machine if anything below fails
                prog.stage("booting the template")
                machine, kinds = _boot_and_save(image, cpus, memory, key, staging, files, backend, runner, prog,
                                                layout, running, health_timeout)
                meta = TemplateMeta(key=key, image_key=image.key, shape=Shape(cpus=cpus, memory=memory,
                                    arch=image.manifest.arch), kinds=kinds, hotplug_slots=HOTPLUG_SLOTS,
                                    created_at=time.time(), create_secs=0.0, files={})
                backend.stop(files, machine, 5.0)
                running.pop_all()
            shutil.rmtree(files.root)
            meta.create_secs = round(time.monotonic() - started, 2)
            # under the image's lock, which `rmi` removes it under (and then its templates):
            # a template of an image removed meanwhile is of no use, and nothing would remove it
            with ImageStore(layout.images).locked(image.key):
                if not image.path.is_dir():  # rmi renames it away first
                    raise StateError(f"image {image.key[:12]} was removed while its template was made",
                                     hint="build it again; its next `up` makes a new template")
                return store.publish(staging, meta)


def stop_staged_machine(staging: Path, backend: Backend) -> None:
    """Stop the machine a template maker killed outright (SIGKILL, out of memory) left running
    in its staging dir: nothing else would, and it holds its RAM and the dir's deleted files."""
    files = VMFiles(staging / "vm")
    for machine in backend.strays(files):
        backend.stop(files, machine, 3.0)


@contextlib.contextmanager
def _staging(store: TemplateStore, prefix: str) -> Iterator[tuple[Path, VMFiles]]:
    """A staging dir in the template store (``.build-*``: `cleanup` knows an interrupted
    one) with a private VM dir for the machine being saved; removed on the way out, unless it
    was renamed into place."""
    staging = Path(tempfile.mkdtemp(prefix=prefix, dir=store.root))
    try:
        files = VMFiles(staging / "vm")
        files.root.mkdir(mode=0o700)
        yield staging, files
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _boot_and_save(image: Image, cpus: int, memory: int, key: str, staging: Path, files: VMFiles,
                   backend: Backend, runner: Runner, prog: Progress, layout: Layout,
                   running: contextlib.ExitStack, health_timeout: float) -> tuple[MachineRef, list[Kind]]:
    """Boot the template machine, save it once its agent is ready and again once its services
    are healthy (if they turn healthy). ``running`` stops the machine if this fails."""
    name = f"template-{key[:8]}"
    verdict = preflight(backend, MachineRequest(name=name, kernel=image.kernel, initrd=image.initrd,
                                                probe_cache=layout.probes, arch=image.manifest.arch))
    root = staging / "root.qcow2"
    create_overlay(runner, image.rootfs, "raw", root, "the template's root disk")
    ram = staging / "ram"
    _ram_file_for_vms(ram)
    spec = LaunchSpec(name=name, files=files, kernel=image.kernel, initrd=image.initrd, rootfs=root,
                      root_backing=(image.rootfs,), cpus=cpus, memory=memory, accel=verdict.accel,
                      arch=image.manifest.arch, memory_file=MemoryFile(ram, shared=True),
                      hotplug_slots=HOTPLUG_SLOTS, kernel_args=TEMPLATE_KERNEL_ARGS)
    machine = start_undoable(backend, spec, running, stop_timeout=2.0)
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
                  config=BootConfig(vm=image.name).model_dump(mode="json"), **identity(name, None))
    prog.stage("waiting for the template's services")
    if (why := _unhealthy(files, name, image, health_timeout)) is not None:
        prog.note(f"no ready state: {why}; its clones start their services anew")
        return machine, ["agent"]
    prog.stage("saving the template (services ready)")
    backend.save(files, machine, staging / "ready.state")
    os.rename(ram, staging / "ready.ram")
    os.rename(root, staging / "ready.qcow2")
    for log_name in ("console.log", "events.log"):
        shutil.copyfile(files.root / log_name, staging / f"ready.{log_name}")
    return machine, ["agent", "ready"]


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


#: A check that failed this many probes in a row after its grace is not waited for any longer:
#: a template of a guest that is not healthy has no ``ready`` state, and the wait costs a VM.
GIVE_UP_FAILURES = 3


def _unhealthy(files: VMFiles, name: str, image: Image, timeout: float) -> str | None:
    """None once healthy as ``up --wait`` means it (VM.wait_healthy), every service running
    (or exited for good, a one-shot), not between restarts: what is saved is what every clone
    starts from (no checks: the services running, and a moment for them to finish starting).
    Else why not: a service failing, a check failing again and again, or the time."""
    deadline = time.monotonic() + timeout
    want_services, want_checks = image.manifest.guest.services, image.manifest.guest.health_checks
    while time.monotonic() < deadline:
        try:
            status = GuestStatus.from_agent(agent.request(files, name, "status", timeout=5.0), name)
        except MvmError as exc:
            return f"the agent did not answer ({exc.message})"
        if (svc := status.failing()) is not None:
            return f"service {svc.name} is failing ({svc.failure()})"
        if (check := next((c for c in status.checks if c.state == "unhealthy"
                           and c.failures >= GIVE_UP_FAILURES), None)) is not None:
            return f"check {check.name} failed {check.failures} probes in a row (last exit {check.last_exit})"
        # (without checks, healthy_with waits until the services have run START_SECS; a one-shot
        # that has exited 0 for good is as settled as a running service: it waited the 120 s out)
        if status.healthy_with(want_services, want_checks) and all(s.state in ("running", "exited")
                                                                   for s in status.services):
            return None
        time.sleep(0.2)
    return f"not healthy within {timeout:g}s"


def make_env_state(image: Image, *, cpus: int, memory: int, env: Mapping[str, str], layout: Layout,
                   runner: Runner = DEFAULT_RUNNER, backend: Backend | None = None) -> str:
    """Restore the template's ``agent`` state, configure it with ``env``, and save it once its
    services are healthy, as a ``ready`` state for exactly these values. Returns its stem."""
    backend = backend or backends.get(backends.DEFAULT, runner)
    store = TemplateStore(layout)
    key = key_for(image, cpus, memory, backend)
    digest = env_digest(env)
    with locked(store.lock_path(key)):
        template = store.get(key)
        if template is None or "agent" not in template.meta.kinds:
            raise StateError(f"no template with an 'agent' state for {image.name} ({cpus} vCPU, {memory} MiB)",
                             hint="`mvmctl template create` makes one")
        existing = store.env_state(template, digest)
        if existing is not None:
            return existing
        check_free(store.root, memory * 2**20 + TEMPLATE_SPARE_BYTES, f"saving a {memory} MiB machine's state")
        started = time.monotonic()
        with _staging(store, f".build-{key[:12]}-env-") as (staging, files):
            with contextlib.ExitStack() as running:  # stops the machine if anything below fails
                machine = _restore_and_configure(image, template, env, staging, files, backend, runner, layout,
                                                 running)
                name = f"template-{key[:8]}"
                if (why := _unhealthy(files, name, image, ENV_STATE_HEALTH_TIMEOUT)) is not None:
                    raise HealthTimeout(name, f"{image.name}'s services did not turn healthy with these -e values: "
                                        f"{why}")
                backend.save(files, machine, staging / "state")
                for log_name in ("console.log", "events.log"):
                    shutil.copyfile(files.root / log_name, staging / log_name)
                backend.stop(files, machine, 5.0)
                running.pop_all()
            return store.add_env_state(template, digest, staging, round(time.monotonic() - started, 2))


def _restore_and_configure(image: Image, template: Template, env: Mapping[str, str], staging: Path,
                           files: VMFiles, backend: Backend, runner: Runner, layout: Layout,
                           running: contextlib.ExitStack) -> MachineRef:
    """A machine restored from ``template``'s ``agent`` state into RAM and a root disk of its own
    (copies, ``staging/ram`` mapped shared and ``staging/qcow2``), given ``env``; its services
    are starting. ``running`` stops it if anything fails."""
    name = f"template-{template.meta.key[:8]}"
    verdict = preflight(backend, MachineRequest(name=name, kernel=image.kernel, initrd=image.initrd,
                                                probe_cache=layout.probes, arch=image.manifest.arch))
    _copy(template.ram("agent"), staging / "ram", runner)
    _ram_file_for_vms(staging / "ram")
    shutil.copyfile(template.root("agent"), staging / "qcow2")
    for log_name in ("console.log", "events.log"):
        shutil.copyfile(template.log("agent", log_name), files.root / log_name)
    shape = template.meta.shape
    spec = LaunchSpec(name=name, files=files, kernel=image.kernel, initrd=image.initrd, rootfs=staging / "qcow2",
                      root_backing=(image.rootfs,), cpus=shape.cpus, memory=shape.memory, accel=verdict.accel,
                      arch=image.manifest.arch, memory_file=MemoryFile(staging / "ram", shared=True),
                      incoming=Incoming(template.state("agent"), ignore_shared=True),
                      hotplug_slots=template.meta.hotplug_slots, kernel_args=TEMPLATE_KERNEL_ARGS)
    machine = start_undoable(backend, spec, running, stop_timeout=2.0)
    agent.wait_ready(files, name, 20.0, lambda: backend.alive(machine))
    agent.request(files, name, "configure", timeout=CONFIGURE_TIMEOUT,
                  config=BootConfig(vm=image.name, env=dict(env)).model_dump(mode="json"), **identity(name, None))
    return machine


def make_in_background(image: Image, *, cpus: int, memory: int, layout: Layout, backend: str,
                       runner: Runner = DEFAULT_RUNNER, env: Mapping[str, str] | None = None) -> None:
    """Start a detached, niced ``python -m mvm._api.template_maker`` that makes the template (or,
    given ``env``, its ``ready`` state for those values; they reach it in a private file it
    deletes on start, never in its argv); its output goes to the template store's
    ``.background.log``. Returns at once."""
    store = TemplateStore(layout)
    store.root.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-m", "mvm._api.template_maker", backend, str(image.path), str(cpus), str(memory)]
    env_file = None
    if env:
        fd, name = tempfile.mkstemp(prefix=".env-", suffix=".json", dir=store.root)  # mode 0600
        with os.fdopen(fd, "w") as f:
            json.dump(dict(env), f)
        env_file = Path(name)
        argv.append(name)
    try:
        with open(store.root / ".background.log", "ab") as out:
            # `setsid --fork` returns at once, leaving the maker in a session of its own (no zombie
            # of ours, no tie to this terminal); `nice` keeps it behind the VMs the user runs.
            spawned = runner.spawn(["setsid", "--fork", "nice", "-n", "10", *argv], stdout=out,
                                   env={"MVM_STATE": str(layout.state), "MVM_CACHE": str(layout.cache)})
        spawned.wait()
    except BaseException:
        if env_file is not None:
            env_file.unlink(missing_ok=True)
        raise


def _stop_on_signal(signum: int, frame: object) -> None:
    """SIGTERM and SIGHUP unwind the maker like Ctrl-C, so that it stops its machine (it ended
    at once, and its hidden machine ran on, until a `cleanup` or the next maker of its key).
    A second one is ignored: it would cut the undo short."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    raise KeyboardInterrupt


def _main(argv: list[str]) -> int:
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _stop_on_signal)
    backend_name, image_path, cpus, memory = argv[0], Path(argv[1]), int(argv[2]), int(argv[3])
    env: dict[str, str] | None = None
    if len(argv) > 4:
        env_file = Path(argv[4])
        try:
            env = json.loads(env_file.read_text())
        finally:
            env_file.unlink(missing_ok=True)
    layout = Layout.default()
    image = ImageStore(image_path.parent).get(image_path.name)
    if image is None:
        return 1
    try:
        if env:
            make_env_state(image, cpus=cpus, memory=memory, env=env, layout=layout, backend=backends.get(backend_name))
        else:
            make_template(image, cpus=cpus, memory=memory, layout=layout, backend=backends.get(backend_name))
    except MvmError as exc:
        print(f"template for {image.name}: {exc.message}", file=sys.stderr)
        return 1
    except Damaged as exc:
        print(f"template for {image.name}: damaged: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # e.g. the template was removed (`template rm`, `cleanup`) meanwhile
        print(f"template for {image.name}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"template for {image.name}: interrupted; its machine stopped", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
