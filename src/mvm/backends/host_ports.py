"""Host ports a VM's forwards ask for, checked before QEMU binds them: QEMU's own failure
names neither the port nor what to do, and a privileged or foreign address fails only there."""

from __future__ import annotations

import errno
import socket
from collections.abc import Sequence
from pathlib import Path

from ..errors import PortInUse, UsageError
from .base import PortForward


def check_ports_free(ports: Sequence[PortForward]) -> None:
    """Fail before starting anything if a host port is taken (QEMU's own error is vague)."""
    seen: set[tuple[str, int, str]] = set()
    first_unprivileged = _unprivileged_port_start()
    for fwd in ports:
        if fwd.host_port == 0:  # QEMU picks a free one when it binds
            continue
        key = (fwd.host_ip, fwd.host_port, fwd.proto)
        if key in seen:
            raise PortInUse(f"host port {fwd.host_port}/{fwd.proto} is given twice",
                            hint="use each host port once")
        seen.add(key)
        if fwd.host_port < first_unprivileged:
            raise PortInUse(
                f"host port {fwd.host_port} is privileged (below {first_unprivileged}), and QEMU, which listens "
                "on it, never runs as root",
                hint=f"use a host port from {first_unprivileged} up, e.g. -p "
                f"{min(max(first_unprivileged, fwd.host_port + 8000), 65535)}:{fwd.guest_port}, "
                f"or let unprivileged processes bind it: sysctl net.ipv4.ip_unprivileged_port_start={fwd.host_port}",
            )
        try:
            _bind_probe(fwd.host_ip, fwd.host_port, fwd.proto)
        except OSError as exc:
            if exc.errno == errno.EADDRNOTAVAIL:  # the address is wrong, not the port
                raise UsageError(
                    f"-p {fwd.host_ip}:{fwd.host_port}:{fwd.guest_port}: {fwd.host_ip} is not an address of this "
                    f"host ({exc.strerror})",
                    hint="give one of its addresses (`ip -brief addr` lists them), 0.0.0.0 for all of them, or "
                    f"none (127.0.0.1): -p {fwd.host_port}:{fwd.guest_port}",
                ) from None
            free = _free_port_after(fwd.host_ip, fwd.host_port, fwd.proto)
            suffix = "" if fwd.proto == "tcp" else "/udp"
            raise PortInUse(
                f"host port {fwd.host_ip}:{fwd.host_port}/{fwd.proto} is not available: {exc.strerror}",
                hint=(f"pick another host port, e.g. -p {free}:{fwd.guest_port}{suffix} (free now)" if free
                      else "pick another host port with -p") + "; see what holds it: ss -lnp",
            ) from None


def _unprivileged_port_start() -> int:
    """The lowest port a process without CAP_NET_BIND_SERVICE may bind (Linux's sysctl)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_unprivileged_port_start").read_text())
    except (OSError, ValueError):
        return 1024


def _bind_probe(host_ip: str, port: int, proto: str) -> None:
    """Bind and release ``port`` as QEMU's slirp would; OSError if it cannot be had."""
    kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
    with socket.socket(socket.AF_INET, kind) as s:
        # QEMU's slirp binds with SO_REUSEADDR, so a TIME_WAIT left by the last VM on this
        # port (after `down`) must not count as "in use" here either.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((host_ip, port))


def _free_port_after(host_ip: str, port: int, proto: str, tries: int = 20) -> int | None:
    """The first port above ``port`` that is free now: a suggestion for the error's hint."""
    for candidate in range(port + 1, min(port + 1 + tries, 65536)):
        try:
            _bind_probe(host_ip, candidate, proto)
        except OSError:
            continue
        return candidate
    return None
