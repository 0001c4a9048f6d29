"""The QEMU backend: ``-M microvm`` with virtio-pci devices, KVM when it works, else TCG.

Choices, each measured (see docs/design-notes.md and DESIGN.md):
- microvm with ``pcie=on``: the fastest machine type, and PCI lifts microvm's limit of
  eight virtio-mmio devices (root, config, net, serial and many volumes).
- the kernel is an uncompressed ELF booted via PVH; ``tsc_early_khz`` stops 1-in-3 hangs
  in TSC calibration on microvm; ``+rdrand`` stops Python blocking on entropy.
- the root drive is ``snapshot=on``: each boot writes to a throwaway overlay and the cached
  image is never modified. Only the root drive: volumes keep their writes.
- QEMU runs with the VM dir as cwd and relative socket/log names (short socket paths).
- ``-sandbox on``: seccomp filtering, so a guest escape into QEMU has little to use.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import socket
import subprocess
import time
from pathlib import Path

from .. import _proc
from .._proc import DEFAULT_RUNNER, Runner, require_tool
from ..errors import BootError, PortInUse, UsageError, VMError, VolumeError
from ..guest import protocol
from ..paths import VMFiles
from .base import LaunchSpec, PortForward
from .qmp import QMP

log = logging.getLogger(__name__)

QEMU = "qemu-system-x86_64"
START_TIMEOUT = 10.0
HOSTFWD_ERROR = re.compile(r"could not|unrecognized|invalid|error|failed", re.I)


@functools.cache
def tsc_khz() -> int | None:
    """The host TSC rate; under TCG the guest TSC runs at it."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("cpu MHz"):
                    return int(float(line.split(":")[1]) * 1000)
    except (OSError, ValueError):
        pass
    return None


def kernel_cmdline(spec: LaunchSpec) -> str:
    args = [
        "console=ttyS0",
        "root=/dev/vda",
        "rw",
        "panic=-1",
        "quiet",
        "cryptomgr.notests",
        f"init={spec.init}",
    ]
    khz = tsc_khz()
    if khz:
        args.append(f"tsc_early_khz={khz}")
    return " ".join(args)


def qemu_escape(path: Path | str) -> str:
    """QEMU option values are comma-separated; a literal comma is written twice."""
    return str(path).replace(",", ",,")


def hostfwd_rule(fwd: PortForward) -> str:
    return f"{fwd.proto}:{fwd.host_ip}:{fwd.host_port}-:{fwd.guest_port}"


def build_argv(spec: LaunchSpec, qemu: str = QEMU) -> list[str]:
    """The full QEMU command line. Paths are relative to the VM dir (QEMU's cwd)."""
    cpu = "host" if spec.accel == "kvm" else "qemu64,+rdrand"
    accel = "kvm" if spec.accel == "kvm" else "tcg,tb-size=64"
    argv = [
        qemu,
        "-name", f"mvm-{spec.name},process=mvm-{spec.name}",
        "-M", "microvm,pcie=on,rtc=on",
        "-accel", accel,
        "-cpu", cpu,
        "-smp", str(spec.cpus),
        "-m", f"{spec.memory}M",
        "-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
        "-sandbox", "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
        "-kernel", str(spec.kernel),
        "-append", kernel_cmdline(spec),
        "-chardev", "file,id=con,path=console.log",
        "-serial", "chardev:con",
        "-qmp", "unix:qmp.sock,server=on,wait=off",
    ]
    if spec.initrd:
        argv += ["-initrd", str(spec.initrd)]
    drives = [(spec.rootfs, "root", False, True)]
    if spec.config_disk:
        drives.append((spec.config_disk, protocol.CONFIG_DISK_SERIAL, True, False))
    drives += [(d.path, d.serial, d.readonly, False) for d in spec.disks]
    for i, (path, serial, readonly, snapshot) in enumerate(drives):
        opts = f"file={qemu_escape(path)},format=raw,if=none,id=d{i},cache=writeback,discard=unmap"
        if snapshot:
            opts += ",snapshot=on"
        if readonly:
            opts += ",readonly=on"
        argv += ["-drive", opts, "-device", f"virtio-blk-pci,drive=d{i},serial={serial}"]
    netdev = "user,id=n0"
    for fwd in spec.ports:
        netdev += f",hostfwd={hostfwd_rule(fwd)}"
    argv += ["-netdev", netdev, "-device", "virtio-net-pci,netdev=n0"]
    argv += [
        "-device", "virtio-serial-pci,id=vs0,max_ports=16",
        "-chardev", "file,id=ev,path=events.log",
        "-device", f"virtserialport,bus=vs0.0,chardev=ev,name={protocol.EVENT_PORT}",
    ]
    for i in range(protocol.CONTROL_PORTS):
        argv += [
            "-chardev", f"socket,id=c{i},path=c{i}.sock,server=on,wait=off",
            "-device", f"virtserialport,bus=vs0.0,chardev=c{i},name={protocol.CONTROL_PORT_PREFIX}{i}",
        ]
    if spec.shares:
        # vhost-user (virtiofsd) needs the guest's memory in a shareable memfd
        machine = argv.index("-M") + 1
        argv[machine] += ",memory-backend=mem"
        argv += ["-object", f"memory-backend-memfd,id=mem,size={spec.memory}M,share=on"]
        for i, share in enumerate(spec.shares):
            argv += ["-chardev", f"socket,id=fs{i},path={share_socket(i)}",
                     "-device", f"vhost-user-fs-pci,chardev=fs{i},tag={share.tag}"]
    return argv


