"""The QEMU backend: KVM when a probe proves it boots, else TCG (see :mod:`.accel`).

The command line is built in :mod:`.qemu_argv`. This module runs it: start-up that waits
until QEMU really runs the machine (so a locked volume or a taken port fails here, with
QEMU's own words), liveness by pid and start time, forwards over QMP, and the stop ladder
(QMP ``quit``, SIGTERM, SIGKILL) that raises when the process survives.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from .. import _pids
from .._proc import DEFAULT_RUNNER, INSTALL_HINTS, Runner, find_tool, require_tool, signals_deferred, tail_file
from ..errors import BootError, PortInUse, RestoreFailed, StopFailed, VMError, VolumeError
from ..paths import VMFiles
from . import accel
from .base import (
    HOTPLUG_DISK,
    HOTPLUG_FORWARD,
    SAVE_RESTORE,
    SHARES,
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
from .host_ports import check_ports_free
from .qemu_argv import (
    build_argv,
    disk_node,
    host_profile,
    hostfwd_rule,
    hotplug_node,
    hotplug_port,
    profile,
)
from .qemu_handoff import Handoff
from .qemu_shares import start_shares
from .qmp import QMP

START_TIMEOUT = 10.0
RESTORE_TIMEOUT = 30.0
#: A save that writes nothing for this long is stuck (a big guest's RAM may take minutes in all).
SAVE_STALL = 60.0
HOSTFWD_ERROR = re.compile(r"could not|unrecognized|invalid|error|failed", re.I)


def kill_all(procs: list[subprocess.Popen[bytes]]) -> None:
    """Undo for a failed start: kill and reap what was started."""
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


class QemuBackend:
    name = "qemu"

    def __init__(self, runner: Runner = DEFAULT_RUNNER) -> None:
        self.runner = runner

    def capabilities(self) -> frozenset[str]:
        return frozenset({HOTPLUG_FORWARD, VOLUMES, SHARES, SAVE_RESTORE, HOTPLUG_DISK})

    def diagnose(self, kernel: ProbeKernel | None, probes: Path) -> list[Diagnosis]:
        # the host's own architecture's QEMU (x86_64's where mvm boots no guest of the host's)
        qemu = host_profile().binary
        if not find_tool(qemu):
            return [Diagnosis(d, False, "QEMU is not installed", INSTALL_HINTS[qemu]) for d in ("qemu-tcg", "qemu-kvm")]
        tcg = Diagnosis("qemu-tcg", True, "software emulation always works")
        if not os.path.exists("/dev/kvm"):
            return [tcg, Diagnosis("qemu-kvm", False, "/dev/kvm does not exist (no hardware virtualisation here)",
                                   "enable VT-x/AMD-V, or load kvm_intel/kvm_amd; TCG works meanwhile")]
        if kernel is None:
            return [tcg, Diagnosis("qemu-kvm", None, "/dev/kvm exists; not probed yet (no kernel cached)",
                                   "run `mvmctl build` once; the first `up` probes KVM")]
        ok, reason = accel.kvm_verdict(kernel.vmlinux, kernel.initrd, probes, self.runner, arch=kernel.arch)
        return [tcg, Diagnosis("qemu-kvm", ok, reason, None if ok else "nothing to fix for mvm: TCG is used "
                               "automatically")]

    def machine_version(self, arch: Arch) -> str:
        prof = profile(arch)
        qemu = require_tool(prof.binary)
        st = os.stat(qemu)
        return f"{qemu}:{st.st_size}:{st.st_mtime_ns}:{prof.machine}:{prof.cpu}:{prof.cmdline}" + (
            f":{prof.tcg_cmdline}:{prof.kvm_machine}:{prof.tb_size}" if prof.arch != "x86_64" else "")

    def check_ports(self, ports: Sequence[PortForward]) -> None:
        check_ports_free(ports)

    def preflight(self, request: MachineRequest) -> Preflight:
        require_tool(profile(request.arch).binary)
        return accel.choose(request.accel, request.kernel, request.initrd, request.probe_cache, self.runner,
                            arch=request.arch)

    # -- start ----------------------------------------------------------------------------

    def start(self, spec: LaunchSpec, on_started: Callable[[MachineRef], None] | None = None) -> MachineRef:
        qemu = require_tool(profile(spec.arch).binary)
        files = spec.files
        # Ports were checked by `up` before the build; one taken since then makes QEMU fail,
        # and _raise_start_failure turns that into the same PortInUse.
        with ExitStack() as undo, Handoff() as handoff:
            helpers: list[subprocess.Popen[bytes]] = []
            undo.callback(kill_all, helpers)
            start_shares(spec, self.runner, helpers)
            argv = build_argv(spec, handoff, qemu)
            with signals_deferred():  # a started child always has its undo
                shim = self._start_log_shim(spec, handoff)
                undo.callback(kill_all, [shim])
            state_fd = os.open(spec.incoming.state, os.O_RDONLY | os.O_CLOEXEC) if spec.incoming else None
            if state_fd is not None:
                undo.callback(os.close, state_fd)
            fds = [*spec.hold_fds, *handoff.fds, *([state_fd] if state_fd is not None else [])]
            fd = os.open(files.qemu_log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            with os.fdopen(fd, "ab") as log_file, signals_deferred():
                proc = self.runner.spawn(argv, stdout=log_file, cwd=files.root, pass_fds=fds, user=spec.run_as)
                undo.callback(kill_all, [proc])
            handoff.close()  # QEMU has them; the shim sees end-of-file when QEMU ends
            self._wait_started(proc, files, spec)
            if spec.incoming is not None:
                assert state_fd is not None
                self._restore(proc, files, spec, state_fd)
            machine = MachineRef(proc.pid, _pids.start_time(proc.pid))
            with signals_deferred():  # the caller's undo takes over from this one
                if on_started is not None:
                    on_started(machine)
                undo.pop_all()
        if state_fd is not None:
            os.close(state_fd)
        for child in (proc, shim, *helpers):  # they run on after this call; reaped by pid
            _pids.detach(child)
        return machine

    def _restore(self, proc: subprocess.Popen[bytes], files: VMFiles, spec: LaunchSpec, state_fd: int) -> None:
        """Feed the saved machine to QEMU (waiting in ``-incoming defer``), then run it."""
        assert spec.incoming is not None
        deadline = time.monotonic() + RESTORE_TIMEOUT
        with QMP(files.qmp, spec.name, timeout=RESTORE_TIMEOUT) as qmp:
            qmp.command("migrate-set-capabilities", capabilities=[
                {"capability": "x-ignore-shared", "state": spec.incoming.ignore_shared}])
            qmp.command("migrate-incoming", uri=f"fd:{state_fd}")
            while True:
                try:
                    status = qmp.command("query-migrate").get("status")
                except VMError:  # QEMU ended (a damaged state): its log says why
                    if proc.poll() is None:
                        raise
                    status = "QEMU exited"
                if status == "completed":
                    break
                if status == "failed" or proc.poll() is not None or time.monotonic() > deadline:
                    raise RestoreFailed(spec.name, "QEMU could not restore the saved machine "
                                        f"({status or 'no status'})", output=tail_file(files.qemu_log))
                time.sleep(0.002)
            qmp.command("cont")  # it was paused when it was saved
            # Forwards open only now: a client that connected while the machine was paused
            # would wait for slirp's retransmission (~0.5 s) instead of being refused at once.
            for fwd in spec.ports:
                reply = qmp.hmp(f"hostfwd_add n0 {hostfwd_rule(fwd)}").strip()
                if reply and HOSTFWD_ERROR.search(reply):
                    raise _port_taken(str(fwd), reply)

    def save(self, files: VMFiles, machine: MachineRef, state: Path) -> Saved:
        """Pause the machine and write its state to ``state``. It stays paused once saved (the
        caller stops or resumes it); if saving fails or is interrupted, it runs on as before
        and no partial ``state`` is left."""
        started = time.monotonic()
        fd = os.open(state, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            with QMP(files.qmp, files.root.name, timeout=60.0) as qmp:
                shared = any(b.get("share") for b in _memory_backends(qmp))
                if qmp.command("query-status").get("status") == "postmigrate":
                    qmp.command("cont")  # a save cut short (SIGKILL) left it so: QEMU migrates it no more
                qmp.command("stop")
                try:
                    qmp.command("migrate-set-capabilities", capabilities=[
                        {"capability": "x-ignore-shared", "state": shared}])
                    qmp.send_fd(fd, "mvm-save")
                    qmp.command("migrate", uri="fd:mvm-save")
                    status = _migration_end(qmp, SAVE_STALL)
                    if status != "completed":
                        raise VMError(files.root.name, f"saving the machine failed ({status})",
                                      output=tail_file(files.qemu_log))
                except BaseException:
                    _cancel_and_continue(qmp)
                    raise
        except BaseException:
            state.unlink(missing_ok=True)
            raise
        finally:
            os.close(fd)
        return Saved(bytes=state.stat().st_size, seconds=time.monotonic() - started)

    def resume(self, files: VMFiles, machine: MachineRef) -> None:
        with QMP(files.qmp, files.root.name) as qmp:
            qmp.command("cont")

    def run_state(self, files: VMFiles, machine: MachineRef) -> str:
        with QMP(files.qmp, files.root.name, timeout=5.0) as qmp:
            return str(qmp.command("query-status").get("status") or "unknown")

    def attach_disk(self, files: VMFiles, machine: MachineRef, disk: Disk, slot: int) -> None:
        node = hotplug_node(slot)
        with QMP(files.qmp, files.root.name, timeout=10.0) as qmp:
            with Handoff() as handoff:
                doc = disk_node(disk, node, handoff)
                fdset = 100 + slot  # fdsets 1.. are the command line's
                qmp.add_fd(handoff.fds[0], fdset)
                doc["file"]["filename"] = f"/dev/fdset/{fdset}"
                qmp.command("blockdev-add", **doc)
            qmp.command("device_add", driver="virtio-blk-pci", id=f"disk-{node}", drive=node,
                        bus=hotplug_port(slot), serial=disk.serial)

    def _start_log_shim(self, spec: LaunchSpec, handoff: Handoff) -> subprocess.Popen[bytes]:
        """The VM's log shim (mvm._logshim): it holds the other ends of QEMU's console and
        event streams and keeps them on disk within ``spec.log_limit``. It ends when QEMU
        does (end-of-file on both), or at once if QEMU never starts."""
        files = spec.files
        peers = [handoff.peers["console"], handoff.peers["events"]]
        fd = os.open(files.root / "logshim.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        with os.fdopen(fd, "ab") as log_file:
            return self.runner.spawn([sys.executable, "-m", "mvm._logshim", str(files.root), str(spec.log_limit),
                                      *map(str, peers)], stdout=log_file, cwd=files.root, pass_fds=peers)

    def _wait_started(self, proc: subprocess.Popen[bytes], files: VMFiles, spec: LaunchSpec) -> None:
        """Return once QEMU answers on its monitor; raise with its log if it died first.

        QEMU greets on QMP from its monitor thread before it opens the drives, and answers a
        command only from its main loop, once the machine is set up: waiting for the answer
        turns a late start-up failure (a volume image locked by another QEMU) into QEMU's own
        error here, instead of an agent timeout later. A QEMU that is alive but slower than
        this (a loaded host) is left to the agent wait."""
        deadline = time.monotonic() + START_TIMEOUT
        while (left := deadline - time.monotonic()) > 0:
            code = proc.poll()
            if code is not None:
                self._raise_start_failure(spec, files, code)
            try:
                with QMP(files.qmp, spec.name, timeout=min(left, 2.0)) as qmp:
                    qmp.command("query-status")
                return
            except VMError:  # not answering yet, or it died: the poll above tells
                time.sleep(0.01)
        code = proc.poll()
        if code is not None:
            self._raise_start_failure(spec, files, code)

    def _raise_start_failure(self, spec: LaunchSpec, files: VMFiles, code: int) -> None:
        text = tail_file(files.qemu_log)
        match = re.search(r"Could not set up host forwarding rule '([^']+)'", text)
        if match:
            raise _port_taken(match.group(1))
        if 'Failed to get "write" lock' in text:
            raise VolumeError(
                "a volume image is in use by another process (QEMU could not lock it for writing)",
                hint="another VM, maybe under another MVM_HOME, has it attached: stop that VM first",
                output=text,
            )
        raise BootError(spec.name, f"QEMU exited during start-up (exit code {code})", output=text)

    # -- a running machine ---------------------------------------------------------------

    def alive(self, machine: MachineRef) -> bool:
        return _pids.alive(machine.pid, machine.start_time)

    def usage(self, machine: MachineRef) -> MachineUsage:
        return MachineUsage(*_pids.usage(machine.pid))

    def strays(self, files: VMFiles) -> list[MachineRef]:
        """QEMU runs with its VM dir as cwd, which finds it even without a record. Only QEMU: not
        a helper starting there (the log shim, virtiofsd), nor a user's shell in the dir."""
        pids = _pids.pids_with_cwd(files.root)
        return [MachineRef(p, _pids.start_time(p)) for p in pids if _pids.program(p).startswith("qemu-system")]

    def stop(self, files: VMFiles, machine: MachineRef, timeout: float) -> str:
        """QMP ``quit``, then SIGTERM, then SIGKILL. Unsynced guest data is lost at this rung."""
        pid, started = machine.pid, machine.start_time
        if not _pids.alive(pid, started):
            return "gone"
        try:
            with QMP(files.qmp, files.root.name, timeout=2.0) as qmp:
                qmp.command("quit")
        except VMError:
            pass  # no monitor (or no right to it): the signals decide
        if _pids.wait_gone(pid, started, timeout):
            return "quit"
        try:
            return _pids.terminate(pid, started, timeout=3.0)
        except _pids.StillRunning as exc:
            raise StopFailed(files.root.name, f"QEMU (pid {pid}) of VM {files.root.name!r} is still running: {exc}",
                             hint=f"stop it as a user allowed to (e.g. `sudo kill {pid}`), then "
                             f"`mvmctl down {files.root.name}` again") from None

    def forward(self, files: VMFiles, machine: MachineRef, forward: PortForward) -> PortForward:
        check_ports_free([forward])
        before = set(self.forwards(files, machine)) if forward.host_port == 0 else set()
        with QMP(files.qmp, files.root.name) as qmp:
            reply = qmp.hmp(f"hostfwd_add n0 {hostfwd_rule(forward)}").strip()
        if reply and HOSTFWD_ERROR.search(reply):
            raise PortInUse(f"QEMU refused the forward {forward}: {reply}",
                            hint="pick another host port")
        if forward.host_port:
            return forward
        added = [f for f in self.forwards(files, machine) if f not in before and f.guest_port == forward.guest_port
                 and f.proto == forward.proto]
        return added[0] if added else forward

    def unforward(self, files: VMFiles, machine: MachineRef, forward: PortForward) -> None:
        with QMP(files.qmp, files.root.name) as qmp:
            reply = qmp.hmp(f"hostfwd_remove n0 {forward.proto}:{forward.host_ip}:{forward.host_port}").strip()
        if "removed" not in reply:
            raise VMError(files.root.name, f"QEMU could not remove the forward {forward}: {reply or 'no answer'}",
                          hint=f"`mvmctl ls` shows the VM's forwards; `mvmctl logs {files.root.name}` what it did")

    def forwards(self, files: VMFiles, machine: MachineRef) -> list[PortForward]:
        with QMP(files.qmp, files.root.name) as qmp:
            return parse_usernet(qmp.hmp("info usernet"))


