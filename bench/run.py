#!/usr/bin/env python3
"""mvm benchmarks, each figure next to a baseline measured in the same run.

These machines are noisy, so absolute numbers mean little; ratios against a baseline taken
minutes apart on the same host mean more. Figures (median of --runs, min/max shown):

  floor      bare QEMU booting the same kernel + initrd to a static busybox init that
             prints a marker (no mvm code at all): the cost of the kernel and initrd
  up→200     `mvmctl up examples/hello -p P:8080` started → first HTTP 200 through the
             forwarded port (build cache hit, agent wait, service start included)
  restored   the same `up`, restored from the image's template (made first, timed), and
             with `-e K=V` (restored from that template's ready state for K=V, made
             first, timed) and with `-e K=<new>` (values never seen: the agent state,
             services started from nothing)
  build      warm `mvmctl build examples/hello` (cache hit), end to end
  ping       agent round trip on a running VM (library call, connection included)
  exec       `mvmctl exec hello -- true`, end to end (CLI start-up included)
  cli        `mvmctl --version` (the CLI's own start-up; the baseline for build and exec)
  ls/status  `mvmctl ls` and `mvmctl status NAME` with one VM running, end to end

It also prints the guest's boot timeline (from the VM's event log): when the guest Python
was running, when the init had imported its modules, when services were started and when
the first service was running.

Targets: up→200 ≤ 1.5× floor under TCG; restored ≤ 0.5× floor, with -e ≤ 1.3×; warm
build ≤ 0.5 s; ping ≤ 20 ms; exec ≤ 300 ms; ls and status ≤ 250 ms.
Usage: .venv/bin/python bench/run.py [--runs N] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HELLO = ROOT / "examples" / "hello"
MARKER = b"MVM-BENCH-INIT"


def mvmctl(*args: str, env: dict[str, str], check: bool = True) -> subprocess.CompletedProcess[bytes]:
    exe = Path(sys.executable).with_name("mvmctl")
    return subprocess.run([str(exe), *args], env=env, capture_output=True, check=check)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def summary(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def floor_rootfs(workdir: Path) -> Path:
    """A tiny ext4 root whose /sbin/init is static busybox printing MARKER, then powering off."""
    tree = workdir / "tree"
    (tree / "bin").mkdir(parents=True)
    (tree / "sbin").mkdir()
    for d in ("dev", "proc", "sys"):
        (tree / d).mkdir()
    shutil.copy(shutil.which("busybox") or "/bin/busybox", tree / "bin" / "busybox")
    (tree / "bin" / "sh").symlink_to("busybox")
    init = tree / "sbin" / "init"
    init.write_text(f"#!/bin/sh\necho {MARKER.decode()}\n/bin/busybox poweroff -f\n")
    init.chmod(0o755)
    image = workdir / "floor.ext4"
    subprocess.run(["mkfs.ext4", "-q", "-F", "-T", "default", "-d", str(tree), str(image), "16M"], check=True)
    return image


def boot_floor(kernel: Path, initrd: Path, rootfs: Path) -> float:
    return time_to_marker(floor_argv(kernel, initrd, rootfs))


def floor_argv(kernel: Path, initrd: Path, rootfs: Path) -> list[str]:
    from mvm.backends.qemu_argv import tsc_khz

    return [
        "qemu-system-x86_64", "-M", "microvm,pcie=on,rtc=on", "-accel", "tcg,tb-size=32",
        "-cpu", "qemu64,+rdrand,+arat", "-m", "512M", "-smp", "1", "-nodefaults", "-no-user-config",
        "-nographic", "-no-reboot", "-serial", "stdio", "-kernel", str(kernel), "-initrd", str(initrd),
        "-append", "console=ttyS0 root=/dev/vda rw panic=-1 quiet cryptomgr.notests init=/sbin/init tsc=reliable "
        f"tsc_early_khz={tsc_khz()}",
        "-drive", f"file={rootfs},format=raw,if=none,id=d0,snapshot=on",
        "-device", "virtio-blk-pci,drive=d0",
    ]


def time_to_marker(argv: list[str]) -> float:
    """Seconds from starting the floor VM ``argv`` to its init's marker on the serial port."""
    started = time.monotonic()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        wait_for_marker(proc)
        return time.monotonic() - started
    finally:
        proc.kill()
        proc.wait()


