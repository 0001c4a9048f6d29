"""What ``mvmctl stats`` shows of a guest: CPU time and resident memory per service, read
from ``/proc``."""

from __future__ import annotations

import os
import time

TYPE_CHECKING = False  # not `from typing`: importing typing costs ~35 ms at boot under TCG

if TYPE_CHECKING:
    from typing import Any


def usage(services: dict[str, Any]) -> dict[str, Any]:
    """CPU seconds and resident memory of each service (its whole session: the service and
    everything it started) and of the guest, for ``mvmctl stats``."""
    tick = os.sysconf("SC_CLK_TCK")
    page = os.sysconf("SC_PAGE_SIZE")
    by_session: dict[int, list[float]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        session, cpu, rss = int(fields[3]), (int(fields[11]) + int(fields[12])) / tick, int(fields[21]) * page
        total = by_session.setdefault(session, [0.0, 0.0])
        total[0] += cpu
        total[1] += rss
    meminfo: dict[str, int] = {}
    with open("/proc/meminfo") as f:
        for line in f:
            key, value = line.split(":", 1)
            meminfo[key] = int(value.split()[0]) * 1024
    out: dict[str, Any] = {}
    for name, svc in services.items():
        pid = svc.get("pid")
        used = by_session.get(pid, [0.0, 0.0]) if pid else [0.0, 0.0]
        out[name] = {"pid": pid, "cpu_seconds": round(used[0], 3), "memory_bytes": int(used[1])}
    return {"services": out, "memory_total": meminfo.get("MemTotal"),
            "memory_available": meminfo.get("MemAvailable"), "clock": time.monotonic()}
