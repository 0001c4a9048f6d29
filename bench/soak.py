#!/usr/bin/env python3
"""Soak: hundreds of up/down cycles, VMs crashing, `logs -f` held open; does anything grow?

One process drives the library (`mvm.up`, `VM.exec`, `VM.down`), so a descriptor the library
forgets to close shows up in its own count. Every cycle boots the testbed (tests/fixtures/
testbed) with a writable volume, starts `mvmctl logs NAME -f` beside it, runs a command in
the guest, and then ends the VM: by `down` (most cycles), or by killing its QEMU with SIGKILL
first (every --crash-every-th cycle: a crash, then `down` of the crashed VM). The `logs -f`
must end by itself once the VM is gone.

Measured before the first cycle, after a warm-up (the first --warmup cycles: caches, the
probe, imports) and after the last: this process's open descriptors, the system's open
files, QEMU and `logs -f` processes left, zombies, registry entries (`mvm.ls()`), volumes,
the disk used by the state dir ($MVM_HOME/state, kept logs apart) and by $MVM_CACHE
(without the image and template stores, which the first build fills), and the kept logs.
Every figure must be flat from the warm-up to the end;
the kept logs are capped (256 MB) and may only grow up to that.

Usage: .venv/bin/python bench/soak.py [--cycles N] [--crash-every K] [--templates] [--json FILE]
       (one VM at a time; MVM_HOME/MVM_CACHE as usual; templates off unless --templates)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
TESTBED = ROOT / "tests" / "fixtures" / "testbed"


def du(path: Path, skip: tuple[str, ...] = ()) -> int:
    """Bytes allocated under ``path`` (top-level names in ``skip`` left out)."""
    total = 0
    for dirpath, dirnames, filenames in os.walk(path):
        if dirpath == str(path):
            dirnames[:] = [d for d in dirnames if d not in skip]
        for name in filenames:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_blocks * 512
            except OSError:
                pass
    return total


def processes(state: Path) -> dict[str, int]:
    """QEMUs and log shims of this soak's VMs (QEMU runs as a user of its own with its cwd
    elsewhere, so it is found by its name), `logs -f` children and zombies of this process."""
    qemu = shims = logs_f = zombies = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        proc_state, ppid = stat.rsplit(")", 1)[1].split()[:2]
        if proc_state == "Z" and int(ppid) == os.getpid():
            zombies += 1
        if b"qemu-system" in cmdline[0] and any(part.startswith(b"mvm-soak") for part in cmdline):
            qemu += 1
        if b"mvm._logshim" in cmdline and any(part.startswith(str(state).encode()) for part in cmdline):
            shims += 1
        if b"logs" in cmdline and b"-f" in cmdline and int(ppid) == os.getpid():
            logs_f += 1
    return {"qemu_processes": qemu, "log_shims": shims, "logs_f_processes": logs_f, "zombies": zombies}


def snapshot(state: Path, cache: Path) -> dict[str, Any]:
    import mvm

    with open("/proc/sys/fs/file-nr") as f:
        system_files = int(f.read().split()[0])
    return {
        "own_fds": len(os.listdir("/proc/self/fd")),
        "system_open_files": system_files,
        **processes(state),
        "registry_entries": len(mvm.ls()),
        "volumes": len(mvm.volume_ls()),
        "state_bytes": du(state, skip=("logs",)),
        "kept_logs_bytes": du(state / "logs"),
        "cache_bytes_without_images": du(cache, skip=("images", "templates")),
        "time": round(time.time(), 1),
    }


def cycle(n: int, crash: bool, mvmctl: Path, data: Path) -> dict[str, float]:
    import mvm

    name = f"soak{n % 3}"
    t0 = time.monotonic()
    vm = mvm.up(str(TESTBED), name=name, volumes=[f"{data}:/mnt/data:16"])
    booted = time.monotonic() - t0
    follow = subprocess.Popen([str(mvmctl), "logs", name, "-f"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    result = vm.exec(["sh", "-c", f"echo cycle {n} >> /mnt/data/cycles && tail -n 1 /mnt/data/cycles"])
    assert result.exit_code == 0 and result.stdout == f"cycle {n}\n".encode(), result
    if crash:
        pid = vm.info().pid
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        while vm.status.active:
            time.sleep(0.05)
    t1 = time.monotonic()
    vm.down()
    down = time.monotonic() - t1
    try:
        follow.wait(15)  # `logs -f` ends by itself once the VM is gone
        follow_ok = 1.0
    except subprocess.TimeoutExpired:
        follow.kill()
        follow.wait()
        follow_ok = 0.0
    return {"up": booted, "down": down, "logs_f_ended": follow_ok}


def markdown(report: dict[str, Any], keys: list[str], args: argparse.Namespace) -> str:
    lines = [
        "# Soak: a long life",
        "",
        f"Generated by `bench/soak.py --cycles {args.cycles} --crash-every {args.crash_every}"
        f"{' --templates' if args.templates else ''}` on "
        f"{time.strftime('%Y-%m-%d %H:%M %Z')} (QEMU, {'templates on' if args.templates else 'cold boots'}, "
        "one VM at a time, real VMs).",
        "",
        f"**{report['cycles']} up/down cycles, {report['crashes']} of them crashes (QEMU killed with SIGKILL, then "
        f"`down`), in {report['seconds'] / 60:.0f} min; `up` took {report['up_secs_median']:.1f} s and `down` "
        f"{report['down_secs_median']:.1f} s (medians). Every cycle: `up` with a writable volume, `mvmctl logs -f` "
        f"beside it, a command in the guest. `logs -f` left running: {report['logs_f_not_ended']}. Grew from the "
        f"warm-up ({args.warmup} cycles) to the end: {report['grew'] or 'nothing'}.**",
        "",
        "| figure | before | after the warm-up | after |",
        "|---|---:|---:|---:|",
    ]
    for k in keys:
        lines.append(f"| {k} | {report['before'][k]} | {report['after_warmup'][k]} | {report['after'][k]} |")
    lines += [
        "",
        "`own_fds`: descriptors of the process that drives the library (the warm-up adds asyncio's event loop, "
        "once); `system_open_files`: the machine's, other users included, so it is not judged; `state_bytes`: "
        "$MVM_HOME/state without the kept logs (the volume's image); `kept_logs_bytes`: the logs `down` keeps, "
        "one set per VM name, capped at 256 MB in total; `cache_bytes_without_images`: $MVM_CACHE without the "
        "image and template stores; `qemu_processes`, `log_shims`: this soak's VMs' QEMUs and log processes "
        "still running; `zombies`: this process's children that ended and were not collected yet (the last "
        "VM's QEMU and log shim end just after `down` returns and are collected by the next status check: "
        "at most one VM's).",
        "",
    ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cycles", type=int, default=200)
    parser.add_argument("--crash-every", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--templates", action="store_true", help="let up make and restore templates")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--markdown", type=Path, help="write the report there (docs/soak.md)")
    args = parser.parse_args()

    def stop(signum: int, frame: object) -> None:
        raise KeyboardInterrupt  # the cleanup below runs (down, volume rm)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)  # also when started in the background, where SIGINT is ignored
    if not args.templates:
        os.environ["MVM_TEMPLATES"] = "off"
    import mvm
    from mvm.paths import Layout

    layout = Layout.default()
    state, cache = layout.state, layout.cache
    mvmctl = Path(sys.executable).with_name("mvmctl")
    mvm.build(str(TESTBED))
    data = Path(tempfile.mkdtemp(prefix="mvm-soak-"))
    before = snapshot(state, cache)
    timings: list[dict[str, float]] = []
    warm: dict[str, Any] = before
    started = time.monotonic()
    try:
        for n in range(args.cycles):
            timings.append(cycle(n, args.crash_every > 0 and n % args.crash_every == args.crash_every - 1, mvmctl,
                                 data))
            if n + 1 == args.warmup:
                warm = snapshot(state, cache)
            if (n + 1) % 25 == 0:
                print(f"{n + 1} cycles, {time.monotonic() - started:.0f}s: {snapshot(state, cache)}", flush=True)
    finally:
        after = snapshot(state, cache)
        for vm in mvm.ls():
            if vm.name.startswith("soak"):
                mvm.down(vm.name)
        mvm.volume_rm(str(data))
        shutil.rmtree(data, ignore_errors=True)
    keys = [k for k in before if k != "time"]
    grew = {k: after[k] - warm[k] for k in keys if k != "kept_logs_bytes" and after[k] > warm[k]
            and not (k.endswith("_bytes") and after[k] - warm[k] < 4 << 20)  # block rounding, a log line
            and k != "system_open_files"}  # other users of the machine open files too
    report = {
        "cycles": len(timings),
        "crashes": sum(1 for n in range(len(timings)) if args.crash_every and n % args.crash_every ==
                       args.crash_every - 1),
        "seconds": round(time.monotonic() - started, 1),
        "up_secs_median": sorted(t["up"] for t in timings)[len(timings) // 2] if timings else None,
        "down_secs_median": sorted(t["down"] for t in timings)[len(timings) // 2] if timings else None,
        "logs_f_not_ended": sum(1 for t in timings if not t["logs_f_ended"]),
        "before": before, "after_warmup": warm, "after": after, "grew": grew,
    }
    print(f"{'figure':28} {'before':>14} {'after warm-up':>14} {'after':>14}")
    for k in keys:
        print(f"{k:28} {before[k]:>14} {warm[k]:>14} {after[k]:>14}")
    print(json.dumps({k: v for k, v in report.items() if k not in ("before", "after_warmup", "after")}, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    if args.markdown:
        args.markdown.write_text(markdown(report, keys, args))
    return 1 if grew or report["logs_f_not_ended"] else 0


if __name__ == "__main__":
    sys.exit(main())
