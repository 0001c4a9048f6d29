#!/usr/bin/env python3
"""aarch64 guests emulated under TCG, each figure next to its own floor, in the same rounds.

  floor       bare qemu-system-aarch64 (-M virt, cortex-a72, the flags mvm uses) booting the
              same arm64 kernel + initrd to a static arm64 busybox init that prints a marker
  up→200      `mvmctl up examples/hello --arch aarch64 --cold -p P:8080` → first HTTP 200
  restored    the same `up`, restored from the image's template (fast start)
  x86 floor / x86 up→200   the same two for x86_64 in the same rounds, for comparison

Rounds are interleaved (one VM at a time), so drift and other load hit every figure alike.
``--spec DIR`` measures another guest instead of examples/hello (bench/specs/httpd: a compiled
service, which shows mvm's share without a Python service's own start-up).
Targets (issue 13): cold up→200 ≤ 1.5× floor; restored: the fast-start issue's goal (≤ 0.5×).
Usage: .venv/bin/python bench/aarch64.py [--runs N] [--json FILE] [--no-x86]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as base  # noqa: E402  (bench/run.py: the x86 floor, up→200 and the guest timeline)

MARKER = base.MARKER


def arm_floor_rootfs(workdir: Path, busybox: Path) -> Path:
    """bench/run.py's floor root, with the arm64 busybox as its init."""
    tree = workdir / "tree"
    for d in ("bin", "sbin", "dev", "proc", "sys"):
        (tree / d).mkdir(parents=True)
    shutil.copy(busybox, tree / "bin" / "busybox")
    (tree / "bin" / "sh").symlink_to("busybox")
    init = tree / "sbin" / "init"
    init.write_text(f"#!/bin/sh\necho {MARKER.decode()}\n/bin/busybox poweroff -f\n")
    init.chmod(0o755)
    image = workdir / "floor-arm64.ext4"
    subprocess.run(["mkfs.ext4", "-q", "-F", "-T", "default", "-d", str(tree), str(image), "16M"], check=True)
    return image


def arm_busybox() -> Path:
    """The static arm64 busybox beside the newest cached arm64 kernel (the one mvm's initrds use)."""
    from mvm.builders.kernel import cached_kernels
    from mvm.paths import Layout

    return cached_kernels(Layout.default().kernels, "aarch64")[-1].root / "busybox"


def boot_arm_floor(kernel: Path, initrd: Path, rootfs: Path) -> float:
    return base.time_to_marker(arm_floor_argv(kernel, initrd, rootfs))


def arm_floor_argv(kernel: Path, initrd: Path, rootfs: Path) -> list[str]:
    return [
        "qemu-system-aarch64", "-M", "virt", "-accel", "tcg,tb-size=64", "-cpu", "cortex-a72", "-m", "512M",
        "-smp", "1", "-nodefaults", "-no-user-config", "-nographic", "-no-reboot", "-serial", "stdio",
        "-kernel", str(kernel), "-initrd", str(initrd),
        "-append", "console=ttyAMA0 root=/dev/vda rw panic=-1 quiet cryptomgr.notests init=/sbin/init kpti=0",
        "-drive", f"file={rootfs},format=raw,if=none,id=d0,snapshot=on", "-device", "virtio-blk-pci,drive=d0",
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--no-x86", action="store_true", help="skip the x86_64 figures")
    ap.add_argument("--spec", type=Path, default=base.HELLO, help="the guest to measure (default examples/hello)")
    args = ap.parse_args()

    home = Path(tempfile.mkdtemp(prefix="mvm-bench-arm-"))
    env = {**os.environ, "MVM_HOME": str(home)}
    env.setdefault("MVM_CACHE", str(Path.home() / ".cache" / "mvm"))
    os.environ.update(env)
    import mvm

    results: dict[str, dict[str, float]] = {}
    try:
        print(f"preparing: {args.spec} for aarch64 (and x86_64), its template ...", file=sys.stderr)
        arm = mvm.build(args.spec, arch="aarch64")
        x86 = None if args.no_x86 else mvm.build(args.spec, arch="x86_64")
        template = mvm.template_create(args.spec, arch="aarch64")
        target = (str(args.spec),)
        results["template_mb"] = base.summary([template.bytes_on_disk / 1e6])
        busybox = arm_busybox()
        arm_up = ("--cold", "--arch", "aarch64")
        restore_env = {**env, "MVM_TEMPLATES": "restore"}
        rows: dict[str, list[float]] = {k: [] for k in ("floor", "up", "restored", "x86_floor", "x86_up")}
        phases: list[dict[str, float]] = []
        with tempfile.TemporaryDirectory() as tmp:
            arm_root = arm_floor_rootfs(Path(tmp), busybox)
            x86_root = base.floor_rootfs(Path(tmp) / "x86") if x86 else None
            k, i = Path(arm.path) / arm.kernel, Path(arm.path) / str(arm.initrd)
            boot_arm_floor(k, i, arm_root)  # warm the page cache
            for _ in range(args.runs):
                rows["floor"].append(boot_arm_floor(k, i, arm_root))
                rows["up"].append(base.up_to_first_200(env, phases, *arm_up, target=target))
                rows["restored"].append(base.up_to_first_200(restore_env, None, "--arch", "aarch64", target=target))
                if x86 and x86_root:
                    rows["x86_floor"].append(base.boot_floor(Path(x86.path) / x86.kernel,
                                                             Path(x86.path) / str(x86.initrd), x86_root))
                    rows["x86_up"].append(base.up_to_first_200(env, None, "--cold", "--arch", "x86_64", target=target))
        for key, values in rows.items():
            if values:
                results[key] = base.summary(values)
        for phase in base.PHASES:
            values = [p[phase] for p in phases if phase in p]
            if values:
                results[f"guest_{phase}"] = base.summary(values)
    finally:
        shutil.rmtree(home, ignore_errors=True)

    f = results["floor"]["median"]
    table = [
        ("aarch64 floor (bare qemu-system-aarch64 → init)", results["floor"], None),
        ("aarch64 mvmctl up --cold → first HTTP 200", results["up"],
         f"{results['up']['median'] / f:.2f}× floor (target ≤ 1.5×)"),
        ("aarch64 mvmctl up (restored) → first HTTP 200", results["restored"],
         f"{results['restored']['median'] / f:.2f}× floor (target ≤ 0.5×)"),
    ]
    if "x86_floor" in results:
        xf = results["x86_floor"]["median"]
        table += [("x86_64 floor", results["x86_floor"], None),
                  ("x86_64 mvmctl up --cold → first HTTP 200", results["x86_up"],
                   f"{results['x86_up']['median'] / xf:.2f}× its floor")]
    print(f"{'figure (n=' + str(args.runs) + ')':52} {'median':>8} {'min':>8} {'max':>8}  note")
    for label, r, note in table:
        print(f"{label:52} {r['median']:8.2f} {r['min']:8.2f} {r['max']:8.2f}  {note or ''}")
    print("\naarch64 guest boot timeline (seconds since the guest kernel started, median):")
    for phase in base.PHASES:
        r = results.get(f"guest_{phase}")
        if r:
            print(f"  {phase:20} {r['median']:6.2f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
