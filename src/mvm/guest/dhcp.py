"""A small DHCP client (RFC 2131) for guests that run without an mvm host.

Why: KubeVirt's masquerade binding hands the guest 10.0.2.2/24 with gateway 10.0.2.1 by
DHCP and forwards traffic only to that address; the static 10.0.2.15 that suits QEMU's
user networking under ``mvmctl up`` gets nothing there. The guest has no dhclient (and
forks are slow under emulation), so PID 1 does the four-message exchange itself:
DISCOVER -> OFFER -> REQUEST -> ACK.

How, without a raw socket: a UDP socket on port 68, bound to the interface
(``SO_BINDTODEVICE``) with ``SO_BROADCAST``, sends to 255.255.255.255:67 from 0.0.0.0 while
the interface has no address yet. The BOOTP broadcast flag asks the server to broadcast
its replies too, since a unicast to the offered (not yet configured) address would not be
delivered to the socket. Replies are matched by transaction id and hardware address.

Each attempt waits ``timeout`` seconds for an answer, doubling up to ``MAX_WAIT``; the
``secs`` field counts the time since the exchange began. :func:`keep_lease` renews at T1
(half the lease unless the server says otherwise) and starts over if the lease runs out.
Stdlib only; packet building and parsing are pure functions, tested on the host.
"""

from __future__ import annotations

import os
import select
import socket
import struct
import time

TYPE_CHECKING = False  # not `from typing`: importing typing costs ~35 ms at boot under TCG

if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

BOOTREQUEST, BOOTREPLY = 1, 2
DISCOVER, OFFER, REQUEST, DECLINE, ACK, NAK, RELEASE, INFORM = 1, 2, 3, 4, 5, 6, 7, 8
MAGIC = b"\x63\x82\x53\x63"
CLIENT_PORT, SERVER_PORT = 68, 67
FLAG_BROADCAST = 0x8000
HEADER = struct.Struct("!BBBBIHH4s4s4s4s16s64s128s")  # 236 bytes, then the magic cookie

OPT_PAD, OPT_END = 0, 255
OPT_SUBNET_MASK = 1
OPT_ROUTER = 3
OPT_DNS = 6
OPT_HOSTNAME = 12
OPT_DOMAIN_NAME = 15
OPT_MTU = 26
OPT_BROADCAST = 28
OPT_REQUESTED_IP = 50
OPT_LEASE_TIME = 51
OPT_MESSAGE_TYPE = 53
OPT_SERVER_ID = 54
OPT_PARAMS = 55
OPT_MAX_SIZE = 57
OPT_T1 = 58
OPT_T2 = 59
OPT_CLIENT_ID = 61
OPT_DOMAIN_SEARCH = 119
PARAMS = bytes([OPT_SUBNET_MASK, OPT_ROUTER, OPT_DNS, OPT_HOSTNAME, OPT_DOMAIN_NAME, OPT_MTU, OPT_BROADCAST,
                OPT_LEASE_TIME, OPT_SERVER_ID, OPT_T1, OPT_T2, OPT_DOMAIN_SEARCH])
#: Pad requests to the size of a full BOOTP message (236 + 312 option bytes): some servers,
#: QEMU's slirp among them, read a fixed-size structure.
MIN_SIZE = 548
INFINITE = 0xFFFFFFFF
MAX_WAIT = 8.0
SO_BINDTODEVICE = getattr(socket, "SO_BINDTODEVICE", 25)


class DhcpError(OSError):
    """No lease: no answer in time, or the server refused (NAK)."""


class Reply:
    """A parsed BOOTREPLY: the header fields a client uses, and the raw options."""

    def __init__(self, xid: int, yiaddr: str, chaddr: bytes, options: dict[int, bytes]) -> None:
        self.xid = xid
        self.yiaddr = yiaddr
        self.chaddr = chaddr
        self.options = options

    @property
    def message_type(self) -> int | None:
        value = self.options.get(OPT_MESSAGE_TYPE)
        return value[0] if value else None


