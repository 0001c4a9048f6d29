"""What this host can do, and the exact command that fixes each missing piece.

``mvmctl doctor`` reports the backends (and why one is unusable: e.g. /dev/kvm present
but the boot probe hung, so TCG is used), the guest architectures (native, or emulated: can
they boot, can their images be built), the external tools with their versions, and the
state dir with its free space.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from .._proc import DEFAULT_RUNNER, INSTALL_HINTS, Runner, find_tool
from ..backends.qemu_argv import PROFILES, host_profile
from ..builders import nix as nix_builds
from ..builders.nix import group_exists
from ..errors import MvmError
from ..names import ARCHES, Arch, host_arch
from ..paths import Layout
from ..runtime import machine_users
from .models import ArchCheck, BackendCheck, DiskCheck, DoctorReport, IsolationCheck, ToolCheck

TOOLS: list[tuple[str, list[str], str]] = [
    # (executable, version argv, what mvm uses it for)
    ("qemu-system-x86_64", ["--version"], "x86_64 guests (KVM on an x86_64 host, else TCG)"),
    ("qemu-system-aarch64", ["--version"], "aarch64 guests (KVM on an aarch64 host, else TCG)"),
    ("mmdebstrap", ["--version"], "building mvm.toml images"),
    ("arch-test", [], "building mvm.toml images of the other architecture (with qemu-user)"),
    ("mkfs.ext4", ["-V"], "root filesystems and volumes"),
    ("resize2fs", [], "growing volumes"),
    ("setpriv", ["--version"], "running e2fsck and resize2fs on volumes as nobody (when mvm runs as root)"),
    ("unshare", ["--version"], "confining e2fsck and resize2fs (own PID, network and IPC namespaces)"),
    ("busybox", ["--help"], "the initrd"),
    ("depmod", ["--version"], "indexing kernel modules"),
    ("lz4", ["--version"], "unpacking the Debian kernel"),
    ("apt-get", ["--version"], "fetching the Debian kernel"),
    ("nix", ["--version"], "the Nix front end (--flake) and `mvmctl dev`"),
]
MIN_FREE_BYTES = 2 * 1024**3


def tool_version(path: str, args: list[str], runner: Runner) -> str:
    if not args:
        return "present"
    try:
        text = runner.run([path, *args], desc=f"{path} {' '.join(args)}", ok_codes=range(256)).output.strip()
    except MvmError:
        return "present (version unknown)"
    first = text.splitlines()[0] if text else "present"
    match = re.search(r"\d+\.\d+(\.\d+)?", first)
    return match.group(0) if match else first[:60]


def check_tools(runner: Runner = DEFAULT_RUNNER) -> list[ToolCheck]:
    rows = []
    for name, args, purpose in TOOLS:
        path = find_tool(name)
        hint = INSTALL_HINTS.get(name)
        fix = None if path else hint
        if name == "nix" and path and (group := nix_builds.missing_build_group(path, runner)):
            fix = (f"as root, nix builds as the users of group {group!r}, which does not exist, so every "
                   "`build --flake` fails: apt-get install nix-setup-systemd (makes them), or set "
                   "`build-users-group =` in /etc/nix/nix.conf (builds then run as root)")
        rows.append(ToolCheck(tool=name, purpose=purpose, found=path is not None, path=path,
                              version=tool_version(path, args, runner) if path else None, fix=fix))
    return rows


def check_backends(layout: Layout, runner: Runner = DEFAULT_RUNNER) -> list[BackendCheck]:
    """Each backend's own account of the ways it runs machines here (the KVM probe boots the
    newest cached kernel of the host's architecture)."""
    from .. import backends
    from ..backends.base import ProbeKernel
    from ..builders import kernel as kernel_mod

    kernels = kernel_mod.cached_kernels(layout.kernels) if host_arch() in ARCHES else []
    probe = ProbeKernel(kernels[-1].vmlinux, kernels[-1].initrd, kernels[-1].arch) if kernels else None
    rows = []
    for name in backends.names():
        try:
            found = backends.get(name, runner).diagnose(probe, layout.probes)
        except (MvmError, OSError, AttributeError) as exc:  # one backend's failure is its row, not doctor's end
            rows.append(BackendCheck(backend=name, usable=None, reason=f"could not be asked: {exc}"))
            continue
        rows += [BackendCheck(backend=d.name, usable=d.usable, reason=d.reason, fix=d.fix) for d in found]
    rows.append(BackendCheck(backend="firecracker", usable=False,
                             reason="not implemented (the binary is not packaged here and cannot boot "
                             "under nested PVM)"))
    return rows


def foreign_architectures(runner: Runner) -> set[str]:
    """Debian architectures dpkg/apt fetch besides the host's (``dpkg --add-architecture``)."""
    try:
        return set(runner.run(["dpkg", "--print-foreign-architectures"], desc="asking dpkg").output.split())
    except MvmError:
        return set()


