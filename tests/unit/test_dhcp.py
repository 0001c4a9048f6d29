"""The guest's DHCP client: packets built and parsed on the host, and the exchange against
a fake server shaped like KubeVirt's masquerade (10.0.2.2, gateway 10.0.2.1)."""

from __future__ import annotations

import socket
import struct

import pytest

from mvm.guest import dhcp

MAC = bytes.fromhex("020000aabbcc")


def _options_of(packet: bytes) -> dict[int, bytes]:
    assert packet[dhcp.HEADER.size:dhcp.HEADER.size + 4] == dhcp.MAGIC
    return dhcp.parse_options(packet[dhcp.HEADER.size + 4:])


def reply(msg_type: int, xid: int, *, mac: bytes = MAC, yiaddr: str = "10.0.2.2",
          options: dict[int, bytes] | None = None) -> bytes:
    """A server's BOOTREPLY, as a DHCP server would build it."""
    header = dhcp.HEADER.pack(
        dhcp.BOOTREPLY, 1, 6, 0, xid, 0, dhcp.FLAG_BROADCAST, b"\0" * 4, socket.inet_aton(yiaddr),
        socket.inet_aton("10.0.2.1"), b"\0" * 4, mac.ljust(16, b"\0"), b"", b"",
    )
    opts = bytes([dhcp.OPT_MESSAGE_TYPE, 1, msg_type])
    for code, value in (options or {}).items():
        opts += bytes([code, len(value)]) + value
    return header + dhcp.MAGIC + opts + bytes([dhcp.OPT_END])


KUBEVIRT_OPTIONS = {
    dhcp.OPT_SERVER_ID: socket.inet_aton("10.0.2.1"),
    dhcp.OPT_SUBNET_MASK: socket.inet_aton("255.255.255.0"),
    dhcp.OPT_ROUTER: socket.inet_aton("10.0.2.1"),
    dhcp.OPT_DNS: socket.inet_aton("10.96.0.10"),
    dhcp.OPT_LEASE_TIME: struct.pack("!I", dhcp.INFINITE),
    dhcp.OPT_MTU: struct.pack("!H", 1450),
    # "default.svc.cluster.local", then "svc.cluster.local" as a pointer into it
    dhcp.OPT_DOMAIN_SEARCH: b"\x07default\x03svc\x07cluster\x05local\x00" + b"\xc0\x08",
}


def test_discover_is_a_broadcast_bootrequest_with_our_mac() -> None:
    packet = dhcp.build_request(dhcp.DISCOVER, 0x12345678, MAC, secs=3)
    fields = dhcp.HEADER.unpack_from(packet)
    op, htype, hlen, hops, xid, secs, flags, ciaddr = fields[:8]
    assert (op, htype, hlen, hops, xid, secs) == (dhcp.BOOTREQUEST, 1, 6, 0, 0x12345678, 3)
    assert flags & dhcp.FLAG_BROADCAST
    assert ciaddr == b"\0" * 4
    assert fields[11][:6] == MAC
    assert len(packet) >= 300  # the BOOTP minimum
    opts = _options_of(packet)
    assert opts[dhcp.OPT_MESSAGE_TYPE] == bytes([dhcp.DISCOVER])
    assert opts[dhcp.OPT_CLIENT_ID] == b"\x01" + MAC
    assert {dhcp.OPT_SUBNET_MASK, dhcp.OPT_ROUTER, dhcp.OPT_DNS, dhcp.OPT_MTU} <= set(opts[dhcp.OPT_PARAMS])
    assert dhcp.OPT_REQUESTED_IP not in opts and dhcp.OPT_SERVER_ID not in opts


def test_request_names_the_offer_and_its_server() -> None:
    packet = dhcp.build_request(dhcp.REQUEST, 7, MAC, requested="10.0.2.2", server="10.0.2.1")
    opts = _options_of(packet)
    assert opts[dhcp.OPT_MESSAGE_TYPE] == bytes([dhcp.REQUEST])
    assert opts[dhcp.OPT_REQUESTED_IP] == socket.inet_aton("10.0.2.2")
    assert opts[dhcp.OPT_SERVER_ID] == socket.inet_aton("10.0.2.1")