class Lease:
    """What the server granted. Times are seconds; ``lease_secs`` is INFINITE for ever."""

    def __init__(self, address: str, netmask: str, router: str | None, dns: list[str], search: list[str],
                 mtu: int | None, lease_secs: int, server: str | None, hostname: str | None = None,
                 t1: int | None = None) -> None:
        self.address = address
        self.netmask = netmask
        self.router = router
        self.dns = dns
        self.search = search
        self.mtu = mtu
        self.lease_secs = lease_secs
        self.server = server
        self.hostname = hostname
        self.t1 = t1

    @property
    def prefix_len(self) -> int:
        return bin(struct.unpack("!I", socket.inet_aton(self.netmask))[0]).count("1")

    @property
    def renew_after(self) -> float | None:
        """Seconds until the lease should be renewed (T1), or None if it never expires."""
        if self.lease_secs == INFINITE:
            return None
        return float(self.t1 if self.t1 is not None and self.t1 < self.lease_secs else self.lease_secs / 2)

    def same_network(self, other: Lease) -> bool:
        return (self.address, self.netmask, self.router, self.mtu) == (
            other.address, other.netmask, other.router, other.mtu)

    def describe(self) -> str:
        via = f" via {self.router}" if self.router else ""
        dns = f", dns {' '.join(self.dns)}" if self.dns else ""
        mtu = f", mtu {self.mtu}" if self.mtu else ""
        lease = "infinite" if self.lease_secs == INFINITE else f"{self.lease_secs}s"
        return f"{self.address}/{self.prefix_len}{via}{dns}{mtu} (lease {lease} from {self.server})"


# --- packets -----------------------------------------------------------------------------


def _option(code: int, value: bytes) -> bytes:
    out = b""
    for i in range(0, max(len(value), 1), 255):  # RFC 3396: long values split into several
        chunk = value[i:i + 255]
        out += bytes([code, len(chunk)]) + chunk
    return out


def build_request(msg_type: int, xid: int, mac: bytes, *, secs: int = 0, ciaddr: str = "0.0.0.0",
                  requested: str | None = None, server: str | None = None, hostname: str | None = None) -> bytes:
    """A client message (DISCOVER, REQUEST, ...), broadcast flag set, padded to MIN_SIZE."""
    header = HEADER.pack(
        BOOTREQUEST, 1, 6, 0, xid, min(secs, 0xFFFF), FLAG_BROADCAST,
        socket.inet_aton(ciaddr), b"\0" * 4, b"\0" * 4, b"\0" * 4,
        mac.ljust(16, b"\0"), b"", b"",
    )
    opts = _option(OPT_MESSAGE_TYPE, bytes([msg_type]))
    opts += _option(OPT_CLIENT_ID, b"\x01" + mac)
    if requested:
        opts += _option(OPT_REQUESTED_IP, socket.inet_aton(requested))
    if server:
        opts += _option(OPT_SERVER_ID, socket.inet_aton(server))
    opts += _option(OPT_MAX_SIZE, struct.pack("!H", 1500))
    if hostname:
        opts += _option(OPT_HOSTNAME, hostname.encode()[:63])
    opts += _option(OPT_PARAMS, PARAMS) + bytes([OPT_END])
    packet = header + MAGIC + opts
    return packet.ljust(MIN_SIZE, b"\0")


def parse_options(data: bytes) -> dict[int, bytes]:
    """Options -> {code: value}; repeated options are concatenated (RFC 3396)."""
    options: dict[int, bytes] = {}
    i = 0
    while i < len(data):
        code = data[i]
        if code == OPT_END:
            break
        if code == OPT_PAD:
            i += 1
            continue
        if i + 1 >= len(data):
            raise ValueError("option truncated")
        length = data[i + 1]
        value = data[i + 2:i + 2 + length]
        if len(value) != length:
            raise ValueError(f"option {code} truncated")
        options[code] = options.get(code, b"") + value
        i += 2 + length
    return options