def check_arch(arch: Arch, runner: Runner) -> ArchCheck:
    from ..builders import arches

    native = arch == host_arch()
    qemu = PROFILES[arch].binary
    boots = find_tool(qemu) is not None
    if native:
        problem = None if find_tool("mmdebstrap") else "mmdebstrap is not installed"
        fix = INSTALL_HINTS["mmdebstrap"]
        how = "the host's architecture: KVM where the probe proves it (see backends), else TCG"
    else:
        problem = arches.emulation_problem(arch)
        if problem is None and arches.debian(arch) not in foreign_architectures(runner):
            problem = f"apt does not fetch {arches.debian(arch)} packages (the kernel and busybox come from apt)"
        fix = arches.setup_fix(arch)
        how = "emulated (TCG, no KVM across architectures: CPU-bound work runs several times slower)" + (
            "" if problem else "; images build under qemu-user (about 4x slower than native)")
    # booting needs the system emulator, building does not: each its own verdict and fix
    reasons = [how] if boots else [f"cannot boot: {qemu} is not installed"]
    if problem:
        reasons.append(f"images cannot be built: {problem}")
    fixes = [f for f, needed in ((INSTALL_HINTS[qemu], not boots), (fix, problem is not None)) if needed]
    return ArchCheck(arch=arch, native=native, boots=boots, builds=problem is None, reason="; ".join(reasons),
                     fix="; ".join(fixes) or None)


def _existing(path: Path) -> Path:
    """``path``, or its nearest ancestor that exists (mvm makes the rest when first needed)."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def unusable_dir(path: Path) -> str | None:
    """Why mvm could not keep its files under ``path`` (None: it can, or can create it)."""
    probe = _existing(path)
    if not probe.is_dir():
        return f"{probe} is not a directory"
    if not os.access(probe, os.W_OK | os.X_OK):
        return f"{probe} is not writable by this user"
    return None


def check_disk(layout: Layout) -> DiskCheck:
    problems = [why for where in (layout.state, layout.cache) if (why := unusable_dir(where))]
    if problems:
        return DiskCheck(state_dir=str(layout.state), cache_dir=str(layout.cache), free_bytes=0, ok=False,
                         fix="; ".join(problems) + ": point MVM_STATE / MVM_CACHE (or MVM_HOME) at a directory "
                         "this user can write")
    free = shutil.disk_usage(_existing(layout.state)).free
    ok = free >= MIN_FREE_BYTES
    return DiskCheck(state_dir=str(layout.state), cache_dir=str(layout.cache), free_bytes=free, ok=ok,
                     fix=None if ok else "free disk space, e.g. `mvmctl cleanup`")


def kvm_group_fix(have_kvm_group: bool) -> str:
    """How to open /dev/kvm to a group (the machine users join the device's group)."""
    fix = "chgrp kvm /dev/kvm && chmod 660 /dev/kvm (udev does this on most distributions)"
    return fix if have_kvm_group else f"groupadd --system kvm && {fix}"


def check_isolation() -> IsolationCheck:
    if not machine_users.confining():
        uid = os.geteuid()
        return IsolationCheck(qemu_user="invoking-user",
                              reason=f"QEMU runs as you (uid {uid}), in its seccomp sandbox; another VM's QEMU "
                              "runs as you too")
    first = machine_users.base() + 1
    last = machine_users.base() + machine_users.SLOTS
    kvm = machine_users.kvm_group()
    reason = (f"each VM's QEMU runs as a user of its own (uids {first}-{last}, no capabilities, seccomp "
              "sandbox) and is handed its files: it cannot open another VM's disks or sockets, nor signal it")
    fix = None
    if kvm is None and os.path.exists("/dev/kvm"):
        reason += "; /dev/kvm is open to no group, so those users cannot use KVM (VMs run under TCG)"
        fix = kvm_group_fix(group_exists("kvm"))
    return IsolationCheck(qemu_user="per-vm", uid_range=[first, last], kvm_group=kvm, reason=reason, fix=fix)


def doctor(layout: Layout | None = None, runner: Runner = DEFAULT_RUNNER) -> DoctorReport:
    """Which backends work here and why not, the tools mvm uses, and the free space."""
    layout = layout or Layout.default()
    tools = check_tools(runner)
    disk = check_disk(layout)
    required = {host_profile().binary, "mmdebstrap", "mkfs.ext4", "busybox", "depmod", "lz4",
                "apt-get"}
    ok = all(t.found for t in tools if t.tool in required) and disk.ok
    return DoctorReport(ok=ok, backends=check_backends(layout, runner), arches=[check_arch(a, runner) for a in ARCHES],
                        tools=tools, disk=disk, isolation=check_isolation())
