"""Parsers for the values users type: ``-p`` port forwards and ``-e`` environment.

Each error names the offending value and shows the accepted form.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Mapping, Sequence

from ..backends.base import PortForward
from ..errors import UsageError
from ..names import ENV_NAME_RE

PORT_FORMS = ("HOST:GUEST, IP:HOST:GUEST, or GUEST alone (a free host port is picked), optionally with "
              "/tcp or /udp (e.g. -p 8080:8080)")


def _port(text: str, what: str, spec: str) -> int:
    if not re.fullmatch(r"\d{1,5}", text):
        raise UsageError(f"-p {spec!r}: {what} port {text!r} is not a number",
                         hint=f"use {PORT_FORMS}")
    value = int(text)
    if not 1 <= value <= 65535:
        raise UsageError(f"-p {spec!r}: {what} port {value} is out of range (1-65535)",
                         hint=f"use {PORT_FORMS}")
    return value


def parse_port(spec: str) -> PortForward:
    if "," in spec:
        raise UsageError(f"-p {spec!r}: one forward per -p",
                         hint=f"repeat the option: -p {' -p '.join(spec.split(','))}")
    body, _, proto = spec.partition("/")
    proto = proto or "tcp"
    if proto not in ("tcp", "udp"):
        raise UsageError(f"-p {spec!r}: protocol {proto!r} must be tcp or udp", hint=f"use {PORT_FORMS}")
    parts = body.rsplit(":", 2)
    if len(parts) == 1:  # GUEST alone: a free host port is picked (by the hypervisor, so no race)
        return PortForward(host_port=0, guest_port=_port(parts[0], "guest", spec), proto=proto)  # type: ignore[arg-type]
    if len(parts) == 2:
        host_ip, host, guest = "127.0.0.1", parts[0], parts[1]
    elif len(parts) == 3:
        host_ip, host, guest = parts
        try:
            ipaddress.IPv4Address(host_ip)
        except ValueError:
            raise UsageError(f"-p {spec!r}: with three fields the first is the host's IPv4 address "
                             f"(IP:HOST:GUEST), and {host_ip!r} is not one", hint=f"use {PORT_FORMS}") from None
    else:
        raise UsageError(f"-p {spec!r}: expected HOST:GUEST", hint=f"use {PORT_FORMS}")
    return PortForward(
        host_port=_port(host, "host", spec),
        guest_port=_port(guest, "guest", spec),
        host_ip=host_ip,
        proto=proto,  # type: ignore[arg-type]
    )


def parse_env(items: Mapping[str, str] | Sequence[str] | None) -> dict[str, str]:
    """``-e`` values, as ``KEY=VALUE`` strings or a mapping (the API's), each name and value
    checked the same way: the guest would refuse them later, with less to say."""
    if isinstance(items, str):
        raise UsageError(f"env {items!r}: give a list of KEY=VALUE strings or a mapping, not one string")
    pairs: list[tuple[str, object]] = []
    for item in items or ():
        if isinstance(items, Mapping):
            pairs.append((str(item), items[item]))
        elif "=" not in item:
            raise UsageError(f"-e {item!r}: expected KEY=VALUE", hint="e.g. -e LOG_LEVEL=debug")
        else:
            pairs.append(tuple(item.split("=", 1)))  # type: ignore[arg-type]
    env: dict[str, str] = {}
    for key, value in pairs:
        if not ENV_NAME_RE.fullmatch(key):
            raise UsageError(f"-e {f'{key}={value}'!r}: {key!r} is not a valid variable name",
                             hint="names are letters, digits and _, not starting with a digit")
        if not isinstance(value, str):
            raise UsageError(f"-e {key}: the value {value!r} is not a string")
        if "\0" in value:
            raise UsageError(f"-e {key}: the value contains a NUL byte")
        env[key] = value
    return env


SINCE_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_since(text: str, now: float | None = None) -> float:
    """``--since``: a duration back from now (``30s``, ``10m``, ``2h``, ``1d``), an ISO time
    (local time unless it carries an offset) or Unix seconds. Returns Unix time."""
    import time
    from datetime import datetime

    value = text.strip()
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([smhd])", value)
    if match:
        return (time.time() if now is None else now) - float(match.group(1)) * SINCE_UNITS[match.group(2)]
    if re.fullmatch(r"\d+(?:\.\d+)?", value):
        return float(value)
    try:
        return datetime.fromisoformat(value).timestamp()
    except ValueError:
        raise UsageError(f"--since {text!r}: not a duration or a time",
                         hint="e.g. --since 10m, --since 2h, --since 2026-11-30T14:05:00") from None


def check_host_memory(memory: int, where: str, hint: str | None = None) -> None:
    """No more guest memory than the host has with its swap: QEMU failed on that at start-up
    ("cannot set up guest memory: Cannot allocate memory"), after the build and with no hint."""
    total = host_memory_mib()
    if total is not None and memory > total:
        raise UsageError(f"{where}: this host has {total} MiB of memory and swap, and a VM gets at most as much",
                         hint=hint or f"use --memory {total} or less")


def host_memory_mib() -> int | None:
    """MemTotal plus SwapTotal of /proc/meminfo in MiB; None where it cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
        return (int(fields["MemTotal"].split()[0]) + int(fields.get("SwapTotal", "0 kB").split()[0])) // 1024
    except (OSError, KeyError, ValueError):
        return None


def check_host_cpus(cpus: int, where: str, hint: str | None = None) -> None:
    """As ``docker run --cpus``: no more vCPUs than the host has CPUs (each is a host thread;
    more would only make the guest crawl: 64 on 2 cores did not boot in 90 s under TCG)."""
    host_cpus = os.cpu_count() or 1
    if cpus > host_cpus:
        raise UsageError(f"{where}: this host has {host_cpus} CPU{'s' if host_cpus > 1 else ''}, and a VM gets at "
                         "most as many vCPUs", hint=hint or f"use --cpus {host_cpus} or fewer")