def share_socket(index: int) -> str:
    return f"fs{index}.sock"


def find_virtiofsd() -> str:
    """virtiofsd is not on PATH on Debian (qemu-system-common puts it in /usr/lib/qemu)."""
    for candidate in ("/usr/libexec/virtiofsd", "/usr/lib/qemu/virtiofsd"):
        if os.access(candidate, os.X_OK):
            return candidate
    return require_tool("virtiofsd")


def check_ports_free(ports: list[PortForward]) -> None:
    """Fail before starting anything if a host port is taken (QEMU's own error is vague)."""
    seen: set[tuple[str, int, str]] = set()
    for fwd in ports:
        key = (fwd.host_ip, fwd.host_port, fwd.proto)
        if key in seen:
            raise PortInUse(f"host port {fwd.host_port}/{fwd.proto} is given twice",
                            hint="use each host port once")
        seen.add(key)
        kind = socket.SOCK_STREAM if fwd.proto == "tcp" else socket.SOCK_DGRAM
        with socket.socket(socket.AF_INET, kind) as s:
            # QEMU's slirp binds with SO_REUSEADDR, so a TIME_WAIT left by the last VM on this
            # port (after `down`) must not count as "in use" here either.
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((fwd.host_ip, fwd.host_port))
            except OSError as exc:
                raise PortInUse(
                    f"host port {fwd.host_ip}:{fwd.host_port}/{fwd.proto} is not available: {exc.strerror}",
                    hint="pick another host port, e.g. -p 18080:" + str(fwd.guest_port)
                    + " (see what holds it: ss -ltnp)",
                ) from None


