#!/usr/bin/env python3
"""A prospect, not a feature: what a cold boot would save by restoring a kernel saved while
its initrd waited for the root disk, instead of booting that kernel.

  floor     bare QEMU booting an image's kernel + initrd to a static busybox init that prints
            a marker (bench/run.py's and bench/aarch64.py's floor, the same command line)
  preroot   QEMU restoring that kernel + initrd, saved once by the same command line without
            its root disk (plus an empty PCIe root port, and `pcie_ports=native` for x86_64's
            microvm) while the initrd waited for one; the root disk is then hot-plugged into
            that port and the clock started: spawn -> the same marker
  incoming  of preroot's time, spawn -> the saved state loaded (QEMU's start and the restore)

Rounds interleaved, per architecture, the floor root copied fresh for every restore. What the
figure leaves out (and a feature would have to pay): the guest's kernel state (KASLR base,
stack canary, RNG) is the same in every VM restored from one save, so each would need a
reseed at least, and `up --cold` (which promises a boot) could not use it.
Usage: .venv/bin/python bench/preroot.py [--runs N] [--arch x86_64|aarch64 ...] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import aarch64 as arm  # noqa: E402
import run as base  # noqa: E402

from mvm.backends.qmp import QMP  # noqa: E402

ROOT_PORT = "pcie-root-port,id=rp1,bus=pcie.0,chassis=1,slot=1"


def monitor(path: Path, timeout: float = 10.0) -> QMP:
    """mvm's QMP session on ``path`` once QEMU has created the socket."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise RuntimeError(f"QEMU made no monitor socket {path} in {timeout} s")
        time.sleep(0.002)
    return QMP(path, "bench", timeout=30.0)


def wait_migration(qmp: QMP) -> None:
    while (status := qmp.command("query-migrate").get("status")) not in ("completed", "failed"):
        time.sleep(0.005)
    if status != "completed":
        raise RuntimeError(f"migration {status}")


def drop_options(argv: list[str], unwanted: Callable[[str, str], bool]) -> list[str]:
    """``argv`` without every option and its value that ``unwanted(option, value)`` names."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        if i + 1 < len(argv) and unwanted(argv[i], argv[i + 1]):
            i += 2
            continue
        out.append(argv[i])
        i += 1
    return out


def without_root_disk(argv: list[str]) -> list[str]:
    """The floor's command line without its root disk, with an empty root port to plug it into
    (and ``pcie_ports=native``, as mvm's templates have: x86 microvm's ACPI grants the guest no
    hotplug control otherwise, and the plugged disk never appears)."""
    out = drop_options(argv, lambda opt, value: opt in ("-drive", "-device")
                       and bool({"id=d0", "drive=d0"} & set(value.split(","))))
    cmdline = out.index("-append") + 1
    out[cmdline] += " pcie_ports=native"
    return [*out, "-device", ROOT_PORT]


def without_kernel(argv: list[str]) -> list[str]:
    return drop_options(argv, lambda opt, _: opt in ("-kernel", "-initrd", "-append"))


def save(machine: list[str], tmp: Path, after: float) -> Path:
    """Boot ``machine`` (no root disk), let its initrd reach its wait for one, save it."""
    qmp_path, state = tmp / "save.qmp", tmp / "state"
    proc = subprocess.Popen([*machine, "-qmp", f"unix:{qmp_path},server=on,wait=off"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    try:
        time.sleep(after)
        with monitor(qmp_path) as qmp:
            qmp.command("stop")
            qmp.command("migrate", uri=f"exec:cat > {state}")
            wait_migration(qmp)
            qmp.command("quit")
        proc.wait(10)
    finally:
        proc.kill()
        proc.wait()
    return state


def restore_to_marker(machine: list[str], state: Path, rootfs: Path, tmp: Path) -> tuple[float, float]:
    """Seconds from spawn to the saved state loaded, and to the floor init's marker."""
    qmp_path, disk = tmp / "restore.qmp", tmp / "root.ext4"
    qmp_path.unlink(missing_ok=True)
    shutil.copyfile(rootfs, disk)
    argv = [*without_kernel(machine), "-S", "-incoming", f"exec:cat {state}",
            "-qmp", f"unix:{qmp_path},server=on,wait=off"]
    started = time.monotonic()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        with monitor(qmp_path) as qmp:
            wait_migration(qmp)
            loaded = time.monotonic() - started
            qmp.command("blockdev-add", driver="raw", **{"node-name": "root"},
                        file={"driver": "file", "filename": str(disk)})
            qmp.command("device_add", driver="virtio-blk-pci", drive="root", bus="rp1", id="root")
            qmp.command("cont")
        base.wait_for_marker(proc)
        return loaded, time.monotonic() - started
    finally:
        proc.kill()
        proc.wait()


def measure(arch: str, runs: int, tmp: Path) -> dict[str, dict[str, float]]:
    import mvm

    image = mvm.build(base.HELLO, arch=arch)
    kernel, initrd = Path(image.path) / image.kernel, Path(image.path) / str(image.initrd)
    if arch == "aarch64":
        rootfs = arm.arm_floor_rootfs(tmp, arm.arm_busybox())
        floor = arm.arm_floor_argv(kernel, initrd, rootfs)
    else:
        rootfs = base.floor_rootfs(tmp)
        floor = base.floor_argv(kernel, initrd, rootfs)
    warm = base.time_to_marker(floor)  # also warms the page cache
    machine = without_root_disk(floor)
    # well past the kernel's boot, well inside the initrd's patience (2000 polls of 5 ms)
    state = save(machine, tmp, after=max(3.0, 2 * warm))
    rows: dict[str, list[float]] = {"floor": [], "preroot": [], "incoming": []}
    for _ in range(runs):
        rows["floor"].append(base.time_to_marker(floor))
        loaded, marker = restore_to_marker(machine, state, rootfs, tmp)
        rows["incoming"].append(loaded)
        rows["preroot"].append(marker)
    result = {key: base.summary(values) for key, values in rows.items()}
    result["state_mb"] = base.summary([state.stat().st_size / 1e6])
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--arch", nargs="+", default=["x86_64", "aarch64"], choices=["x86_64", "aarch64"])
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    results: dict[str, Any] = {}
    for arch in args.arch:
        with tempfile.TemporaryDirectory() as tmp:
            results[arch] = measure(arch, args.runs, Path(tmp))
        r = results[arch]
        f, p = r["floor"]["median"], r["preroot"]["median"]
        print(f"{arch}: floor {f:.3f} s ({r['floor']['min']:.3f}-{r['floor']['max']:.3f}), "
              f"restored before its root disk {p:.3f} s ({r['preroot']['min']:.3f}-{r['preroot']['max']:.3f}) "
              f"= {p / f:.2f}× floor, of which QEMU's start and the state loaded {r['incoming']['median']:.3f} s; "
              f"saves {f - p:.2f} s; saved state {r['state_mb']['median']:.0f} MB")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
