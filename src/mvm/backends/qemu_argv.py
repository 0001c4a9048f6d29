"""The QEMU command line: one machine profile per guest architecture, and the argv for a
:class:`~mvm.backends.base.LaunchSpec`. Pure functions, no processes.

Choices, each measured (DESIGN.md, research/spike.md):
- x86_64: ``-M microvm`` with ``pcie=on``: the fastest machine type, and PCI lifts microvm's
  limit of eight virtio-mmio devices (root, config, net, serial and many volumes).
- the kernel is an uncompressed ELF booted via PVH; ``tsc_early_khz`` stops 1-in-3 hangs
  in TSC calibration on microvm; ``+rdrand`` stops Python blocking on entropy.
- ``tb-size=32``: the TCG translation buffer is each VM's largest private memory; 32 MiB
  halves it with no measurable cost to boot time, and is what lets clones of a template
  share most of their memory (summed PSS of 10 clones ~0.32 of 10 cold boots, measured).
- the root drive is ``snapshot=on``: each boot writes to a throwaway overlay and the cached
  image is never modified. Only the root drive: volumes keep their writes.
- QEMU runs with the VM dir as cwd and relative socket/log names (short socket paths).
- ``-sandbox on``: seccomp filtering, so a guest escape into QEMU has little to use.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

from ..guest import protocol
from .base import Accel, Arch, LaunchSpec, PortForward

SANDBOX = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"


@dataclass(frozen=True)
class Profile:
    """How one guest architecture is emulated: binary, machine, CPU and console."""

    arch: Arch
    binary: str
    machine: str
    console: str
    cpu: dict[Accel, str]
    #: Kernel arguments only this machine needs (host-specific ones are added at launch).
    cmdline: tuple[str, ...] = ()


PROFILES: dict[Arch, Profile] = {
    "x86_64": Profile(
        arch="x86_64",
        binary="qemu-system-x86_64",
        machine="microvm,pcie=on,rtc=on",
        console="ttyS0",
        # +arat: the APIC timer keeps running in idle, so the guest idles without a busy
        # broadcast tick (idle CPU 4.7 % -> ~1 % under TCG, measured)
        cpu={"kvm": "host", "tcg": "qemu64,+rdrand,+arat"},
        # tsc=reliable: under host load the guest otherwise marks the TSC unstable and falls back
        # to a periodic tick for good (and so would every clone of a template saved then)
        cmdline=("tsc=reliable",),
    ),
}
QEMU = PROFILES["x86_64"].binary


def profile(arch: Arch) -> Profile:
    return PROFILES[arch]


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
    prof = profile(spec.arch)
    args = [
        f"console={prof.console}",
        "root=/dev/vda",
        "rw",
        "panic=-1",
        "quiet",
        "cryptomgr.notests",
        f"init={spec.init}",
        *prof.cmdline,
        *spec.kernel_args,
    ]
    khz = tsc_khz() if spec.arch == "x86_64" else None
    if khz:
        args.append(f"tsc_early_khz={khz}")
    return " ".join(args)


def qemu_escape(path: Path | str) -> str:
    """QEMU option values are comma-separated; a literal comma is written twice."""
    return str(path).replace(",", ",,")


def hostfwd_rule(fwd: PortForward) -> str:
    return f"{fwd.proto}:{fwd.host_ip}:{fwd.host_port}-:{fwd.guest_port}"


def share_socket(index: int) -> str:
    return f"fs{index}.sock"


def build_argv(spec: LaunchSpec, qemu: str | None = None) -> list[str]:
    """The full QEMU command line. Paths are relative to the VM dir (QEMU's cwd)."""
    prof = profile(spec.arch)
    accel = "kvm" if spec.accel == "kvm" else "tcg,tb-size=32"
    argv = [
        qemu or prof.binary,
        "-name", f"mvm-{spec.name},process=mvm-{spec.name}",
        "-M", prof.machine,
        "-accel", accel,
        "-cpu", prof.cpu[spec.accel],
        "-smp", str(spec.cpus),
        "-m", f"{spec.memory}M",
        "-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
        "-sandbox", SANDBOX,
        "-kernel", str(spec.kernel),
        "-append", kernel_cmdline(spec),
        # the console and events go to the VM's log shim (mvm._logshim), which caps them
        "-chardev", "socket,id=con,path=con.sock",
        "-serial", "chardev:con",
        "-qmp", "unix:qmp.sock,server=on,wait=off",
    ]
    if spec.initrd:
        argv += ["-initrd", str(spec.initrd)]
    argv += _drives(spec)
    netdev = "user,id=n0" + "".join(f",hostfwd={hostfwd_rule(fwd)}" for fwd in spec.ports)
    argv += ["-netdev", netdev, "-device", "virtio-net-pci,netdev=n0"]
    argv += [
        "-device", "virtio-serial-pci,id=vs0,max_ports=16",
        "-chardev", "socket,id=ev,path=ev.sock",
        "-device", f"virtserialport,bus=vs0.0,chardev=ev,name={protocol.EVENT_PORT}",
    ]
    for i in range(protocol.CONTROL_PORTS):
        argv += [
            "-chardev", f"socket,id=c{i},path=c{i}.sock,server=on,wait=off",
            "-device", f"virtserialport,bus=vs0.0,chardev=c{i},name={protocol.CONTROL_PORT_PREFIX}{i}",
        ]
    if spec.memory_file is not None and spec.shares:
        raise ValueError("shares need the guest RAM in a memfd; a memory file cannot have them")
    if spec.memory_file is not None:
        mode = "on" if spec.memory_file.shared else "off"
        _memory_backend(argv, f"memory-backend-file,id=mem,size={spec.memory}M,"
                        f"mem-path={qemu_escape(spec.memory_file.path)},share={mode}")
    if spec.shares:
        # vhost-user (virtiofsd) needs the guest's memory in a shareable memfd
        _memory_backend(argv, f"memory-backend-memfd,id=mem,size={spec.memory}M,share=on")
        for i, share in enumerate(spec.shares):
            argv += ["-chardev", f"socket,id=fs{i},path={share_socket(i)}",
                     "-device", f"vhost-user-fs-pci,chardev=fs{i},tag={share.tag}"]
    for i in range(spec.hotplug_slots):
        argv += ["-device", f"pcie-root-port,id={hotplug_port(i)},bus=pcie.0,chassis={i + 1},slot={i + 1}"]
    for d in spec.disks:  # in the slots they were hot-plugged into, with the same ids
        if d.slot is not None:
            ro = ",readonly=on" if d.readonly else ""
            argv += ["-drive", f"file={qemu_escape(d.path)},format=raw,if=none,id={hotplug_node(d.slot)}{ro}",
                     "-device", f"virtio-blk-pci,drive={hotplug_node(d.slot)},id=disk-{hotplug_node(d.slot)},"
                     f"bus={hotplug_port(d.slot)},serial={d.serial}"]
    if spec.incoming is not None:
        argv += ["-incoming", "defer"]
    return argv


def hotplug_port(slot: int) -> str:
    return f"rp{slot}"


def hotplug_node(slot: int) -> str:
    return f"hp{slot}"


def _memory_backend(argv: list[str], backend: str) -> None:
    machine = argv.index("-M") + 1
    argv[machine] += ",memory-backend=mem"
    argv += ["-object", backend]


def _drives(spec: LaunchSpec) -> list[str]:
    drives = [(spec.rootfs, "root", False, spec.root_snapshot)]
    if spec.config_disk:
        drives.append((spec.config_disk, protocol.CONFIG_DISK_SERIAL, True, False))
    drives += [(d.path, d.serial, d.readonly, False) for d in spec.disks if d.slot is None]
    argv: list[str] = []
    for i, (path, serial, readonly, snapshot) in enumerate(drives):
        fmt = spec.root_format if i == 0 else "raw"
        opts = f"file={qemu_escape(path)},format={fmt},if=none,id=d{i},cache=writeback,discard=unmap"
        if snapshot:
            opts += ",snapshot=on"
        if readonly:
            opts += ",readonly=on"
        argv += ["-drive", opts, "-device", f"virtio-blk-pci,drive=d{i},serial={serial}"]
    return argv