def parse_reply(data: bytes) -> Reply | None:
    """A BOOTREPLY with the DHCP cookie, else None (not for a DHCP client)."""
    if len(data) < HEADER.size + len(MAGIC):
        return None
    fields = HEADER.unpack_from(data)
    op, htype, hlen, xid, yiaddr, chaddr = fields[0], fields[1], fields[2], fields[4], fields[8], fields[11]
    if op != BOOTREPLY or htype != 1 or data[HEADER.size:HEADER.size + 4] != MAGIC:
        return None
    try:
        options = parse_options(data[HEADER.size + 4:])
    except ValueError:
        return None
    return Reply(xid, socket.inet_ntoa(yiaddr), chaddr[:hlen], options)


def _addresses(value: bytes | None) -> list[str]:
    if not value:
        return []
    return [socket.inet_ntoa(value[i:i + 4]) for i in range(0, len(value) - len(value) % 4, 4)]


def _u32(value: bytes | None) -> int | None:
    return struct.unpack("!I", value[:4])[0] if value and len(value) >= 4 else None


def decode_search(data: bytes) -> list[str]:
    """Option 119 (RFC 3397): DNS names in wire format, with compression pointers that may
    point anywhere earlier in the option."""
    names: list[str] = []
    i = 0
    while i < len(data):
        labels: list[str] = []
        pos, jumped, end, hops = i, False, i, 0
        while True:
            if pos >= len(data):
                raise ValueError("search list truncated")
            length = data[pos]
            if length == 0:
                if not jumped:
                    end = pos + 1
                break
            if length & 0xC0 == 0xC0:
                if pos + 1 >= len(data):
                    raise ValueError("search list pointer truncated")
                if not jumped:
                    end = pos + 2
                pos = ((length & 0x3F) << 8) | data[pos + 1]
                jumped = True
                hops += 1
                if hops > 64:
                    raise ValueError("search list pointer loop")
                continue
            labels.append(data[pos + 1:pos + 1 + length].decode("ascii", "replace"))
            pos += 1 + length
        names.append(".".join(labels))
        i = end
    return [n for n in names if n]


def lease_from(reply: Reply) -> Lease:
    opts = reply.options
    routers = _addresses(opts.get(OPT_ROUTER))
    servers = _addresses(opts.get(OPT_SERVER_ID))
    mask = _addresses(opts.get(OPT_SUBNET_MASK))
    search: list[str] = []
    if OPT_DOMAIN_SEARCH in opts:
        try:
            search = decode_search(opts[OPT_DOMAIN_SEARCH])
        except ValueError:
            search = []
    if not search and opts.get(OPT_DOMAIN_NAME):
        search = [opts[OPT_DOMAIN_NAME].decode("ascii", "replace").strip("\0 ")]
    mtu = opts.get(OPT_MTU)
    hostname = opts.get(OPT_HOSTNAME)
    lease = _u32(opts.get(OPT_LEASE_TIME))
    return Lease(
        address=reply.yiaddr,
        netmask=mask[0] if mask else "255.255.255.0",
        router=routers[0] if routers else None,
        dns=_addresses(opts.get(OPT_DNS)),
        search=[s for s in search if s],
        mtu=struct.unpack("!H", mtu[:2])[0] if mtu and len(mtu) >= 2 else None,
        lease_secs=INFINITE if lease is None else lease,
        server=servers[0] if servers else None,
        hostname=hostname.decode("ascii", "replace").strip("\0") if hostname else None,
        t1=_u32(opts.get(OPT_T1)),
    )


# --- the exchange --------------------------------------------------------------------------


class UdpTransport:
    """Broadcast UDP on one interface, before it has an address."""

    def __init__(self, ifname: str) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_UDP)
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
            self.sock.setsockopt(socket.SOL_SOCKET, SO_BINDTODEVICE, ifname.encode() + b"\0")
            self.sock.bind(("0.0.0.0", CLIENT_PORT))
        except OSError:
            self.sock.close()
            raise

    def send(self, data: bytes) -> None:
        self.sock.sendto(data, ("255.255.255.255", SERVER_PORT))

    def recv(self, timeout: float) -> bytes | None:
        ready, _, _ = select.select([self.sock], [], [], max(0.0, timeout))
        if not ready:
            return None
        return self.sock.recv(4096)

    def close(self) -> None:
        self.sock.close()