#: A host forward in ``info usernet``: ``TCP[HOST_FORWARD]  12  127.0.0.1 45637  10.0.2.15  8080 ...``
USERNET_FORWARD = re.compile(r"^\s*(TCP|UDP)\[HOST_FORWARD\]\s+-?\d+\s+(\S+)\s+(\d+)\s+\S+\s+(\d+)", re.M)


def _port_taken(forward: str, detail: str = "") -> PortInUse:
    """A forward (``HOST_IP:PORT->GUEST/PROTO``, or QEMU's rule) whose host port could not be bound."""
    port = re.search(r":(\d+)(?:->|-)", forward)
    which = f"host port {port.group(1)}" if port else "a host port"
    return PortInUse(f"{which} of forward {forward} could not be bound (another process has it?)"
                     + (f": {detail}" if detail else ""),
                     hint="`ss -ltnup` shows who has it; free it, or (for `up`) pick another host port with -p")


def _migration_end(qmp: QMP, stall: float) -> str:
    """Wait for the outgoing migration to end: its final status, or "stalled" once it has
    moved no byte for ``stall`` seconds."""
    moved, since = -1, time.monotonic()
    while (reply := qmp.command("query-migrate")).get("status") not in ("completed", "failed", "cancelled"):
        now = int((reply.get("ram") or {}).get("transferred") or 0)
        if now != moved:
            moved, since = now, time.monotonic()
        elif time.monotonic() - since > stall:
            return "stalled"
        time.sleep(0.005)
    return str(reply.get("status"))


def _cancel_and_continue(qmp: QMP) -> None:
    """After a failed or interrupted save: end the migration, then let the guest run on.
    Best effort, each step on its own: the error that got here is the one to report."""
    with contextlib.suppress(Exception):
        qmp.command("migrate_cancel")
    with contextlib.suppress(Exception):
        _migration_end(qmp, 10.0)
    with contextlib.suppress(Exception):
        qmp.command("cont")


def _memory_backends(qmp: QMP) -> list[dict[str, Any]]:
    """The guest's memory backends (``share`` tells whether the RAM lives in a shared file)."""
    result = qmp.command("query-memdev")
    return result if isinstance(result, list) else []


def parse_usernet(text: str) -> list[PortForward]:
    return [PortForward(host_port=int(hport), guest_port=int(gport), host_ip=ip, proto=proto.lower())
            for proto, ip, hport, gport in USERNET_FORWARD.findall(text)]
