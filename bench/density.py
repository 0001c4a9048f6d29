#!/usr/bin/env python3
"""Density and idle cost: N hellos restored from one template next to N booted cold, and
the idle CPU of a guest whose only service sleeps.

For each mode, N VMs are started together (`mvmctl up`, one after the other, without
waiting), the time until every one serves HTTP 200 is taken, they idle for --idle
seconds, and the PSS of their QEMU processes is summed (PSS splits shared pages between
their users: clones share the template's RAM file pages). Then the idle CPU of one guest
(`bench/idle`: a service that sleeps, no health checks) is read from its QEMU process
over --cpu-window seconds, next to hello's (a 5 s curl health check).

Targets (fast-start issue): summed PSS of 10 restored ≤ half that of 10 cold; 10 restored
healthy within 10 s on 2 cores; idle CPU ≤ 1 % of a core with no health checks.
Usage: .venv/bin/python bench/density.py [--vms N] [--idle S] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HELLO = ROOT / "examples" / "hello"
IDLE = ROOT / "bench" / "idle"


def mvmctl(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[bytes]:
    exe = Path(sys.executable).with_name("mvmctl")
    return subprocess.run([str(exe), *args], env=env, capture_output=True, check=True)


def pss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1])
    return 0


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def serves(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=0.5) as r:
            return r.status == 200
    except OSError:
        return False


def fleet(n: int, idle: float, env: dict[str, str], extra: list[str]) -> dict[str, float]:
    names = [f"d{i}" for i in range(n)]
    started = time.monotonic()
    ports = {}
    for name in names:
        port = 20000 + len(ports) + (100 if extra else 0)
        mvmctl("up", str(HELLO), "--name", name, "-p", f"{port}:8080", *extra, env=env)
        ports[name] = port
    pending = set(names)
    while pending and time.monotonic() - started < 300:
        pending = {n for n in pending if not serves(ports[n])}
        time.sleep(0.05)
    all_200 = time.monotonic() - started
    time.sleep(idle)
    rows = json.loads(mvmctl("ls", "--json", env=env).stdout)
    pids = [r["pid"] for r in rows if r["name"] in ports]
    pss = sum(pss_kb(pid) for pid in pids) / 1024
    for name in names:
        mvmctl("down", name, env=env)
    return {"all_200_s": round(all_200, 2), "pss_sum_mb": round(pss, 1), "pss_each_mb": round(pss / n, 1),
            "serving": n - len(pending)}


def idle_cpu(spec: Path, window: float, env: dict[str, str]) -> float:
    mvmctl("up", str(spec), "--name", "idle", "--wait", "--cold", env=env)
    try:
        time.sleep(5)  # past the boot
        (row,) = [r for r in json.loads(mvmctl("ls", "--json", env=env).stdout) if r["name"] == "idle"]
        before, t0 = cpu_seconds(row["pid"]), time.monotonic()
        time.sleep(window)
        return round((cpu_seconds(row["pid"]) - before) / (time.monotonic() - t0) * 100, 2)
    finally:
        mvmctl("down", "idle", env=env)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--vms", type=int, default=10)
    ap.add_argument("--idle", type=float, default=60.0)
    ap.add_argument("--cpu-window", type=float, default=30.0)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    home = Path(tempfile.mkdtemp(prefix="mvm-density-"))
    env = {**os.environ, "MVM_HOME": str(home), "MVM_TEMPLATES": "restore"}
    env.setdefault("MVM_CACHE", str(Path.home() / ".cache" / "mvm"))
    results: dict[str, object] = {}
    try:
        mvmctl("template", "create", str(HELLO), env=env)
        results["restored"] = fleet(args.vms, args.idle, env, [])
        results["cold"] = fleet(args.vms, args.idle, env, ["--cold"])
        results["idle_cpu_percent_sleep_only"] = idle_cpu(IDLE, args.cpu_window, env)
        results["idle_cpu_percent_hello"] = idle_cpu(HELLO, args.cpu_window, env)
    finally:
        subprocess.run([str(Path(sys.executable).with_name("mvmctl")), "down", "--all"], env=env,
                       capture_output=True, check=False)
        shutil.rmtree(home, ignore_errors=True)
    r, c = results["restored"], results["cold"]
    assert isinstance(r, dict) and isinstance(c, dict)
    print(f"{args.vms} restored: all serving after {r['all_200_s']} s (target ≤ 10 s); "
          f"summed PSS {r['pss_sum_mb']} MB after {args.idle:g} s idle")
    print(f"{args.vms} cold:     all serving after {c['all_200_s']} s; summed PSS {c['pss_sum_mb']} MB")
    print(f"PSS ratio restored/cold: {r['pss_sum_mb'] / c['pss_sum_mb']:.2f} (target ≤ 0.5)")
    print(f"idle CPU, a sleeping service, no checks: {results['idle_cpu_percent_sleep_only']} % of a core "
          f"(target ≤ 1 %); hello (5 s health check): {results['idle_cpu_percent_hello']} %")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
