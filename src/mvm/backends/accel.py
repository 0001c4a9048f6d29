"""Choosing KVM or TCG by proof, not by the presence of /dev/kvm.

On nested hosts /dev/kvm can exist and still hang every stock kernel (nested PVM), or make
QEMU abort on an MSR it cannot set. So KVM is used only after a probe boots the real
kernel and initrd under KVM to the kernel's "Run /init" line within a few seconds. The
verdict is cached per (kernel, QEMU binary, host kernel), so it costs one probe per change.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import select
import subprocess
import time
from pathlib import Path

from .._atomic import write_json_atomic
from .._proc import require_tool
from ..errors import UsageError
from .base import AccelPreference, Preflight
from .qemu_argv import QEMU

PROBE_TIMEOUT = 6.0
MARKER = b"Run /init as init process"

def _probe_key(kernel: Path, initrd: Path | None, qemu: str) -> str:
    parts = []
    for p in (kernel, *([initrd] if initrd else []), Path(qemu)):
        st = p.stat()
        parts.append(f"{p}:{st.st_size}:{st.st_mtime_ns}")
    parts.append(platform.release())
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:24]


def run_probe(kernel: Path, initrd: Path | None, qemu: str, timeout: float = PROBE_TIMEOUT) -> tuple[bool, str]:
    argv = [
        qemu, "-M", "microvm,pcie=on", "-accel", "kvm", "-cpu", "host", "-m", "128M",
        "-nodefaults", "-no-user-config", "-nographic", "-no-reboot", "-serial", "stdio",
        "-kernel", str(kernel), "-append", "console=ttyS0 panic=-1 root=/dev/mvm-probe",
    ]
    if initrd:
        argv += ["-initrd", str(initrd)]
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
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


def kvm_verdict(kernel: Path, initrd: Path | None, probes: Path) -> tuple[bool, str]:
    if not os.path.exists("/dev/kvm"):
        return False, "/dev/kvm does not exist"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False, "/dev/kvm is not accessible to this user (join the kvm group)"
    qemu = require_tool(QEMU)
    missing = [str(p) for p in (kernel, initrd) if p is not None and not p.is_file()]
    if missing:  # not a verdict about KVM: never cache it
        return False, f"not probed ({', '.join(missing)} missing); TCG until the next build"
    cache = probes / f"kvm-{_probe_key(kernel, initrd, qemu)}.json"
    try:
        data = json.loads(cache.read_text())
        return bool(data["ok"]), str(data["reason"])
    except (OSError, ValueError, KeyError):
        pass
    ok, reason = run_probe(kernel, initrd, qemu)
    probes.mkdir(parents=True, exist_ok=True)
    write_json_atomic(cache, {"schema_version": 1, "ok": ok, "reason": reason, "at": time.time()})
    return ok, reason


def choose(requested: AccelPreference, kernel: Path, initrd: Path | None, probes: Path) -> Preflight:
    if requested == "tcg":
        return Preflight("tcg", "TCG requested (--hypervisor qemu-tcg)")
    ok, reason = kvm_verdict(kernel, initrd, probes)
    if requested == "kvm":
        if not ok:
            raise UsageError(f"KVM is not usable here: {reason}",
                             hint="use --hypervisor qemu-tcg (or auto)")
        return Preflight("kvm", reason)
    return Preflight("kvm", reason) if ok else Preflight("tcg", f"TCG: {reason}")
