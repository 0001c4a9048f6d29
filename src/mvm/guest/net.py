"""Guest networking, set up with ioctls (no forks).

Under ``mvmctl up`` (QEMU user-mode networking) the address is static: 10.0.2.15/24 via
10.0.2.2 (:func:`configure_network`). A standalone guest (KubeVirt) takes its address by
DHCP (``dhcp.py``) and applies the lease with :func:`configure_lease`, MTU and search
domains included: pod networks often have an MTU below 1500, and cluster DNS needs the
search list to resolve short Service names.

Imported only after the services are started: the socket module is not needed before,
and the network can come up while the services start (see init.py).
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import socket
import struct

from .system import overwrite

SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
SIOCSIFADDR = 0x8916
SIOCSIFNETMASK = 0x891C
SIOCADDRT = 0x890B
SIOCSIFMTU = 0x8922
IFF_UP = 0x1
IFF_RUNNING = 0x40
RTF_UP = 0x1
RTF_GATEWAY = 0x2


def _sockaddr(ip: str) -> bytes:
    return struct.pack("=HH4s8s", socket.AF_INET, 0, socket.inet_aton(ip), b"")


def _link_up(sock: socket.socket, ifname: str) -> None:
    req = struct.pack("16sh22x", ifname.encode(), 0)
    flags = struct.unpack("16sh22x", fcntl.ioctl(sock, SIOCGIFFLAGS, req))[1]
    fcntl.ioctl(sock, SIOCSIFFLAGS, struct.pack("16sh22x", ifname.encode(), flags | IFF_UP | IFF_RUNNING))


def interfaces() -> list[str]:
    """Network devices other than lo, sorted (the first is the one mvm configures)."""
    return sorted(n for n in os.listdir("/sys/class/net") if n != "lo")


def mac_address(ifname: str) -> bytes:
    with open(f"/sys/class/net/{ifname}/address") as f:
        return bytes.fromhex(f.read().strip().replace(":", ""))


def link_up(ifname: str) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        _link_up(sock, ifname)


def _assign(sock: socket.socket, ifname: str, address: str, netmask: str, gateway: str | None) -> None:
    fcntl.ioctl(sock, SIOCSIFADDR, ifname.encode().ljust(16, b"\0") + _sockaddr(address))
    fcntl.ioctl(sock, SIOCSIFNETMASK, ifname.encode().ljust(16, b"\0") + _sockaddr(netmask))
    _link_up(sock, ifname)
    if gateway is None:
        return
    dev = ctypes.create_string_buffer(ifname.encode())
    # struct rtentry (x86_64/aarch64 native layout)
    route = struct.pack(
        "@L16s16s16sHhLPhPLLH",
        0, _sockaddr("0.0.0.0"), _sockaddr(gateway), _sockaddr("0.0.0.0"),
        RTF_UP | RTF_GATEWAY, 0, 0, 0, 0, ctypes.addressof(dev), 0, 0, 0,
    )
    buf = bytearray(route)
    fcntl.ioctl(sock, SIOCADDRT, buf)


def resolv_conf(nameservers: list[str], search: list[str]) -> str:
    lines = [f"search {' '.join(search)}"] if search else []
    lines += [f"nameserver {ns}" for ns in nameservers[:3]]  # the resolver reads at most three
    return "".join(line + "\n" for line in lines)


def _write_resolv_conf(text: str) -> None:
    try:
        overwrite("/etc/resolv.conf", text.encode())
    except OSError:
        pass


def configure_network(address: str, netmask: str, gateway: str, dns: str) -> str | None:
    """Bring up lo and the first ethernet device; return its name (None if there is none)."""
    ifaces = interfaces()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        _link_up(sock, "lo")
        if not ifaces:
            return None
        ifname = ifaces[0]
        _assign(sock, ifname, address, netmask, gateway)
    _write_resolv_conf(resolv_conf([dns], []))
    return ifname


def configure_lease(ifname: str, address: str, netmask: str, gateway: str | None, dns: list[str],
                    search: list[str], mtu: int | None) -> None:
    """Apply a DHCP lease to ``ifname`` (which is already up). Safe to call again with a
    new lease: the address is replaced and an existing default route is kept."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        if mtu and 576 <= mtu <= 65535:
            fcntl.ioctl(sock, SIOCSIFMTU, struct.pack("16si20x", ifname.encode(), mtu))
        try:
            _assign(sock, ifname, address, netmask, gateway)
        except FileExistsError:
            pass  # the default route is already there (a renewal)
    if dns:
        _write_resolv_conf(resolv_conf(dns, search))