def wait_for_marker(proc: subprocess.Popen[bytes]) -> None:
    """Read ``proc``'s serial output (its stdout) until the floor init's marker."""
    assert proc.stdout is not None
    seen = b""
    while MARKER not in seen:
        chunk = proc.stdout.read1(4096)  # type: ignore[attr-defined]
        if not chunk:
            raise RuntimeError(f"the VM exited without the marker: {seen[-2000:].decode(errors='replace')}")
        seen += chunk


PHASES = ("python_ready", "init_imported", "services_started", "service_running")


def guest_phases(env: dict[str, str]) -> dict[str, float]:
    """Seconds since guest boot at each milestone, from the VM's event log."""
    path = Path(env["MVM_HOME"]) / "state" / "vms" / "bench" / "events.log"
    marks: dict[str, float] = {}
    for line in path.read_text().splitlines():
        ev = json.loads(line)
        if ev.get("msg") == "services started":
            marks.update(python_ready=ev["python_ready"], init_imported=ev["init_imported"],
                         services_started=ev["up"])
        if ev.get("kind") == "service" and ev.get("state") == "running":
            marks.setdefault("service_running", ev["up"])
    return marks


def up_to_first_200(env: dict[str, str], phases: list[dict[str, float]] | None, *extra: str,
                    target: tuple[str, ...] = (str(HELLO),)) -> float:
    """`mvmctl up TARGET --name bench -p P:8080 EXTRA` started -> first HTTP 200 through the
    forward; the guest's boot timeline goes to ``phases``; then `down`."""
    port = free_port()
    exe = Path(sys.executable).with_name("mvmctl")
    started = time.monotonic()
    proc = subprocess.Popen([str(exe), "up", *target, "--name", "bench", "-p", f"{port}:8080", *extra], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        while True:
            try:
                # A client that waits for its answer, as curl and browsers do. (Until
                # 2026-12-01 this gave up after 0.5 s and asked again: that hid the ~1-2 s a
                # waiting client lost when a boot's forwards opened before its network, and
                # made a slow first answer count twice.) Before the forwards open, a
                # connection is refused at once.
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=30) as r:
                    if r.status == 200:
                        elapsed = time.monotonic() - started
                        proc.wait()
                        if phases is not None:
                            phases.append(guest_phases(env))
                        return elapsed
            except OSError:
                pass
            if proc.poll() not in (None, 0):
                raise RuntimeError(f"up failed: {proc.stderr.read().decode() if proc.stderr else ''}")
            if time.monotonic() - started > 120:
                raise RuntimeError("no HTTP 200 within 120 s")
            time.sleep(0.02)
    finally:
        proc.wait()
        mvmctl("down", "bench", env=env, check=False)


