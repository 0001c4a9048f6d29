"""An in-memory backend: no VM, no processes. mvm's answer to httpx's ``MockTransport``.

:class:`FakeBackend` "starts" a machine by serving the guest agent's protocol on the VM's
control sockets from a thread, so everything above the seam (the orchestration, the
registry, the real agent client, ``down``'s ladder) runs unchanged in unit tests, in
milliseconds. Knobs make each backend step fail on demand.

It proves the orchestration's logic, never that a VM works: the end-to-end tests boot QEMU.
"""

from __future__ import annotations

import base64
import dataclasses
import itertools
import json
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import _unixsock
from ..errors import BootError, PortInUse, RestoreFailed, StopFailed
from ..guest import protocol
from ..names import host_arch
from ..paths import VMFiles
from .base import (
    HOTPLUG_DISK,
    HOTPLUG_FORWARD,
    SAVE_RESTORE,
    VOLUMES,
    Arch,
    Diagnosis,
    Disk,
    LaunchSpec,
    MachineRef,
    MachineRequest,
    MachineUsage,
    PortForward,
    Preflight,
    ProbeKernel,
    Saved,
)

#: Fake pids start above the kernel's pid_max (4194304), so no real process ever matches.
_PIDS = itertools.count(5_000_000)
#: Host ports the fake "picks" for ``-p GUEST`` (never bound: nothing listens).
_PORTS = itertools.count(40_000)


@dataclass
class FakeMachine:
    spec: LaunchSpec
    ref: MachineRef
    guest: FakeGuest
    forwards: list[PortForward] = field(default_factory=list)
    running: bool = True
    paused: bool = False
    paused_as: str = "paused"  #: run_state while paused (``io-error``: as QEMU on a full host disk)
    hotplugged: list[tuple[int, Disk]] = field(default_factory=list)