class Client:
    """One interface's DHCP conversation. ``transport`` needs ``send(bytes)`` and
    ``recv(timeout) -> bytes | None`` (a fake one in tests)."""

    def __init__(self, transport: Any, mac: bytes, *, hostname: str | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.transport = transport
        self.mac = mac
        self.hostname = hostname
        self.clock = clock

    def _new_xid(self) -> int:
        return int.from_bytes(os.urandom(4), "big")

    def _await(self, xid: int, wanted: tuple[int, ...], deadline: float) -> Reply | None:
        while True:
            left = deadline - self.clock()
            if left <= 0:
                return None
            data = self.transport.recv(left)
            if data is None:
                return None
            reply = parse_reply(data)
            if reply is None or reply.xid != xid or reply.chaddr != self.mac:
                continue  # someone else's exchange, or not DHCP
            if reply.message_type in wanted:
                return reply

    def acquire(self, attempts: int = 4, timeout: float = 1.0) -> Lease:
        """DISCOVER/OFFER/REQUEST/ACK; raises DhcpError after ``attempts`` tries."""
        began = self.clock()
        wait = timeout
        last = "no DHCP server answered"
        for _ in range(attempts):
            xid = self._new_xid()
            secs = int(self.clock() - began)
            self.transport.send(build_request(DISCOVER, xid, self.mac, secs=secs, hostname=self.hostname))
            offer = self._await(xid, (OFFER,), self.clock() + wait)
            if offer is not None:
                server = _addresses(offer.options.get(OPT_SERVER_ID))
                self.transport.send(build_request(
                    REQUEST, xid, self.mac, secs=int(self.clock() - began), requested=offer.yiaddr,
                    server=server[0] if server else None, hostname=self.hostname,
                ))
                answer = self._await(xid, (ACK, NAK), self.clock() + wait)
                if answer is not None and answer.message_type == ACK:
                    return lease_from(answer)
                last = "the server refused the offered address (NAK)" if answer else "no ACK for the REQUEST"
            wait = min(wait * 2, MAX_WAIT)
        raise DhcpError(f"no DHCP lease after {attempts} attempts: {last}")

    def renew(self, lease: Lease, timeout: float = 2.0) -> Lease:
        """REQUEST for the address we hold (ciaddr set, no server id: RFC 2131 RENEWING)."""
        xid = self._new_xid()
        self.transport.send(build_request(REQUEST, xid, self.mac, ciaddr=lease.address, hostname=self.hostname))
        answer = self._await(xid, (ACK, NAK), self.clock() + timeout)
        if answer is None:
            raise DhcpError("no answer to the lease renewal")
        if answer.message_type == NAK:
            raise DhcpError("the server refused to renew the lease (NAK)")
        return lease_from(answer)


def keep_lease(
    client: Client,
    lease: Lease,
    *,
    apply: Callable[[Lease], None],
    report: Callable[[str], None],
    sleep: Callable[[float], bool],
    clock: Callable[[], float] = time.monotonic,
) -> None:
    """Renew ``lease`` for as long as ``sleep`` returns False (it returns True to stop).

    Renews at T1, retries every so often until the lease runs out, then starts over with
    DISCOVER; ``apply`` is called whenever the address, mask, router or MTU changed.
    """
    while True:
        renew_after = lease.renew_after
        if renew_after is None:
            return  # an infinite lease (KubeVirt's) never needs renewing
        granted_at = clock()
        expires = granted_at + lease.lease_secs
        if sleep(renew_after):
            return
        new: Lease | None = None
        while new is None:
            try:
                new = client.renew(lease)
            except OSError as exc:
                left = expires - clock()
                if left <= 0:
                    report(f"DHCP lease on {lease.address} expired ({exc}); asking again")
                    try:
                        new = client.acquire()
                    except OSError as again:
                        report(f"DHCP: {again}; retrying in 30s")
                        if sleep(30.0):
                            return
                    continue
                if sleep(min(60.0, max(1.0, left / 2))):
                    return
        if not new.same_network(lease):
            report(f"DHCP: new lease {new.describe()}")
            apply(new)
        lease = new