def timed(fn: object, runs: int) -> list[float]:
    out = []
    for _ in range(runs):
        started = time.monotonic()
        fn()  # type: ignore[operator]
        out.append(time.monotonic() - started)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args()

    home = Path(tempfile.mkdtemp(prefix="mvm-bench-"))
    env = {**os.environ, "MVM_HOME": str(home)}
    env.setdefault("MVM_CACHE", str(Path.home() / ".cache" / "mvm"))
    os.environ.update(env)
    import mvm

    results: dict[str, dict[str, float]] = {}
    # A user's install has mvm's bytecode compiled (pip compiles it; an editable install writes
    # it on first use unless PYTHONDONTWRITEBYTECODE is set): measure commands, not the compiler.
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(ROOT / "src" / "mvm")], check=True,
                   stdout=subprocess.DEVNULL)
    try:
        print("preparing: building examples/hello (once) ...", file=sys.stderr)
        image = mvm.build(HELLO)
        assert image.initrd is not None
        kernel, initrd = Path(image.path) / image.kernel, Path(image.path) / image.initrd
        for old in mvm.templates():  # made by an earlier run (the cache is shared): make it anew
            if old.image == image.key:
                mvm.template_rm(old.key)
        started = time.monotonic()
        template = mvm.template_create(HELLO)
        results["template_create"] = summary([time.monotonic() - started])
        results["template_mb"] = summary([template.bytes_on_disk / 1e6])
        # the ready state for `-e K=V` that the first such `up` has made in the background
        from mvm._api.template_maker import make_env_state
        from mvm.builders.store import ImageStore
        from mvm.paths import Layout

        layout = Layout.default()
        stored = ImageStore(layout.images).get(image.key)
        assert stored is not None and template.cpus and template.memory
        started = time.monotonic()
        make_env_state(stored, cpus=template.cpus, memory=template.memory, env={"K": "V"}, layout=layout)
        results["env_state_create"] = summary([time.monotonic() - started])
        restore_env = {**env, "MVM_TEMPLATES": "restore"}
        with tempfile.TemporaryDirectory() as tmp:
            rootfs = floor_rootfs(Path(tmp))
            boot_floor(kernel, initrd, rootfs)  # warm the page cache
            floor, up, restored, restored_env, new_env, phases = [], [], [], [], [], []
            for i in range(args.runs):  # interleaved, so drift hits both alike
                floor.append(boot_floor(kernel, initrd, rootfs))
                up.append(up_to_first_200(env, phases, "--cold"))
                restored.append(up_to_first_200(restore_env, None))
                restored_env.append(up_to_first_200(restore_env, None, "-e", "K=V"))
                new_env.append(up_to_first_200(restore_env, None, "-e", f"K=new{i}"))
        results["floor"] = summary(floor)
        results["up_to_200"] = summary(up)
        results["restored_up_to_200"] = summary(restored)
        results["restored_env_up_to_200"] = summary(restored_env)
        results["new_env_up_to_200"] = summary(new_env)
        for phase in PHASES:
            values = [p[phase] for p in phases if phase in p]
            if values:
                results[f"guest_{phase}"] = summary(values)
        results["cli"] = summary(timed(lambda: mvmctl("--version", env=env), args.runs))
        results["build_warm"] = summary(timed(lambda: mvmctl("build", str(HELLO), env=env), args.runs))
        vm = mvm.up(HELLO, name="bench")
        try:
            pings = []
            for _ in range(max(50, args.runs)):
                pings.append(vm.ping())
            results["ping"] = summary(pings)
            results["exec_true"] = summary(timed(lambda: mvmctl("exec", "bench", "--", "true", env=env),
                                                 args.runs))
            results["ls"] = summary(timed(lambda: mvmctl("ls", env=env), args.runs))
            results["status"] = summary(timed(lambda: mvmctl("status", "bench", env=env), args.runs))
        finally:
            vm.down()
    finally:
        shutil.rmtree(home, ignore_errors=True)

    f, u = results["floor"]["median"], results["up_to_200"]["median"]
    r, re_ = results["restored_up_to_200"]["median"], results["restored_env_up_to_200"]["median"]
    rows = [
        ("floor (bare QEMU, same kernel+initrd → init)", results["floor"], None),
        ("mvmctl up --cold → first HTTP 200", results["up_to_200"], f"{u / f:.2f}× floor (target ≤ 1.5×)"),
        ("mvmctl up (restored) → first HTTP 200", results["restored_up_to_200"],
         f"{r / f:.2f}× floor (target ≤ 0.5×)"),
        ("mvmctl up -e K=V (restored) → first HTTP 200", results["restored_env_up_to_200"],
         f"{re_ / f:.2f}× floor (target ≤ 1.3×; its ready state made once)"),
        ("mvmctl up -e K=<new> (restored) → first HTTP 200", results["new_env_up_to_200"],
         f"{results['new_env_up_to_200']['median'] / f:.2f}× floor (values never seen: agent state)"),
        ("ready state for -e K=V (once, in the background)", results["env_state_create"], None),
        ("mvmctl template create (once)", results["template_create"], f"{results['template_mb']['median']:.0f} MB "
         "on disk"),
        ("mvmctl --version (CLI start-up)", results["cli"], None),
        ("warm mvmctl build", results["build_warm"], "target ≤ 0.5 s"),
        ("agent ping", results["ping"], "target ≤ 20 ms"),
        ("mvmctl exec -- true", results["exec_true"], "target ≤ 300 ms"),
        ("mvmctl ls (one VM)", results["ls"], "target ≤ 250 ms"),
        ("mvmctl status NAME", results["status"], "target ≤ 250 ms"),
    ]
    print(f"{'figure':48} {'median':>9} {'min':>9} {'max':>9}  note")
    for label, r, note in rows:
        print(f"{label:48} {r['median']:9.3f} {r['min']:9.3f} {r['max']:9.3f}  {note or ''}")
    print("\nguest boot timeline (seconds since the guest kernel started, median):")
    for phase in PHASES:
        r = results.get(f"guest_{phase}")
        if r:
            print(f"  {phase:20} {r['median']:6.2f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