def test_renewal_request_carries_ciaddr_only() -> None:
    packet = dhcp.build_request(dhcp.REQUEST, 7, MAC, ciaddr="10.0.2.2")
    assert dhcp.HEADER.unpack_from(packet)[7] == socket.inet_aton("10.0.2.2")
    opts = _options_of(packet)
    assert dhcp.OPT_REQUESTED_IP not in opts and dhcp.OPT_SERVER_ID not in opts


def test_options_skip_padding_stop_at_end_and_concatenate() -> None:
    data = b"\x00\x00" + b"\x06\x04\x01\x02\x03\x04" + b"\x06\x04\x05\x06\x07\x08" + b"\xff" + b"\x03\x04junk"
    assert dhcp.parse_options(data) == {6: bytes(range(1, 9))}
    with pytest.raises(ValueError):
        dhcp.parse_options(b"\x06\x04\x01")


def test_parse_reply_rejects_what_is_not_a_dhcp_reply() -> None:
    assert dhcp.parse_reply(b"short") is None
    assert dhcp.parse_reply(dhcp.build_request(dhcp.DISCOVER, 1, MAC)) is None  # a request, not a reply
    good = reply(dhcp.OFFER, 9)
    assert dhcp.parse_reply(good) is not None
    bad_magic = good[:dhcp.HEADER.size] + b"\0\0\0\0" + good[dhcp.HEADER.size + 4:]
    assert dhcp.parse_reply(bad_magic) is None


def test_lease_from_a_kubevirt_style_ack() -> None:
    parsed = dhcp.parse_reply(reply(dhcp.ACK, 1, options=KUBEVIRT_OPTIONS))
    assert parsed is not None and parsed.message_type == dhcp.ACK
    lease = dhcp.lease_from(parsed)
    assert (lease.address, lease.netmask, lease.router) == ("10.0.2.2", "255.255.255.0", "10.0.2.1")
    assert lease.prefix_len == 24
    assert lease.dns == ["10.96.0.10"]
    assert lease.search == ["default.svc.cluster.local", "svc.cluster.local"]
    assert lease.mtu == 1450 and lease.server == "10.0.2.1"
    assert lease.renew_after is None  # infinite
    assert "10.0.2.2/24 via 10.0.2.1" in lease.describe()


def test_lease_defaults_and_domain_name_fallback() -> None:
    parsed = dhcp.parse_reply(reply(dhcp.ACK, 1, yiaddr="10.0.2.15", options={
        dhcp.OPT_LEASE_TIME: struct.pack("!I", 86400), dhcp.OPT_DOMAIN_NAME: b"example.internal",
    }))
    assert parsed is not None
    lease = dhcp.lease_from(parsed)
    assert lease.netmask == "255.255.255.0" and lease.router is None and lease.mtu is None
    assert lease.search == ["example.internal"]
    assert lease.renew_after == 43200.0


def test_search_list_rfc3397_example() -> None:
    # RFC 3397 section 3: "eng.apple.com" and "marketing.apple.com", the second pointing into the first
    data = b"\x03eng\x05apple\x03com\x00" + b"\x09marketing\xc0\x04"
    assert dhcp.decode_search(data) == ["eng.apple.com", "marketing.apple.com"]
    with pytest.raises(ValueError):
        dhcp.decode_search(b"\xc0\x00")  # points at itself


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class FakeServer:
    """Answers DISCOVER with an OFFER and REQUEST with an ACK (or a scripted NAK), after
    first sending noise: someone else's reply and a reply to another transaction."""

    def __init__(self, clock: FakeClock, *, nak_first: bool = False, silent: bool = False) -> None:
        self.clock = clock
        self.sent: list[bytes] = []
        self.pending: list[bytes] = []
        self.nak_first = nak_first
        self.silent = silent

    def send(self, data: bytes) -> None:
        self.sent.append(data)
        if self.silent:
            return
        xid = dhcp.HEADER.unpack_from(data)[4]
        kind = _options_of(data)[dhcp.OPT_MESSAGE_TYPE][0]
        self.pending.append(reply(dhcp.OFFER, xid, mac=bytes.fromhex("020000000001")))  # another client's
        self.pending.append(reply(dhcp.OFFER, xid ^ 1))  # another transaction
        if kind == dhcp.DISCOVER:
            self.pending.append(reply(dhcp.OFFER, xid, options=KUBEVIRT_OPTIONS))
        elif self.nak_first:
            self.nak_first = False
            self.pending.append(reply(dhcp.NAK, xid, yiaddr="0.0.0.0"))
        else:
            self.pending.append(reply(dhcp.ACK, xid, options=KUBEVIRT_OPTIONS))

    def recv(self, timeout: float) -> bytes | None:
        if self.pending:
            return self.pending.pop(0)
        self.clock.now += timeout  # waited the whole timeout for nothing
        return None


