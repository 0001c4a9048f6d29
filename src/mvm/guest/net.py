"""Guest networking for QEMU user-mode networking, set up with ioctls (no forks).

Imported only after the services are started: the socket module is not needed before,
and the network can come up while the services start (see init.py).
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import socket
import struct

SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
SIOCSIFADDR = 0x8916
SIOCSIFNETMASK = 0x891C
SIOCADDRT = 0x890B
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


def configure_network(address: str, netmask: str, gateway: str, dns: str) -> str | None:
    """Bring up lo and the first ethernet device; return its name (None if there is none)."""
    ifaces = sorted(n for n in os.listdir("/sys/class/net") if n != "lo")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        _link_up(sock, "lo")
        if not ifaces:
            return None
        ifname = ifaces[0]
        fcntl.ioctl(sock, SIOCSIFADDR, ifname.encode().ljust(16, b"\0") + _sockaddr(address))
        fcntl.ioctl(sock, SIOCSIFNETMASK, ifname.encode().ljust(16, b"\0") + _sockaddr(netmask))
        _link_up(sock, ifname)
        dev = ctypes.create_string_buffer(ifname.encode())
        # struct rtentry (x86_64/aarch64 native layout)
        route = struct.pack(
            "@L16s16s16sHhLPhPLLH",
            0, _sockaddr("0.0.0.0"), _sockaddr(gateway), _sockaddr("0.0.0.0"),
            RTF_UP | RTF_GATEWAY, 0, 0, 0, 0, ctypes.addressof(dev), 0, 0, 0,
        )
        buf = bytearray(route)
        fcntl.ioctl(sock, SIOCADDRT, buf)
    try:
        with open("/etc/resolv.conf", "w") as f:
            f.write(f"nameserver {dns}\n")
    except OSError:
        pass
    return ifname
