"""The handle on one VM. Cheap to create; every call re-reads the registry."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .._proc import DEFAULT_RUNNER, Runner, tail_file
from .._untrusted import as_float
from ..backends.base import HOTPLUG_FORWARD, Backend, MachineRef, PortForward
from ..errors import (
    AgentError,
    AgentTimeout,
    ExecTimeout,
    HealthTimeout,
    MvmError,
    PortInUse,
    ServiceFailed,
    UsageError,
    VMError,
    VMNotFound,
    VMNotRunning,
)
from ..names import HEALTH_TIMEOUT
from ..paths import Layout, VMFiles
from ..runtime import agent, logs
from ..runtime.logs import LogLine
from ..runtime.registry import PortRecord, Registry, VMRecord
from ..runtime.states import VMStatus
from .machines import backend_for, name_the_vm_holding, paused_error, status_of, vm_info
from .models import DownResult, ExecResult, GuestStatus, PortInfo, VMDetails, VMInfo
from .options import parse_env, parse_port

if TYPE_CHECKING:
    from .console import ConsoleSession
    from .progress import Progress


@dataclass
class VM:
    """A VM in the registry, by name. ``runner`` runs the processes its backend starts."""

    name: str
    layout: Layout = field(default_factory=Layout.default)
    runner: Runner = field(default=DEFAULT_RUNNER, repr=False)

    @property
    def files(self) -> VMFiles:
        return Registry(self.layout).files(self.name)

    def record(self) -> VMRecord:
        return Registry(self.layout).load(self.name)

    @property
    def status(self) -> VMStatus:
        record = self.record()
        return status_of(record, self.files, backend_for(record, self.runner))

    def info(self, *, ask_guest: bool = True) -> VMInfo:
        """The VM as the registry and its backend see it, and (``ask_guest``) its health.

        ``ask_guest=False`` skips the agent round trip (``health`` is then ``"unknown"`` for a
        VM with checks, and ``failing`` is empty because nobody asked): for a caller that
        wants ports, volumes or shape, and for ``up``, whose guest is answering its first
        clients at that moment and should not also be answering a status request on its one
        vCPU.
        """
        record = self.record()
        status = status_of(record, self.files, backend_for(record, self.runner))
        guest = None
        if ask_guest and status is VMStatus.RUNNING and (record.checks or record.services):
            try:
                guest = self.guest_status(timeout=2.0)
            except AgentError:
                pass
        return vm_info(record, self.files, status, guest)

    def details(self) -> VMDetails:
        """:meth:`info` plus what the guest agent reports while the VM runs."""
        record = self.record()
        status = status_of(record, self.files, backend_for(record, self.runner))
        guest = self.guest_status() if status is VMStatus.RUNNING else None
        return VMDetails(**vm_info(record, self.files, status, guest).model_dump(), guest=guest)

    def require_running(self) -> VMRecord:
        """The VM's record, or :class:`~mvm.errors.VMNotRunning` with the hint its status calls
        for (``resume`` a suspended VM, read the ``logs`` of one that stopped)."""
        record = self.record()
        status = status_of(record, self.files, backend_for(record, self.runner))
        if status not in (VMStatus.RUNNING, VMStatus.STARTING):
            hint = (f"bring it back with `mvmctl resume {self.name}`" if status is VMStatus.SUSPENDED
                    else f"see why with `mvmctl logs {self.name}`")
            raise VMNotRunning(self.name, f"VM {self.name!r} is {status}", hint=hint)
        return record

    def guest_status(self, timeout: float = 5.0) -> GuestStatus:
        """Services and health checks, as the guest agent reports them now."""
        record = self.require_running()
        try:
            reply = agent.request(self.files, self.name, "status", timeout=timeout)
        except AgentTimeout as exc:  # a machine QEMU paused (a full host disk) answers nothing
            raise paused_error(record, self.files, backend_for(record, self.runner)) or exc from None
        return GuestStatus.from_agent(reply, self.name)

    def ping(self, timeout: float = 5.0) -> float:
        """Seconds one agent round trip took (connection included)."""
        self.require_running()
        started = time.monotonic()
        agent.request(self.files, self.name, "ping", timeout=timeout)
        return time.monotonic() - started

    def clock_offset(self) -> float:
        """Seconds the guest's clock is ahead of the host's (negative: behind), from one agent
        round trip (the guest's time against the midpoint of the host's send and receive)."""
        self.require_running()
        sent = time.time()
        reply = agent.request(self.files, self.name, "ping", timeout=5.0)
        received = time.time()
        pong = as_float(reply.get("pong"))
        if pong is None:
            raise AgentError(self.name, "the agent's ping reply has no time in it")
        return pong - (sent + received) / 2

    def copy_in(self, src: str | os.PathLike[str], dest: str, *, archive: bool = False,
                follow_link: bool = False) -> None:
        """Copy a host file or directory into the guest (``mvmctl cp SRC NAME:DEST``, the rules
        of :func:`mvm.cp`)."""
        from .copy import cp

        cp(os.path.abspath(src), f"{self.name}:{dest}", archive=archive, follow_link=follow_link,
           layout=self.layout)

    def copy_out(self, src: str, dest: str | os.PathLike[str], *, follow_link: bool = False) -> list[str]:
        """Copy a guest file or directory to the host (``mvmctl cp NAME:SRC DEST``); returns what
        was left out, and why (links leading out of ``dest``, device nodes)."""
        from .copy import cp

        return cp(f"{self.name}:{src}", os.path.abspath(dest), follow_link=follow_link, layout=self.layout)

    def exec(
        self,
        *argv: str | Sequence[str],
        user: str | None = None,
        env: dict[str, str] | Sequence[str] | None = None,
        cwd: str | None = None,
        timeout: float | None = None,
        stdin: bytes | Iterable[bytes] | None = None,
        on_output: Callable[[str, bytes], None] | None = None,
    ) -> ExecResult:
        """Run a command in the guest (no shell) and return its exit code and output: its
        words (``vm.exec("ls", "-l", "/tmp")``) or one list of them (``vm.exec(["ls", "-l"])``).

        Exit codes follow the shell and ``docker exec``: 127 when the command cannot be started,
        126 when the user or working directory does not exist in the guest, 128+N when a
        signal N killed it. Without ``stdin`` the command reads end of input at once.
        ``env`` is a mapping or ``KEY=VALUE`` strings. Output is collected unless
        ``on_output(stream, data)`` is given, which then gets it as it arrives. Raises
        :class:`ExecTimeout` once ``timeout`` expires (the guest process is killed).
        """
        __tracebackhide__ = True  # a failing test's report shows its own line, not this method's source
        command = _words(argv)
        if not command:
            raise UsageError("exec needs a command", hint="e.g. mvmctl exec NAME -- uname -a")
        if timeout is not None and timeout <= 0:
            raise UsageError(f"timeout={timeout!r}: must be more than 0 seconds (None waits as long as it runs)")
        environment = parse_env(env)
        self.require_running()
        out: dict[str, list[bytes]] = {"stdout": [], "stderr": []}
        request: dict[str, Any] = {"argv": command, "user": user, "env": environment, "cwd": cwd}
        if timeout is not None:
            request["timeout"] = timeout
        with agent.AgentSession(self.files, self.name) as session:
            session.start("exec", **request)
            if stdin is None:
                session.send_input("eof")  # as `docker exec` without -i: the command reads end of input
            else:
                # Input goes from its own thread, so output streams while input is still
                # being sent (and a large input cannot deadlock against unread output).
                feeder = threading.Thread(target=_feed_stdin, args=(session, stdin), daemon=True)
                feeder.start()
            final = agent.Final(ok=False, exit=1, error="no reply")
            for msg in session.events():
                if isinstance(msg, agent.Output):
                    if on_output:
                        on_output(msg.stream, msg.data)
                    else:
                        out[msg.stream].append(msg.data)
                else:
                    final = msg
        if final.timed_out:
            raise ExecTimeout(self.name, f"command {command!r} {final.error}",
                              hint="raise --timeout if it needs longer")
        code = final.exit
        if not final.ok and final.error:  # not started (no such user or dir; not found; 126, 127), or refused
            message = f"mvm exec: {final.error}\n".encode()
            if on_output:
                on_output("stderr", message)
            else:
                out["stderr"].append(message)
        if code < 0:  # killed by signal N: 128+N, as a shell reports it
            code = 128 - code
        return ExecResult(code, b"".join(out["stdout"]), b"".join(out["stderr"]))

    def forward(self, port: str | int | PortForward) -> PortInfo:
        """Add a host→guest port forward to the running VM and record it. A host port of 0
        (``"8080"`` or ``8080`` alone: a guest port, as ``up``'s ``ports``) picks a free one;
        the result says which."""
        fwd = port if isinstance(port, PortForward) else parse_port(str(port))
        with self._forwards() as (files, record, backend, machine):
            if machine is None and not fwd.host_port:
                raise UsageError(f"{self.name} is suspended: name the host port to forward (HOST:GUEST); "
                                 "a free one is picked only for a running VM")
            for existing in record.ports:
                if fwd.host_port and existing.host_port == fwd.host_port and existing.proto == fwd.proto:
                    raise UsageError(
                        f"host port {fwd.host_port}/{fwd.proto} is already forwarded to guest port "
                        f"{existing.guest_port} on {self.name}",
                        hint="pick another host port",
                    )
            try:
                added = fwd if machine is None else backend.forward(files, machine, fwd)  # suspended: at resume
            except PortInUse:
                name_the_vm_holding([fwd], Registry(self.layout))
                raise
            record.ports.append(PortRecord.of(added))
        return PortInfo(host_ip=added.host_ip, host_port=added.host_port, guest_port=added.guest_port,
                        proto=added.proto)

    def unforward(self, port: str | int | PortForward) -> PortInfo:
        """Remove a forward and forget it: ``HOST:GUEST`` (the host side decides), or ``GUEST``
        alone, as ``-p GUEST`` added it (the one forward to that guest port)."""
        fwd = port if isinstance(port, PortForward) else parse_port(str(port))
        with self._forwards() as (files, record, backend, machine):
            if fwd.host_port == 0:
                to_guest = [p for p in record.ports if p.guest_port == fwd.guest_port and p.proto == fwd.proto]
                if len(to_guest) > 1:
                    raise UsageError(f"{self.name} has {len(to_guest)} forwards to guest port {fwd.guest_port}/"
                                     f"{fwd.proto}, from {', '.join(f'{p.host_ip}:{p.host_port}' for p in to_guest)}",
                                     hint="name the one to remove as HOST:GUEST")
                found = to_guest[0] if to_guest else None
                missing = f"no forward to guest port {fwd.guest_port}/{fwd.proto}"
            else:
                found = next((p for p in record.ports if p.host_port == fwd.host_port and p.proto == fwd.proto
                              and p.host_ip == fwd.host_ip), None)
                missing = f"no forward from host port {fwd.host_ip}:{fwd.host_port}/{fwd.proto}"
            if found is None:
                raise UsageError(f"{self.name} has {missing}", hint="see its forwards with `mvmctl ls`")
            if machine is not None:
                backend.unforward(files, machine, PortForward(found.host_port, found.guest_port, found.host_ip,
                                                              found.proto))
            record.ports.remove(found)
        return PortInfo(**found.model_dump())

    @contextmanager
    def _forwards(self) -> Iterator[tuple[VMFiles, VMRecord, Backend, MachineRef | None]]:
        """The VM's record under its lock (one change at a time), with its backend and its
        machine, or None for a suspended VM: its forwards are the record's until ``resume``
        opens them (so one whose host port was taken meanwhile can be removed, or moved)."""
        suspended = self.record().phase == "suspended"
        if not suspended:
            self.require_running()
        with Registry(self.layout).transaction(self.name) as (files, record):
            if (record.phase == "suspended") != suspended:
                raise VMError(self.name, f"VM {self.name!r} was resumed or suspended meanwhile", hint="try again")
            backend = backend_for(record, self.runner)
            if not suspended and HOTPLUG_FORWARD not in backend.capabilities():
                raise UsageError(f"the {backend.name} backend cannot change the forwards of a running VM",
                                 hint="stop it and `mvmctl up` again with the -p you want")
            machine = None
            if not suspended:
                assert record.machine is not None  # running
                machine = record.machine.ref
            yield files, record, backend, machine

    def wait_healthy(self, timeout: float, on_change: Callable[[GuestStatus], None] | None = None) -> GuestStatus:
        """Block until every service of the VM has started and every health check is healthy
        (:meth:`GuestStatus.healthy_with`). (A clone restored from an ``agent`` template reports none until its
        config is applied and its services start: an empty report is not "healthy".) Raise
        ServiceFailed as soon as a service fails for good (or crash-loops), HealthTimeout
        naming the checks when time runs out."""
        deadline = time.monotonic() + timeout
        record = self.record()
        last: GuestStatus | None = None
        while True:
            status = self.guest_status()
            if on_change and (last is None or status.checks != last.checks):
                on_change(status)
            last = status
            if status.healthy_with(record.services, record.checks):
                return status
            svc = status.failing()
            if svc is not None:  # no health will come: say why now, not after the whole timeout
                raise ServiceFailed(
                    self.name, f"service {svc.name} {'failed' if svc.state == 'failed' else 'keeps failing'}: "
                    f"{svc.failure()}",
                    hint=f"the VM is left running for inspection: `mvmctl logs {self.name}`; "
                    f"stop it with `mvmctl down {self.name}`",
                    output=logs.service_tail(self.files, svc.name),
                )
            if time.monotonic() > deadline:
                services = {s.name: s for s in status.services}
                detail = "; ".join([
                    *(f"{c.name} is {c.state} ("
                      + ("no probe has finished yet" if c.last_exit is None else f"last exit {c.last_exit}")
                      + (f", output: {c.last_output!r}" if c.last_output else "")
                      + ")"
                      for c in status.checks if c.state != "healthy"),
                    *(f"service {name} is {services[name].state}" for name in record.services
                      if name in services and not services[name].started(checked=bool(record.checks))),
                ]) or f"the guest has not reported {', '.join(sorted(set(record.checks) | set(record.services)))} yet"
                raise HealthTimeout(
                    self.name,
                    f"not healthy after {timeout:g}s: {detail}",
                    hint=f"the VM is left running for inspection: `mvmctl logs {self.name}`, "
                    f"`mvmctl status {self.name}`; stop it with `mvmctl down {self.name}`",
                    output=self._unhealthy_output(status, record),
                )
            time.sleep(0.25)

    def _unhealthy_output(self, status: GuestStatus, record: VMRecord) -> str:
        """What a health timeout shows: the output of the services its unhealthy checks are
        named after; the boot console while the guest reports none (it may not have booted)."""
        named = [c.name for c in status.checks if c.state != "healthy" and c.name in record.services]
        tails = [logs.service_tail(self.files, name) for name in named]
        return "\n".join(t for t in tails if t) or tail_file(self.files.console_log, 15)

    def logs(
        self,
        *,
        follow: bool = False,
        lines: int | None = None,
        console: bool = True,
        services: bool = True,
        service: str | None = None,
        since: float | None = None,
    ) -> Iterator[logs.LogLine]:
        """The boot console and the guest's service logs and health transitions; with
        ``follow``, new lines as they come until the VM stops. ``service`` keeps one
        service's lines, ``since`` (Unix time) the newer ones; either leaves out the console.
        ``lines``: the last that many of each part (the console's, then the services'), as
        ``mvmctl logs -n`` shows them, so up to twice that many in all."""
        record = self.record()
        if service is not None and service not in record.services:
            raise UsageError(f"{self.name} has no service {service!r}",
                             hint=f"its services: {', '.join(record.services) or 'none'}")

        def running() -> bool:
            try:
                return self.status.active
            except MvmError:  # the VM went away while we followed it
                return False

        shown = logs.stream(self.files, console=console, services=services, lines=lines, follow=follow,
                            keep=logs.LogFilter(service, since), keep_going=running)
        return self._with_end(shown) if follow else shown

    def _with_end(self, shown: Iterator[LogLine]) -> Iterator[LogLine]:
        """``shown``, then a line saying how the VM ended: `logs -f` of a VM whose QEMU was
        killed just stopped, as if it had been brought down cleanly."""
        yield from shown
        try:
            info = self.info(ask_guest=False)
        except MvmError:
            yield LogLine("init", f"[mvm] {self.name} is gone (brought down)")
            return
        yield LogLine("init", f"[mvm] {self.name} is {info.status}"
                           + (f": {info.exit_reason}" if info.exit_reason else ""))

    def console(self, *, user: str | None = None, cwd: str | None = None,
                env: dict[str, str] | None = None) -> ConsoleSession:
        """An interactive shell on a guest pty: see :class:`~mvm._api.console.ConsoleSession`."""
        from .console import ConsoleSession

        self.require_running()
        return ConsoleSession(self.files, self.name, user=user, cwd=cwd, env=env or {})

    def restart(self, *, wait: bool = False, wait_timeout: float = HEALTH_TIMEOUT,
                progress: Progress | None = None) -> VM:
        """Stop the VM and start it again with the same image, ports, volumes and ``-e``."""
        from .restart import restart

        return restart(self.name, wait=wait, wait_timeout=wait_timeout, layout=self.layout, runner=self.runner,
                       progress=progress)

    def suspend(self) -> VMInfo:
        """Save the running VM to disk and stop its machine (``resume`` brings it back)."""
        from .suspend import suspend

        return suspend(self.name, layout=self.layout, runner=self.runner)

    def resume(self, *, ask_guest: bool = True) -> VMInfo:
        """Bring a suspended VM back, with its processes, /tmp and volumes as they were;
        ``ask_guest`` as for :meth:`info` (false: no status request to the just-resumed guest)."""
        from .suspend import resume

        return resume(self.name, layout=self.layout, runner=self.runner, ask_guest=ask_guest)

    def __enter__(self) -> VM:
        """``with mvm.up(...) as vm:``: the VM is brought down when the block ends, however it ends."""
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.down()
        except VMNotFound:
            pass  # brought down inside the block already

    def down(self, timeout: float | None = None, *, keep_logs: bool = True) -> DownResult:
        """Stop the VM and forget it (see :func:`mvm.down`); its logs are kept unless ``keep_logs`` is false."""
        from .down import SHUTDOWN_TIMEOUT, down

        return down(self.name, timeout=SHUTDOWN_TIMEOUT if timeout is None else timeout, layout=self.layout,
                    runner=self.runner, keep_logs=keep_logs)


#: The most input one message carries: the guest queues a few dozen messages per command, and
#: refuses a message over 16 MiB (``exec(stdin=b"..." * 13_000_000)`` once lost its input so).
INPUT_CHUNK = 65536


def _feed_stdin(session: agent.AgentSession, stdin: bytes | Iterable[bytes]) -> None:
    try:
        for chunk in [stdin] if isinstance(stdin, bytes) else stdin:
            for start in range(0, len(chunk), INPUT_CHUNK):
                session.send_stdin(chunk[start:start + INPUT_CHUNK])
        session.send_input("eof")
    except (AgentError, OSError):
        pass  # the command ended (or the VM went away) before it read all its input


def _words(argv: tuple[str | Sequence[str], ...]) -> list[str]:
    """exec's command from its words or one list of them. One bare string with a space in it
    is refused: no shell splits it, so it would run as one program name. In a list it is what
    it says, one word (``["/opt/My App/run"]``, as ``mvmctl exec VM -- "/opt/My App/run"``)."""
    listed = len(argv) == 1 and not isinstance(argv[0], str)
    words = list(argv[0]) if listed else list(argv)
    strings = [w for w in words if isinstance(w, str)]
    if len(strings) != len(words):
        raise UsageError("exec takes the command's words (exec('ls', '-l')) or one list of them")
    if not listed and len(strings) == 1 and any(c.isspace() for c in strings[0]):
        raise UsageError(f"exec {strings[0]!r}: give the command as separate words (no shell runs it)",
                         hint=f"e.g. exec{tuple(strings[0].split())!r}, or exec('sh', '-c', {strings[0]!r})")
    return strings