class FakeGuest:
    """Answers ``ping``, ``status``, ``exec`` (echoes its argv) and ``shutdown`` on every
    control port, as the guest agent would."""

    def __init__(self, files: VMFiles, spec: LaunchSpec, *, answers: bool, on_shutdown: Any,
                 status: dict[str, Any]) -> None:
        self.files = files
        self.spec = spec
        self.answers = answers
        self.status = status
        self.on_shutdown = on_shutdown
        self.requests: list[dict[str, Any]] = []
        self.identity: dict[str, Any] | None = None  # the last configure/refresh
        self._listeners: list[socket.socket] = []
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._inodes: dict[int, int] = {}

    def start(self) -> None:
        for i in range(protocol.CONTROL_PORTS):
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            with _unixsock.short_path(self.files.control(i)) as path:
                listener.bind(path)
            self._inodes[i] = self.files.control(i).stat().st_ino
            listener.listen()
            listener.settimeout(0.05)
            self._listeners.append(listener)
            thread = threading.Thread(target=self._serve, args=(listener,), daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join()
        for listener in self._listeners:
            listener.close()
        self.release_paths()

    def release_paths(self) -> None:
        """Remove this guest's sockets (only its own: check the inode). A guest powering itself
        off does this before its machine counts as gone, and stops its threads afterwards: a
        new VM of the same name may bind the same paths as soon as `down` returns."""
        for i, inode in self._inodes.items():
            path = self.files.control(i)
            try:
                if path.stat().st_ino == inode:
                    path.unlink()
            except FileNotFoundError:
                pass
        self._inodes.clear()

    def _serve(self, listener: socket.socket) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn:
                conn.settimeout(0.05)
                buf = protocol.LineBuffer()
                while not self._stop.is_set():
                    try:
                        data = conn.recv(65536)
                    except TimeoutError:
                        continue
                    except OSError:
                        break
                    if not data:
                        break
                    for line in buf.feed(data):
                        self._answer(conn, protocol.decode(line))

    def _answer(self, conn: socket.socket, msg: dict[str, Any]) -> None:
        self.requests.append(msg)
        if not self.answers:
            return
        rid, op = msg.get("id"), msg.get("op")

        def send(reply: dict[str, Any]) -> None:
            conn.sendall(protocol.encode({"id": rid, **reply}))

        if op == "ping":
            send({"ok": True, "protocol": protocol.PROTOCOL_VERSION})
        elif op == "status":
            send({"ok": True, **self.status})
        elif op == "exec":
            data = base64.b64encode(" ".join(msg.get("argv") or []).encode() + b"\n").decode()
            send({"event": "stdout", "data": data})
            send({"ok": True, "exit": 0})
        elif op == "shutdown":
            send({"ok": True})
            self.on_shutdown()
        elif op in ("configure", "refresh"):
            self.identity = msg
            send({"ok": True})
        elif op in protocol.STREAM_INPUT:
            pass
        else:
            send({"ok": False, "error": f"unknown op {op!r}"})


class FakeBackend:
    """Machines that exist only in this object. Knobs:

    - ``taken_ports``: host ports ``check_ports`` refuses;
    - ``fail_preflight`` / ``fail_start``: raise this error from that step;
    - ``agent_answers=False``: the guest never answers (``up`` times out);
    - ``unkillable=True``: the machine survives shutdown and ``stop`` (``StopFailed``);
    - ``status``: what the guest agent reports (services and health checks).
    """

    name = "fake"

    def __init__(self, *, taken_ports: Sequence[int] = (), fail_preflight: Exception | None = None,
                 fail_start: Exception | None = None, agent_answers: bool = True, unkillable: bool = False) -> None:
        self.taken_ports = set(taken_ports)
        self.fail_preflight = fail_preflight
        self.fail_start = fail_start
        self.agent_answers = agent_answers
        self.unkillable = unkillable
        self.machines: dict[int, FakeMachine] = {}
        self.status: dict[str, Any] = {
            "uptime": 1.0,
            "services": {"svc": {"state": "running", "pid": 100, "restarts": 0}},
            "health": {"check": {"state": "healthy", "last_exit": 0, "failures": 0}},
        }

    def capabilities(self) -> frozenset[str]:
        return frozenset({HOTPLUG_FORWARD, VOLUMES, SAVE_RESTORE, HOTPLUG_DISK})

    def diagnose(self, kernel: ProbeKernel | None, probes: Path) -> list[Diagnosis]:
        return [Diagnosis("fake", True, "machines in this process's memory (unit tests)")]

    def machine_version(self, arch: Arch) -> str:
        return f"fake-{arch}"

    def check_ports(self, ports: Sequence[PortForward]) -> None:
        for fwd in ports:
            if fwd.host_port in self.taken_ports:
                raise PortInUse(f"host port {fwd.host_port} is taken (fake)")

    def preflight(self, request: MachineRequest) -> Preflight:
        if self.fail_preflight is not None:
            raise self.fail_preflight
        emulated = None if request.arch == host_arch() else f"{request.arch} guest emulated (fake)"
        return Preflight("tcg", "the fake backend emulates nothing", emulated=emulated)

    def start(self, spec: LaunchSpec, on_started: Callable[[MachineRef], None] | None = None) -> MachineRef:
        if self.fail_start is not None:
            raise self.fail_start
        if not spec.kernel.is_file():
            raise BootError(spec.name, f"no kernel at {spec.kernel}")
        self.check_ports(spec.ports)  # as QEMU's start binds them
        if spec.incoming is not None:  # a restore: the saved file must be one fake save wrote
            try:
                saved = json.loads(spec.incoming.state.read_text())
                assert saved["fake"] is True
            except (OSError, ValueError, KeyError, AssertionError):
                raise RestoreFailed(spec.name, f"cannot restore {spec.incoming.state}") from None
        ref = MachineRef(next(_PIDS), int(time.monotonic()))
        spec.files.console_log.touch()
        spec.files.events_log.touch()
        if spec.memory_file is not None and spec.memory_file.shared:
            with open(spec.memory_file.path, "r+b") as ram:  # guest RAM in a file, as QEMU sizes it
                ram.truncate(spec.memory * 1024 * 1024)
        guest = FakeGuest(spec.files, spec, answers=self.agent_answers,
                          on_shutdown=lambda: self._power_off(ref.pid), status=self.status)
        guest.start()
        ports = [dataclasses.replace(f, host_port=next(_PORTS)) if f.host_port == 0 else f for f in spec.ports]
        self.machines[ref.pid] = FakeMachine(spec, ref, guest, forwards=ports)
        if on_started is not None:
            on_started(ref)
        return ref

    def _power_off(self, pid: int) -> None:
        machine = self.machines[pid]
        if self.unkillable:
            return
        with open(machine.spec.files.events_log, "a") as f:
            f.write('{"kind":"init","msg":"powering off"}\n')
        machine.guest.release_paths()
        machine.running = False
        threading.Thread(target=machine.guest.stop, daemon=True).start()  # not from its own thread

    def alive(self, machine: MachineRef) -> bool:
        found = self.machines.get(machine.pid)
        return found is not None and found.running and found.ref == machine

    def save(self, files: VMFiles, machine: MachineRef, state: Path) -> Saved:
        found = self.machines[machine.pid]
        found.paused = True
        state.write_text(json.dumps({"fake": True, "name": found.spec.name}))
        return Saved(bytes=state.stat().st_size, seconds=0.0)

    def resume(self, files: VMFiles, machine: MachineRef) -> None:
        found = self.machines[machine.pid]
        found.paused, found.guest.answers = False, self.agent_answers

    def run_state(self, files: VMFiles, machine: MachineRef) -> str:
        found = self.machines[machine.pid]
        return found.paused_as if found.paused else "running"

    def attach_disk(self, files: VMFiles, machine: MachineRef, disk: Disk, slot: int) -> None:
        self.machines[machine.pid].hotplugged.append((slot, disk))

    def usage(self, machine: MachineRef) -> MachineUsage:
        return MachineUsage(cpu_seconds=0.0, memory_bytes=64 * 1024 * 1024)

    def strays(self, files: VMFiles) -> list[MachineRef]:
        return [m.ref for m in self.machines.values() if m.running and m.spec.files.root == files.root]

    def stop(self, files: VMFiles, machine: MachineRef, timeout: float) -> str:
        found = self.machines.get(machine.pid)
        if found is None or not found.running:
            return "gone"
        if self.unkillable:
            raise StopFailed(files.root.name, f"fake machine {machine.pid} will not die")
        found.running = False
        found.guest.stop()
        return "quit"

    def forward(self, files: VMFiles, machine: MachineRef, forward: PortForward) -> PortForward:
        self.check_ports([forward])
        if forward.host_port == 0:
            forward = dataclasses.replace(forward, host_port=next(_PORTS))
        self.machines[machine.pid].forwards.append(forward)
        return forward

    def unforward(self, files: VMFiles, machine: MachineRef, forward: PortForward) -> None:
        self.machines[machine.pid].forwards.remove(forward)

    def forwards(self, files: VMFiles, machine: MachineRef) -> list[PortForward]:
        return list(self.machines[machine.pid].forwards)

    def pause(self, machine: MachineRef, why: str) -> None:
        """QEMU stops the machine's CPUs by itself (``io-error``: a disk write failed on a full
        host disk): its guest answers nothing until it runs again."""
        found = self.machines[machine.pid]
        found.paused, found.paused_as, found.guest.answers = True, why, False

    def crash(self, machine: MachineRef) -> None:
        """The machine dies without a word (as QEMU killed by the OOM killer would)."""
        found = self.machines[machine.pid]
        found.running = False
        found.guest.stop()

