"""Choosing KVM or TCG by proof, not by the presence of /dev/kvm.

On nested hosts /dev/kvm can exist and still hang every stock kernel (nested PVM), or make
QEMU abort on an MSR it cannot set. So KVM is used only after a probe boots the real
kernel and initrd under KVM to the kernel's "Run /init" line within a few seconds. The
verdict is cached per (kernel, QEMU binary, host kernel), so it costs one probe per change.

KVM runs only guests of the host's own architecture. A guest of another one (aarch64 on an
x86_64 host, or the reverse) is emulated by TCG without a probe, and the verdict says so in
one line, with what it costs. (On macOS the native accelerator would be HVF, ``-accel hvf``,
chosen the same way; mvm does not run there yet: docs/platforms.md.)
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import select
import subprocess
import time
from pathlib import Path

from .._atomic import write_json_atomic
from .._proc import DEFAULT_RUNNER, Runner, require_tool
from ..errors import UsageError
from ..names import Arch, host_arch
from .base import AccelPreference, Preflight
from .qemu_argv import profile

log = logging.getLogger(__name__)

PROBE_TIMEOUT = 6.0
#: A cached verdict of another schema is probed again.
PROBE_SCHEMA = 1
MARKER = b"Run /init as init process"


def _probe_key(kernel: Path, initrd: Path | None, qemu: str) -> str:
    """The files' identities (device, inode, size, mtime), not their paths: every image
    holds a hard link to its cached kernel and initrd, so a new build of any spec boots the
    same files. Keyed by path, each new image paid the probe again: 6 s on a host whose
    /dev/kvm hangs (nested virtualisation that does not work), on its first ``up``."""
    parts = []
    for p in (kernel, *([initrd] if initrd else []), Path(qemu)):
        st = p.stat()
        parts.append(f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}")
    parts.append(platform.release())
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:24]


#: What emulating a guest of another architecture costs (figures: docs/platforms.md).
EMULATION_COST = "no KVM across architectures, so CPU-bound work runs several times slower than a native guest"


def probe_argv(kernel: Path, initrd: Path | None, qemu: str, arch: Arch = "x86_64") -> list[str]:
    prof = profile(arch)
    argv = [
        qemu, "-M", prof.machine_for("kvm"), "-accel", "kvm", "-cpu", prof.cpu["kvm"], "-m", "128M",
        "-nodefaults", "-no-user-config", "-nographic", "-no-reboot", "-serial", "stdio",
        "-kernel", str(kernel), "-append", f"console={prof.console} panic=-1 root=/dev/mvm-probe",
    ]
    if initrd:
        argv += ["-initrd", str(initrd)]
    return argv


def run_probe(kernel: Path, initrd: Path | None, qemu: str, runner: Runner,
              timeout: float = PROBE_TIMEOUT, arch: Arch = "x86_64") -> tuple[bool, str]:
    argv = probe_argv(kernel, initrd, qemu, arch)
    proc = runner.spawn(argv, stdout=subprocess.PIPE)
    assert proc.stdout is not None
    seen = b""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([proc.stdout], [], [], 0.1)
            if ready:
                chunk = os.read(proc.stdout.fileno(), 65536)
                if not chunk:
                    break
                seen = (seen + chunk)[-65536:]
                if MARKER in seen:
                    return True, "KVM booted the kernel to init"
        if proc.poll() is not None:
            last = seen.decode(errors="replace").strip().splitlines()[-1:] or ["no output"]
            return False, f"QEMU failed under KVM: {last[0][:160]}"
        return False, f"/dev/kvm is present but the kernel did not reach init within {timeout:g}s"
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()


def kvm_verdict(kernel: Path, initrd: Path | None, probes: Path,
                runner: Runner = DEFAULT_RUNNER, arch: Arch = "x86_64") -> tuple[bool, str]:
    if arch != host_arch():
        return False, f"KVM runs only {host_arch()} guests here"
    if not os.path.exists("/dev/kvm"):
        return False, "/dev/kvm does not exist"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False, "/dev/kvm is not accessible to this user (join the kvm group)"
    qemu = require_tool(profile(arch).binary)
    missing = [str(p) for p in (kernel, initrd) if p is not None and not p.is_file()]
    if missing:  # not a verdict about KVM: never cache it
        return False, f"not probed ({', '.join(missing)} missing); TCG until the next build"
    cache = probes / f"kvm-{_probe_key(kernel, initrd, qemu)}.json"
    try:
        data = json.loads(cache.read_text())
        if data.get("schema_version") == PROBE_SCHEMA:
            return bool(data["ok"]), str(data["reason"])
    except (OSError, ValueError, KeyError, AttributeError):
        pass
    ok, reason = run_probe(kernel, initrd, qemu, runner, arch=arch)
    try:
        probes.mkdir(parents=True, exist_ok=True)
        write_json_atomic(cache, {"schema_version": PROBE_SCHEMA, "ok": ok, "reason": reason, "at": time.time()})
    except OSError as exc:  # a cache this user cannot write (shared, read-only): probe again next time
        log.info("KVM verdict not cached (%s): %s", cache, exc)
    return ok, reason


def emulation(arch: Arch) -> str | None:
    """The one line saying a guest is emulated, and what it costs (None: it is native)."""
    host = host_arch()
    if arch == host:
        return None
    return f"{arch} guest on an {host} host: emulated by QEMU (TCG), {EMULATION_COST}"


def refuse_kvm(arch: str) -> None:
    """``--hypervisor qemu-kvm`` for a guest of another architecture than the host's: refused
    (asked before a build too, which for a foreign guest takes minutes)."""
    if arch != host_arch():
        raise UsageError(f"KVM cannot run an {arch} guest on this {host_arch()} host",
                         hint="use --hypervisor auto or qemu-tcg (emulated, slower), or build the guest for "
                         f"{host_arch()} (--arch {host_arch()}, arch = \"{host_arch()}\" in mvm.toml, or a "
                         f"flake's system = \"{host_arch()}-linux\")")


def choose(requested: AccelPreference, kernel: Path, initrd: Path | None, probes: Path,
           runner: Runner = DEFAULT_RUNNER, arch: Arch = "x86_64") -> Preflight:
    emulated = emulation(arch)
    if emulated is not None:
        if requested == "kvm":
            refuse_kvm(arch)
        return Preflight("tcg", f"TCG: {arch} is not this host's architecture", emulated=emulated)
    if requested == "tcg":
        return Preflight("tcg", "TCG requested (--hypervisor qemu-tcg)")
    ok, reason = kvm_verdict(kernel, initrd, probes, runner, arch)
    if requested == "kvm":
        if not ok:
            raise UsageError(f"KVM is not usable here: {reason}",
                             hint="use --hypervisor qemu-tcg (or auto)")
        return Preflight("kvm", reason)
    return Preflight("kvm", reason) if ok else Preflight("tcg", f"TCG: {reason}")