def test_exchange_discover_offer_request_ack() -> None:
    clock = FakeClock()
    server = FakeServer(clock)
    lease = dhcp.Client(server, MAC, clock=clock).acquire()
    assert lease.address == "10.0.2.2" and lease.router == "10.0.2.1"
    kinds = [_options_of(p)[dhcp.OPT_MESSAGE_TYPE][0] for p in server.sent]
    assert kinds == [dhcp.DISCOVER, dhcp.REQUEST]
    request = _options_of(server.sent[1])
    assert request[dhcp.OPT_REQUESTED_IP] == socket.inet_aton("10.0.2.2")
    assert request[dhcp.OPT_SERVER_ID] == socket.inet_aton("10.0.2.1")
    # one transaction id for the whole exchange
    assert dhcp.HEADER.unpack_from(server.sent[0])[4] == dhcp.HEADER.unpack_from(server.sent[1])[4]


def test_a_nak_starts_over() -> None:
    clock = FakeClock()
    server = FakeServer(clock, nak_first=True)
    lease = dhcp.Client(server, MAC, clock=clock).acquire()
    assert lease.address == "10.0.2.2"
    kinds = [_options_of(p)[dhcp.OPT_MESSAGE_TYPE][0] for p in server.sent]
    assert kinds == [dhcp.DISCOVER, dhcp.REQUEST, dhcp.DISCOVER, dhcp.REQUEST]


def test_no_server_gives_up_after_the_attempts_with_growing_waits() -> None:
    clock = FakeClock()
    server = FakeServer(clock, silent=True)
    with pytest.raises(dhcp.DhcpError, match="no DHCP lease after 4 attempts"):
        dhcp.Client(server, MAC, clock=clock).acquire(attempts=4, timeout=1.0)
    assert len(server.sent) == 4
    assert clock.now - 100.0 == pytest.approx(1 + 2 + 4 + 8)
    secs = [dhcp.HEADER.unpack_from(p)[5] for p in server.sent]
    assert secs == [0, 1, 3, 7]


def _finite(address: str = "10.0.2.2", lease_secs: int = 100) -> dhcp.Lease:
    return dhcp.Lease(address, "255.255.255.0", "10.0.2.1", [], [], None, lease_secs, "10.0.2.1")


def test_keep_lease_renews_at_t1_and_applies_changes_only() -> None:
    clock = FakeClock()
    slept: list[float] = []
    applied: list[str] = []
    renewals = iter([_finite(), _finite("10.0.2.9")])

    class Renewer:
        def renew(self, lease: dhcp.Lease) -> dhcp.Lease:
            return next(renewals)

    def sleep(seconds: float) -> bool:
        slept.append(seconds)
        return len(slept) > 2  # stop on the third wait

    dhcp.keep_lease(Renewer(), _finite(), apply=lambda lease: applied.append(lease.address),  # type: ignore[arg-type]
                    report=lambda msg: None, sleep=sleep, clock=clock)
    assert slept == [50.0, 50.0, 50.0]
    assert applied == ["10.0.2.9"]


def test_keep_lease_returns_at_once_for_an_infinite_lease() -> None:
    lease = dhcp.Lease("10.0.2.2", "255.255.255.0", "10.0.2.1", [], [], None, dhcp.INFINITE, None)
    dhcp.keep_lease(object(), lease, apply=lambda _: None, report=lambda _: None,  # type: ignore[arg-type]
                    sleep=lambda _: pytest.fail("slept"))
