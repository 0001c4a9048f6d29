"""The library API, and the one module that sequences spec → image → backend → registry.

Everything ``mvmctl`` does is a call here, so tests and integrations use the same path:

    vm = mvm.up("examples/hello", ports=["8080:8080"])
    vm.exec(["cat", "/etc/hostname"])
    vm.down()

``up`` is transactional: every step registers its undo on an ``ExitStack`` (stop QEMU,
remove the VM dir, release volume locks), and the stack is disarmed only once the guest
agent answers. A failure or Ctrl-C anywhere before that leaves nothing behind.
"""

from __future__ import annotations

import base64
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from .. import _proc
from .._proc import DEFAULT_RUNNER, Runner
from ..backends.base import Backend, LaunchSpec, PortForward, Share
from ..errors import (
    AgentError,
    BootError,
    ExecTimeout,
    HealthTimeout,
    MvmError,
    UsageError,
    VMError,
    VMNotFound,
    VMNotRunning,
)
from ..names import check_vm_name
from ..paths import Layout, VMFiles
from ..runtime import agent
from ..runtime.bootconfig import write_config_disk
from ..runtime.registry import PortRecord, Registry, VMRecord, derive_status, record_view
from .options import parse_env, parse_port

if TYPE_CHECKING:
    from ..images.store import Image

log = logging.getLogger(__name__)

BOOT_TIMEOUT = 90.0
SHUTDOWN_TIMEOUT = 20.0


class Progress(Protocol):
    """How long-running calls report what they are doing (the CLI draws it with Rich)."""

    def stage(self, name: str) -> None: ...

    def line(self, text: str) -> None: ...


class _Quiet:
    def stage(self, name: str) -> None:
        log.info("stage: %s", name)

    def line(self, text: str) -> None:
        log.debug("%s", text)


@dataclass
class BuildResult:
    image: Image
    built: bool
    seconds: float


def _layout(layout: Layout | None) -> Layout:
    return layout or Layout.default()


def build(
    path: str | os.PathLike[str] = ".",
    *,
    flake: str | None = None,
    nix_args: Sequence[str] = (),
    layout: Layout | None = None,
    runner: Runner = DEFAULT_RUNNER,
    progress: Progress | None = None,
) -> BuildResult:
    """Build (or find in the cache) the image for the ``mvm.toml`` at ``path``, or, with
    ``flake="REF[#ATTR]"``, for a flake output made by ``mkGuest`` (``nix_args`` are passed
    to nix, e.g. ``["--override-input", "nixpkgs", "path:/src/nixpkgs"]``)."""
    from ..images import debian

    started = time.monotonic()
    prog = progress or _Quiet()
    if flake is None and nix_args:
        raise UsageError("--override-input and --nix-arg are for --flake builds")
    if flake is not None:
        from ..images import nix

        if str(path) != ".":
            raise UsageError(f"give either a path ({path}) or --flake, not both")

        image, built = nix.build(flake, nix_args=nix_args, layout=_layout(layout), runner=runner,
                                 on_stage=prog.stage, on_line=prog.line)
        return BuildResult(image, built, time.monotonic() - started)
    source = Path(path)
    from .. import spec as spec_mod

    guest = spec_mod.load_toml(source)
    prog.stage("resolving")
    image, built = debian.build(
        guest,
        source=spec_mod.spec_file(source).resolve(),
        layout=_layout(layout),
        runner=runner,
        on_stage=prog.stage,
        on_line=prog.line,
    )
    return BuildResult(image, built, time.monotonic() - started)


@dataclass
class ExecResult:
    exit_code: int
    stdout: bytes = b""
    stderr: bytes = b""


