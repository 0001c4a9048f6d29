"""The QEMU command line: one machine profile per guest architecture, and the argv for a
:class:`~mvm.backends.base.LaunchSpec`. Pure functions, no processes.

Choices, each measured (DESIGN.md, research/spike.md):
- x86_64: ``-M microvm`` with ``pcie=on``: the fastest machine type, and PCI lifts microvm's
  limit of eight virtio-mmio devices (root, config, net, serial and many volumes).
- the kernel is an uncompressed ELF booted via PVH; ``tsc_early_khz`` stops 1-in-3 hangs
  in TSC calibration on microvm; ``+rdrand`` stops Python blocking on entropy.
- aarch64: ``-M virt`` (direct kernel boot of Debian's arm64 ``Image`` through the device
  tree; no firmware, no ACPI), the same virtio-pci devices, the PL011 console ``ttyAMA0``;
  power-off goes through PSCI and ends QEMU like microvm's. Entropy needs nothing: QEMU puts
  an ``rng-seed`` in the device tree, so the crng is ready at once (the role of ``+rdrand``).
  Under TCG the CPU is ``cortex-a72`` (never ``max``: its emulated pointer authentication
  makes the boot 4.4x slower), and ``kpti=0``: KASLR turns kernel page-table isolation on,
  and switching page tables on every syscall costs 0.45-0.8 s of an emulated boot. TCG
  does not speculate, so there is nothing for KPTI to isolate; under KVM the kernel decides.
  There is no power button (the cloud kernel has no gpio-keys); ``down`` never needs one.
  Under KVM (an aarch64 host) the GIC is the host's: not every GICv3 can pose as a GICv2.
- ``tb-size``: the TCG translation buffer is each VM's largest private memory. A clone
  whose services already run gets 32 MiB, which keeps clones of a template small (10 clones
  71 MB of PSS each; with 64 MiB, 107 MB). A launch whose guest starts its
  services from nothing (``LaunchSpec.starts_services``: a boot, a restore before the
  services started) gets 64: a Python service's start-up overflows 32 MiB, and each flush
  retranslates everything (a restored hello with new ``-e`` values answered after 2.33 s
  with 32, 2.01 s with 48, 1.73 s with 64, medians of 5). An arm64 guest gets 64 always:
  with 32 its boot to the first HTTP 200 took 1.2 s longer.
- a restored machine (``-incoming``) gets no ``-kernel``, ``-initrd`` or ``-append``: its RAM
  is the saved one, and loading the kernel only to be overwritten cost it ~60 ms of start-up
  (a 27 MB arm64 ``Image``). It never resets (``-no-reboot``), so nothing boots without them.
- the root disk is the VM's own qcow2 over the image's raw ``rootfs.ext4`` (and a
  template's qcow2 between them for a clone): the cached image is never written. The chain
  is spelled out in ``-blockdev`` nodes rather than read from qcow2 headers, because QEMU
  opens no path itself: every file arrives as a descriptor (:mod:`.qemu_handoff`).
- QEMU runs with the VM dir as cwd (how mvm finds a VM's QEMU), possibly as a user that
  cannot read it.
- ``-sandbox on``: seccomp filtering, so a guest escape into QEMU has little to use.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..guest import protocol
from ..names import host_arch
from .base import Accel, Arch, Disk, LaunchSpec, PortForward
from .qemu_handoff import Handoff

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
    #: ... and those it needs only under TCG.
    tcg_cmdline: tuple[str, ...] = ()
    #: The machine under KVM, where it must differ (None: ``machine``).
    kvm_machine: str | None = None
    #: TCG's translation buffer (MiB): each VM's largest private memory under TCG; for a
    #: launch that starts the guest's services from nothing, ``tb_size_starting``.
    tb_size: int = 32
    tb_size_starting: int = 64

    def machine_for(self, accel: Accel) -> str:
        return self.kvm_machine if accel == "kvm" and self.kvm_machine else self.machine


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
    "aarch64": Profile(
        arch="aarch64",
        binary="qemu-system-aarch64",
        machine="virt",
        console="ttyAMA0",
        cpu={"kvm": "host", "tcg": "cortex-a72"},
        tcg_cmdline=("kpti=0",),
        # virt's default GICv2 is emulated by KVM only on hosts whose GICv3 has the v2
        # compatibility mode (many servers, Graviton and Ampere among them, have none)
        kvm_machine="virt,gic-version=host",
        # a 32 MiB translation buffer fills during an arm64 boot and is flushed and refilled:
        # up -> first 200 5.66 s with 32, 4.45 s with 64, 5.04 s with 128 (n=5 each, interleaved)
        tb_size=64,
        tb_size_starting=64,
    ),
}


def profile(arch: Arch) -> Profile:
    return PROFILES[arch]


def host_profile() -> Profile:
    """The profile of the host's own architecture (x86_64's on a host mvm boots no guest of)."""
    return next((p for a, p in PROFILES.items() if a == host_arch()), PROFILES["x86_64"])


@functools.cache
def tsc_khz() -> int | None:
    """The host TSC rate; under TCG the guest TSC runs at it."""
    try:
        with open("/proc/cpuinfo") as f:
            return tsc_khz_of(f.read())
    except OSError:
        return None


def tsc_khz_of(cpuinfo: str) -> int | None:
    """The TSC rate in /proc/cpuinfo's words: half the first CPU's ``bogomips`` (x86 Linux
    calibrates its delay loop on the TSC: bogomips = 2 x tsc_khz / 1000), not ``cpu MHz``,
    which is that core's clock of the moment where the frequency scales (a laptop): a guest
    told that rate would keep time wrongly. None without a TSC or either line."""
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        if not line.strip():
            break  # the first CPU's block only
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    if "tsc" not in fields.get("flags", "").split():
        return None
    try:
        if "bogomips" in fields:
            return round(float(fields["bogomips"]) * 500)
        return round(float(fields["cpu MHz"]) * 1000)
    except (KeyError, ValueError):
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
        f"init={protocol.INIT_PATH}",
        *prof.cmdline,
        *(prof.tcg_cmdline if spec.accel == "tcg" else ()),
        *spec.kernel_args,
    ]
    khz = tsc_khz() if spec.arch == "x86_64" else None
    if khz:
        args.append(f"tsc_early_khz={khz}")
    return " ".join(args)


def hostfwd_rule(fwd: PortForward) -> str:
    return f"{fwd.proto}:{fwd.host_ip}:{fwd.host_port}-:{fwd.guest_port}"


def share_socket(index: int) -> str:
    return f"fs{index}.sock"


def virtiofsd_argv(virtiofsd: str, source: Path, fd: int, *, as_owner: bool) -> list[str]:
    """virtiofsd serving ``source`` on the listening socket ``fd``.

    virtiofsd creates what the guest asks for under the guest's ids: as root, a guest's root
    could make setuid-root programs and device nodes in the shared directory. ``as_owner``
    (it is spawned as the directory's owner) makes it root only in a user namespace of its
    own: the guest's root is the owner on the host, and can make nothing the owner could
    not. A root-owned directory is served as root, without the capabilities to make device
    nodes or file capabilities."""
    serve = [virtiofsd, f"--fd={fd}", "-o", f"source={source}", "-o", "cache=auto"]
    if as_owner:
        return ["unshare", "--user", "--map-root-user", "--", *serve]
    return [*serve, "-o", "modcaps=-mknod:-setfcap"]


def build_argv(spec: LaunchSpec, handoff: Handoff, qemu: str | None = None) -> list[str]:
    """The full QEMU command line; what it names is opened into ``handoff``."""
    prof = profile(spec.arch)
    tb_size = prof.tb_size_starting if spec.starts_services else prof.tb_size
    accel = "kvm" if spec.accel == "kvm" else f"tcg,tb-size={tb_size}"
    files = spec.files
    argv = [
        qemu or prof.binary,
        "-name", f"mvm-{spec.name},process=mvm-{spec.name}",
        "-M", prof.machine_for(spec.accel),
        "-accel", accel,
        "-cpu", prof.cpu[spec.accel],
        "-smp", str(spec.cpus),
        "-m", f"{spec.memory}M",
        "-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
        "-sandbox", SANDBOX,
        # the console and events go to the VM's log shim (mvm._logshim), which caps them
        "-chardev", f"socket,id=con,fd={handoff.pair('console')}",
        "-serial", "chardev:con",
        "-chardev", f"socket,id=mon,fd={handoff.listener(files.qmp)},server=on,wait=off",
        "-mon", "chardev=mon,mode=control",
    ]
    if spec.incoming is None:
        argv += ["-kernel", handoff.file(spec.kernel), "-append", kernel_cmdline(spec)]
        if spec.initrd:
            argv += ["-initrd", handoff.file(spec.initrd)]
    argv += _drives(spec, handoff)
    # a restored machine gets its forwards once it runs (QemuBackend._restore)
    forwards = spec.ports if spec.incoming is None else []
    netdev = "user,id=n0" + "".join(f",hostfwd={hostfwd_rule(fwd)}" for fwd in forwards)
    argv += ["-netdev", netdev, "-device", "virtio-net-pci,netdev=n0"]
    argv += [
        "-device", "virtio-serial-pci,id=vs0,max_ports=16",
        "-chardev", f"socket,id=ev,fd={handoff.pair('events')}",
        "-device", f"virtserialport,bus=vs0.0,chardev=ev,name={protocol.EVENT_PORT}",
    ]
    for i in range(protocol.CONTROL_PORTS):
        argv += [
            "-chardev", f"socket,id=c{i},fd={handoff.listener(files.control(i))},server=on,wait=off",
            "-device", f"virtserialport,bus=vs0.0,chardev=c{i},name={protocol.CONTROL_PORT_PREFIX}{i}",
        ]
    if spec.memory_file is not None and spec.shares:
        raise ValueError("shares need the guest RAM in a memfd; a memory file cannot have them")
    if spec.memory_file is not None:
        mode = "on" if spec.memory_file.shared else "off"
        _memory_backend(argv, f"memory-backend-file,id=mem,size={spec.memory}M,"
                        f"mem-path={handoff.file(spec.memory_file.path)},share={mode}")
    if spec.shares:
        # vhost-user (virtiofsd) needs the guest's memory in a shareable memfd
        _memory_backend(argv, f"memory-backend-memfd,id=mem,size={spec.memory}M,share=on")
        for i, share in enumerate(spec.shares):
            argv += ["-chardev", f"socket,id=fs{i},fd={handoff.connected(files.root / share_socket(i))}",
                     "-device", f"vhost-user-fs-pci,chardev=fs{i},tag={share.tag}"]
    for i in range(spec.hotplug_slots):
        argv += ["-device", f"pcie-root-port,id={hotplug_port(i)},bus=pcie.0,chassis={i + 1},slot={i + 1}"]
    for d in spec.disks:  # in the slots they were hot-plugged into, with the same ids
        if d.slot is not None:
            argv += ["-blockdev", json.dumps(disk_node(d, hotplug_node(d.slot), handoff)),
                     "-device", f"virtio-blk-pci,drive={hotplug_node(d.slot)},id=disk-{hotplug_node(d.slot)},"
                     f"bus={hotplug_port(d.slot)},serial={d.serial},write-cache=on"]
    if spec.incoming is not None:
        argv += ["-incoming", "defer"]
    return [*argv, *handoff.argv]


def disk_node(disk: Disk, node: str, handoff: Handoff) -> dict[str, Any]:
    """A raw disk image as one ``-blockdev`` (or ``blockdev-add``) node."""
    return {"driver": "raw", "node-name": node, "read-only": disk.readonly, "discard": "unmap",
            "file": {"driver": "file", "filename": handoff.block(disk.path, writable=not disk.readonly),
                     "read-only": disk.readonly, "discard": "unmap"}}


def hotplug_port(slot: int) -> str:
    return f"rp{slot}"


def hotplug_node(slot: int) -> str:
    return f"hp{slot}"


def _memory_backend(argv: list[str], backend: str) -> None:
    machine = argv.index("-M") + 1
    argv[machine] += ",memory-backend=mem"
    argv += ["-object", backend]


def _drives(spec: LaunchSpec, handoff: Handoff) -> list[str]:
    """Root first (the guest's /dev/vda), then the config disk and the volumes."""
    argv: list[str] = []
    below: str | None = None
    chain = [*reversed(spec.root_backing), spec.rootfs]  # bottom up
    for depth, path in enumerate(chain):
        top = depth == len(chain) - 1
        node = "d0" if top else f"base{depth}"
        fmt = "raw" if depth == 0 and spec.root_backing else "qcow2"
        doc: dict[str, Any] = {"driver": fmt, "node-name": node, "read-only": not top, "discard": "unmap",
                               "file": {"driver": "file", "filename": handoff.block(path, writable=top),
                                        "read-only": not top, "discard": "unmap"}}
        if fmt == "qcow2":
            doc["backing"] = below
        argv += ["-blockdev", json.dumps(doc)]
        below = node
    argv += ["-device", "virtio-blk-pci,drive=d0,serial=root,write-cache=on"]
    disks = [Disk(spec.config_disk, protocol.CONFIG_DISK_SERIAL, True)] if spec.config_disk else []
    disks += [d for d in spec.disks if d.slot is None]
    for i, disk in enumerate(disks, start=1):
        argv += ["-blockdev", json.dumps(disk_node(disk, f"d{i}", handoff)),
                 "-device", f"virtio-blk-pci,drive=d{i},serial={disk.serial},write-cache=on"]
    return argv