def tail(path: Path, lines: int = 30) -> str:
    try:
        data = path.read_bytes()[-16384:]
    except OSError:
        return ""
    return "\n".join(data.decode(errors="replace").splitlines()[-lines:])


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

    def capabilities(self) -> set[str]:
        return {"hostfwd", "hotplug-forward", "virtio-serial", "snapshot-root", "volumes"}

    def start(self, spec: LaunchSpec) -> int:
        qemu = require_tool(QEMU)
        # Ports were checked by `up` before the build; one taken since then makes QEMU fail,
        # and _raise_start_failure turns that into the same PortInUse.
        argv = build_argv(spec, qemu)
        files = spec.files
        helpers = self._start_shares(spec)
        try:
            fd = os.open(files.qemu_log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            with os.fdopen(fd, "ab") as log_file:
                proc = self.runner.spawn(argv, stdout=log_file, cwd=files.root, pass_fds=spec.hold_fds)
            try:
                self._wait_started(proc, files, spec)
            except BaseException:
                kill_all([proc])
                raise
        except BaseException:
            kill_all(helpers)
            raise
        return proc.pid

    def _start_shares(self, spec: LaunchSpec) -> list[subprocess.Popen[bytes]]:
        """One virtiofsd per share. Each serves one QEMU connection and exits when QEMU does."""
        helpers: list[subprocess.Popen[bytes]] = []
        if not spec.shares:
            return helpers
        for share in spec.shares:
            if "," in str(share.path):
                raise UsageError(f"cannot share {share.path}: virtiofsd options cannot hold a comma",
                                 hint="move or link the directory to a path without commas")
        virtiofsd = find_virtiofsd()
        try:
            for i, share in enumerate(spec.shares):
                sock = spec.files.root / share_socket(i)
                log_path = spec.files.root / f"virtiofsd{i}.log"
                with open(log_path, "ab") as log_file:
                    helper = self.runner.spawn(
                        [virtiofsd, f"--socket-path={share_socket(i)}", "-o", f"source={share.path}",
                         "-o", "cache=auto"],
                        stdout=log_file, cwd=spec.files.root,
                    )
                helpers.append(helper)
                deadline = time.monotonic() + START_TIMEOUT
                while not sock.exists():
                    if helper.poll() is not None or time.monotonic() > deadline:
                        raise BootError(spec.name, f"virtiofsd could not share {share.path}",
                                        hint="virtiofsd needs root (it sandboxes itself in namespaces)",
                                        output=tail(log_path))
                    time.sleep(0.01)
        except BaseException:
            kill_all(helpers)
            raise
        return helpers

    def _wait_started(self, proc: subprocess.Popen[bytes], files: VMFiles, spec: LaunchSpec) -> None:
        """Return once QEMU listens on its sockets; raise with its log if it died."""
        deadline = time.monotonic() + START_TIMEOUT
        wanted = [files.qmp] + [files.control(i) for i in range(protocol.CONTROL_PORTS)]
        while time.monotonic() < deadline:
            code = proc.poll()
            if code is not None:
                self._raise_start_failure(spec, files, code)
            if all(p.exists() for p in wanted):
                self._wait_initialised(proc, files, spec, deadline)
                return
            time.sleep(0.005)
        raise BootError(spec.name, f"QEMU did not open its sockets within {START_TIMEOUT:.0f}s",
                        output=tail(files.qemu_log))

    def _wait_initialised(self, proc: subprocess.Popen[bytes], files: VMFiles, spec: LaunchSpec,
                          deadline: float) -> None:
        """QEMU creates its sockets (and greets on QMP, from its monitor thread) before it opens
        the drives; it answers a QMP command only from its main loop, once the machine is set
        up. Waiting for that answer turns a late start-up failure (a volume image locked by
        another QEMU) into QEMU's own error here, instead of an agent timeout later."""
        try:
            with QMP(files.qmp, spec.name, timeout=max(0.5, deadline - time.monotonic())) as qmp:
                qmp.command("query-status")
            return
        except VMError:  # no answer (yet): did QEMU die? Otherwise the agent wait decides.
            pass
        try:
            code = proc.wait(timeout=1.0)
        except subprocess.TimeoutExpired:
            return
        self._raise_start_failure(spec, files, code)

    def _raise_start_failure(self, spec: LaunchSpec, files: VMFiles, code: int) -> None:
        text = tail(files.qemu_log)
        match = re.search(r"Could not set up host forwarding rule '([^']+)'", text)
        if match:
            raise PortInUse(
                f"host port in {match.group(1)} could not be bound (taken by another process?)",
                hint="pick another host port with -p",
            )
        if 'Failed to get "write" lock' in text:
            raise VolumeError(
                "a volume image is in use by another process (QEMU could not lock it for writing)",
                hint="another VM, maybe under another MVM_HOME, has it attached: stop that VM first",
                output=text,
            )
        raise BootError(spec.name, f"QEMU exited during start-up (exit code {code})", output=text)

    def stop(self, files: VMFiles, pid: int | None, timeout: float, started: int | None = None) -> str:
        """QMP ``quit``, then SIGTERM, then SIGKILL. Unsynced guest data is lost at this rung."""
        if not pid or not _proc.alive(pid, started):
            return "gone"
        try:
            with QMP(files.qmp, files.root.name, timeout=2.0) as qmp:
                qmp.command("quit")
        except VMError as exc:
            log.debug("QMP quit failed: %s", exc)
        if _proc.wait_gone(pid, started, timeout):
            return "quit"
        return _proc.terminate(pid, started, timeout=3.0)

    def add_forward(self, files: VMFiles, forward: PortForward) -> None:
        check_ports_free([forward])
        with QMP(files.qmp, files.root.name) as qmp:
            reply = qmp.hmp(f"hostfwd_add n0 {hostfwd_rule(forward)}").strip()
        if reply and HOSTFWD_ERROR.search(reply):
            raise PortInUse(f"QEMU refused the forward {forward}: {reply}",
                            hint="pick another host port")