@dataclass
class VM:
    """A handle on one VM in the registry. Cheap to create; every call re-reads state."""

    name: str
    layout: Layout = field(default_factory=Layout.default)

    @property
    def files(self) -> VMFiles:
        return Registry(self.layout).files(self.name)

    def record(self) -> VMRecord:
        return Registry(self.layout).load(self.name)

    def info(self) -> dict[str, Any]:
        return record_view(self.record(), self.files)

    @property
    def status(self) -> str:
        return derive_status(self.record(), self.files)

    def _require_running(self) -> VMRecord:
        record = self.record()
        status = derive_status(record, self.files)
        if status not in ("running", "starting"):
            raise VMNotRunning(self.name, f"VM {self.name!r} is {status}",
                               hint=f"see why with `mvmctl logs {self.name}`")
        return record

    def agent_status(self, timeout: float = 5.0) -> dict[str, Any]:
        self._require_running()
        return agent.request(self.files, self.name, "status", timeout=timeout)

    def ping(self, timeout: float = 5.0) -> float:
        self._require_running()
        started = time.monotonic()
        agent.request(self.files, self.name, "ping", timeout=timeout)
        return time.monotonic() - started

    def exec(
        self,
        argv: Sequence[str],
        *,
        user: str | None = None,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        timeout: float | None = None,
        stdin: bytes | Iterable[bytes] | None = None,
        on_output: Callable[[str, bytes], None] | None = None,
    ) -> ExecResult:
        """Run ``argv`` in the guest (no shell) and return its exit code and output.

        Output is collected unless ``on_output(stream, data)`` is given, which then gets it
        as it arrives. Raises :class:`ExecTimeout` once ``timeout`` expires (the guest
        process is killed).
        """
        if not argv:
            raise UsageError("exec needs a command", hint="e.g. mvmctl exec NAME -- uname -a")
        self._require_running()
        out: dict[str, list[bytes]] = {"stdout": [], "stderr": []}
        request: dict[str, Any] = {"argv": list(argv), "user": user, "env": env or {}, "cwd": cwd}
        if timeout:
            request["timeout"] = timeout
        with agent.AgentSession(self.files, self.name) as session:
            session.start("exec", **request)
            if stdin is not None:
                # Input goes from its own thread, so output streams while input is still
                # being sent (and a large input cannot deadlock against unread output).
                feeder = threading.Thread(target=_feed_stdin, args=(session, stdin), daemon=True)
                feeder.start()
            final: dict[str, Any] = {}
            for msg in session.events():
                if "event" in msg:
                    data = base64.b64decode(msg.get("data") or "")
                    if on_output:
                        on_output(msg["event"], data)
                    else:
                        out.setdefault(msg["event"], []).append(data)
                else:
                    final = msg
        if final.get("timed_out"):
            raise ExecTimeout(self.name, f"command {list(argv)!r} {final.get('error')}",
                              hint="raise --timeout if it needs longer")
        if not final.get("ok") and final.get("exit") == 127:
            raise AgentError(self.name, str(final.get("error")))
        return ExecResult(int(final.get("exit", 1)), b"".join(out["stdout"]), b"".join(out["stderr"]))

    def forward(self, port: str | PortForward) -> PortForward:
        """Add a host→guest port forward to the running VM and record it."""
        fwd = parse_port(port) if isinstance(port, str) else port
        self._require_running()
        with Registry(self.layout).transaction(self.name) as (files, record):  # one forward at a time
            for existing in record.ports:
                if existing.host_port == fwd.host_port and existing.proto == fwd.proto:
                    raise UsageError(
                        f"host port {fwd.host_port}/{fwd.proto} is already forwarded to guest port "
                        f"{existing.guest_port} on {self.name}",
                        hint="pick another host port",
                    )
            backend = backend_for(record)
            if "hotplug-forward" not in backend.capabilities():
                raise UsageError(f"the {backend.name} backend cannot add forwards to a running VM",
                                 hint=f"stop it and `mvmctl up` again with -p {fwd.host_port}:{fwd.guest_port}")
            backend.add_forward(files, fwd)
            record.ports.append(PortRecord(**fwd.__dict__))
        return fwd

    def wait_healthy(self, timeout: float, on_change: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
        """Block until every health check is healthy; raise HealthTimeout naming the failures."""
        deadline = time.monotonic() + timeout
        last: dict[str, Any] = {}
        while True:
            status = self.agent_status()
            checks = status.get("health") or {}
            if on_change and checks != last:
                on_change(checks)
            last = checks
            if all(c.get("state") == "healthy" for c in checks.values()):
                return status
            if time.monotonic() > deadline:
                bad = {n: c for n, c in checks.items() if c.get("state") != "healthy"}
                detail = "; ".join(
                    f"{n} is {c.get('state')} (last exit {c.get('last_exit')}"
                    + (f", output: {c.get('last_output')!r}" if c.get("last_output") else "")
                    + ")"
                    for n, c in bad.items()
                )
                from ..backends.qemu import tail

                raise HealthTimeout(
                    self.name,
                    f"not healthy after {timeout:g}s: {detail}",
                    hint=f"the VM is left running for inspection: `mvmctl logs {self.name}`, "
                    f"`mvmctl status {self.name}`; stop it with `mvmctl down {self.name}`",
                    output=tail(self.files.console_log, 15),
                )
            time.sleep(0.25)

    def down(self, timeout: float = SHUTDOWN_TIMEOUT) -> str:
        return down(self.name, timeout=timeout, layout=self.layout)


def _feed_stdin(session: agent.AgentSession, stdin: bytes | Iterable[bytes]) -> None:
    try:
        for chunk in [stdin] if isinstance(stdin, bytes) else stdin:
            session.send_stdin(chunk)
        session.send_input("eof")
    except (AgentError, OSError):
        pass  # the command ended (or the VM went away) before it read all its input


def _default_backend() -> Backend:
    from ..backends.qemu import QemuBackend

    return QemuBackend()


def backend_for(record: VMRecord | None) -> Backend:
    """The backend that runs a recorded VM (QEMU is the only one so far)."""
    if record is not None and record.backend != "qemu":
        raise UsageError(f"VM {record.name!r} runs on backend {record.backend!r}, which this mvm lacks")
    return _default_backend()


def up(
    path: str | os.PathLike[str] = ".",
    *,
    flake: str | None = None,
    nix_args: Sequence[str] = (),
    name: str | None = None,
    cpus: int | None = None,
    memory: int | None = None,
    ports: Sequence[str | PortForward] = (),
    env: dict[str, str] | Sequence[str] | None = None,
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
) -> VM:
    """Build if needed, boot, and return once the guest agent answers (or is healthy).

    ``volumes`` are ``-v`` values (see :mod:`mvm.volumes.attach`); they are all checked
    before anything is built or created. ``image`` boots an already-built image instead;
    ``shares`` are host directories the guest can mount live (``mvmctl dev`` shares the
    project directory this way).
    """
    layout = _layout(layout)
    prog = progress or _Quiet()
    forwards = [parse_port(p) if isinstance(p, str) else p for p in ports]
    overrides = dict(env) if isinstance(env, dict) else parse_env(list(env or []))
    if cpus is not None and not 1 <= cpus <= 64:
        raise UsageError(f"--cpus {cpus}: must be between 1 and 64")
    if memory is not None and not 64 <= memory <= 65536:
        raise UsageError(f"--memory {memory}: must be between 64 and 65536 MiB")
    if name is not None:
        try:
            check_vm_name(name)
        except ValueError as exc:
            raise UsageError(f"--name: {exc}") from None
    from ..backends import accel
    from ..backends.qemu import check_ports_free
    from ..volumes import attach as volumes_mod

    check_ports_free(forwards)  # before building or creating anything
    vol_plan = volumes_mod.plan(volumes, layout)

    if image is None:
        image = build(path, flake=flake, nix_args=nix_args, layout=layout, runner=runner, progress=prog).image
    guest = image.manifest.guest
    vm_name = name or image.name
    prog.stage("choosing accelerator")
    choice = accel.choose(hypervisor, image.kernel, image.initrd, layout.probes)
    backend = backend or _default_backend()
    registry = Registry(layout)
    record = VMRecord(
        name=vm_name,
        backend=backend.name,
        accel=choice.accel,
        image_key=image.key,
        image_path=str(image.path),
        frontend=image.manifest.frontend,
        source=str(image.manifest.source.get("path") or image.manifest.source.get("flake") or ""),
        cpus=cpus or int(guest.get("cpus") or 1),
        memory=memory or int(guest.get("memory") or 512),
        ports=[PortRecord(**f.__dict__) for f in forwards],
        env_keys=sorted(overrides),
        services=sorted(guest.get("services") or {}),
        checks=sorted(guest.get("healthChecks") or {}),
        volumes=volumes_mod.records(vol_plan, layout),
    )
    with ExitStack() as undo:
        files = registry.reserve(record)
        undo.callback(registry.remove, vm_name)
        vols = volumes_mod.attach(vol_plan, vm=vm_name, files=files, layout=layout, undo=undo,
                                  runner=runner, stage=prog.stage)
        write_config_disk(files.config_disk, {"vm": vm_name, "env": overrides, "volumes": vols.boot})
        launch = LaunchSpec(
            name=vm_name,
            files=files,
            kernel=image.kernel,
            initrd=image.initrd,
            rootfs=image.rootfs,
            cpus=record.cpus,
            memory=record.memory,
            accel=choice.accel,
            ports=forwards,
            config_disk=files.config_disk,
            disks=vols.disks,
            hold_fds=vols.hold_fds,
            shares=list(shares),
        )
        prog.stage(f"booting ({choice.accel})")
        pid = backend.start(launch)
        started = _proc.start_time(pid)
        undo.callback(backend.stop, files, pid, 5.0, started)
        vols.held_by(pid, started)

        def mark_started(r: VMRecord) -> None:
            r.pid, r.pid_start, r.started_at = pid, started, time.time()

        registry.update(vm_name, mark_started)
        prog.stage("waiting for the guest agent")
        try:
            agent.wait_ready(files, vm_name, boot_timeout, lambda: _proc.alive(pid, started))
        except AgentError as exc:
            from ..backends.qemu import tail

            raise BootError(
                vm_name,
                f"the VM did not come up: {exc.message}",
                hint="the console output below shows how far it got",
                output=tail(files.console_log, 25),
            ) from exc

        def mark_running(r: VMRecord) -> None:
            r.state = "running"

        registry.update(vm_name, mark_running)
        undo.pop_all()
    vols.booted()
    vm = VM(vm_name, layout)
    if wait and record.checks:
        prog.stage("waiting for health checks")
        try:
            vm.wait_healthy(wait_timeout)  # a timeout keeps the VM for inspection (the error says so)
        except KeyboardInterrupt:
            down(vm_name, layout=layout)  # Ctrl-C aborts the whole `up`
            raise
    return vm


def get(name: str, *, layout: Layout | None = None) -> VM:
    vm = VM(name, _layout(layout))
    vm.record()  # raises VMNotFound / StateError
    return vm


def ls(*, layout: Layout | None = None, health: bool = True) -> list[dict[str, Any]]:
    """Every VM in the registry with derived status (and health summary if running)."""
    layout = _layout(layout)
    registry = Registry(layout)
    rows = []
    for name in registry.names():
        files = registry.files(name)
        try:
            view = record_view(registry.load(name), files)
        except MvmError as exc:
            rows.append({"name": name, "status": "broken", "error": exc.message, "dir": str(files.root)})
            continue
        view["health"] = "none" if not view.get("checks") else "unknown"
        if health and view["status"] == "running" and view.get("checks"):
            try:
                status = agent.request(files, name, "status", timeout=2.0)
                view["health"] = summarize_health(status.get("health") or {})
            except MvmError:
                view["health"] = "unknown"
        rows.append(view)
    return rows


def summarize_health(checks: dict[str, Any]) -> str:
    if not checks:
        return "none"
    states = {c.get("state") for c in checks.values()}
    for state in ("unhealthy", "starting"):
        if state in states:
            return state
    return "healthy"


def _candidate_pids(record: VMRecord | None, files: VMFiles) -> Iterator[tuple[int, int | None]]:
    """QEMU pids that belong to this VM: the recorded one, or any whose cwd is the VM dir
    (found even when vm.json is unreadable)."""
    if record and record.pid:
        yield record.pid, record.pid_start
    for pid in _proc.pids_with_cwd(files.root):
        yield pid, _proc.start_time(pid)


def down(name: str, *, timeout: float = SHUTDOWN_TIMEOUT, layout: Layout | None = None) -> str:
    """Stop a VM and remove its runtime dir. Raises VMNotFound for an unknown name (the CLI
    reports that and exits 0, so `mvmctl down` can be repeated safely).

    Escalation: the agent stops services, syncs and powers off; if that fails, QMP
    ``quit``; then SIGTERM/SIGKILL. The runtime dir goes in every case.
    """
    layout = _layout(layout)
    registry = Registry(layout)
    files = registry.files(name)
    if not files.root.exists():
        raise VMNotFound(name, f"no VM named {name!r}", hint="list VMs with `mvmctl ls`")
    try:
        record: VMRecord | None = registry.load(name)
    except MvmError:
        record = None  # corrupt state: still find and stop its QEMU
    if (record is not None and record.state == "starting" and not _proc.alive(record.pid, record.pid_start)
            and _proc.alive(record.owner_pid, record.owner_start)):
        raise VMError(name, f"VM {name!r} is being started by process {record.owner_pid}",
                      hint="wait for that `mvmctl up` to finish (or interrupt it), then run down")
    how = "not running"
    for pid, started in _candidate_pids(record, files):
        if not _proc.alive(pid, started):
            continue
        try:
            registry.update(name, lambda r: setattr(r, "state", "stopping"))
        except MvmError:
            pass
        how = "stopped by the guest"
        backend = backend_for(record)
        try:
            agent.request(files, name, "shutdown", timeout=3.0)
            if not _proc.wait_gone(pid, started, timeout):
                how = backend.stop(files, pid, 5.0, started)
        except MvmError:
            how = backend.stop(files, pid, 5.0, started)
    registry.remove(name)
    return how
