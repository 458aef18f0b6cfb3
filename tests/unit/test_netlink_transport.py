"""netlink.py's request/response handling against a fake kernel (a datagram
socketpair): dumps spanning datagrams, ACKs, errors with extended-ACK text,
replies to other requests, and whole kernel-style replies decoded to models."""

from __future__ import annotations

import errno
import ipaddress
import socket
import struct
import threading
from collections.abc import Callable, Iterator

import pytest

from ipvs_synproxy.kernel import netlink
from ipvs_synproxy.kernel.model import Protocol

HDR = struct.Struct("=IHHII")
FAMILY = 0x20


def _nla(kind: int, payload: bytes) -> bytes:
    raw = struct.pack("=HH", 4 + len(payload), kind) + payload
    return raw + bytes(-len(raw) % 4)


def _msg(mtype: int, flags: int, seq: int, body: bytes) -> bytes:
    return HDR.pack(HDR.size + len(body), mtype, flags, seq, 0) + body


def _genl(cmd: int, attrs: bytes) -> bytes:
    return struct.pack("=BBH", cmd, 1, 0) + attrs


def _ack(seq: int, code: int = 0, extack: str = "") -> bytes:
    body = struct.pack("=i", -code) + HDR.pack(HDR.size, FAMILY, 0, seq, 0)
    flags = 0
    if extack:
        body += _nla(netlink.NLMSGERR_ATTR_MSG, extack.encode() + b"\0")
        flags = netlink.NLM_F_ACK_TLVS
    return _msg(netlink.NLMSG_ERROR, flags, seq, body)


class FakeTransport(netlink._Transport):
    def __init__(self, sock: socket.socket) -> None:  # no netlink options, no bind
        self.sock = sock
        self.seq = 0


Answer = Callable[[int], list[bytes]]  # request seq -> datagrams to send back
FakeKernel = tuple[FakeTransport, Callable[[Answer], None]]


@pytest.fixture
def kernel() -> Iterator[FakeKernel]:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    ours.settimeout(5)
    theirs.settimeout(5)
    threads: list[threading.Thread] = []

    def serve(answer: Answer) -> None:
        def run() -> None:
            req = theirs.recv(65536)
            seq = HDR.unpack_from(req)[3]
            for datagram in answer(seq):
                theirs.send(datagram)
        t = threading.Thread(target=run)
        t.start()
        threads.append(t)

    yield FakeTransport(ours), serve
    for t in threads:
        t.join(5)
    ours.close()
    theirs.close()


def _svc_nest(addr: str, port: int, flags: int, conns: int) -> bytes:
    ip = ipaddress.ip_address(addr)
    af = socket.AF_INET if ip.version == 4 else socket.AF_INET6
    stats64 = _nla(1, struct.pack("=Q", conns)) + _nla(4, struct.pack("=Q", 1000))
    return _nla(1, (_nla(1, struct.pack("=H", af)) + _nla(2, struct.pack("=H", 6))
                    + _nla(3, ip.packed.ljust(16, b"\0")) + _nla(4, struct.pack("!H", port))
                    + _nla(6, b"rr\0") + _nla(7, struct.pack("=II", flags | 0x2, 0xFFFFFFFF))
                    + _nla(8, struct.pack("=I", 0)) + _nla(9, b"\xff\xff\xff\xff")
                    + _nla(12, stats64)))


def test_a_dump_spanning_datagrams_yields_every_part(kernel: FakeKernel) -> None:
    t, serve = kernel
    serve(lambda seq: [
        _msg(FAMILY, netlink.NLM_F_MULTI, seq, _genl(1, _svc_nest("198.51.100.10", 80, 0, 1)))
        + _msg(FAMILY, netlink.NLM_F_MULTI, seq, _genl(1, _svc_nest("198.51.100.10", 81, 0, 2))),
        _msg(FAMILY, netlink.NLM_F_MULTI, seq, _genl(1, _svc_nest("2001:db8:1::10", 80, 0, 3))),
        _msg(netlink.NLMSG_DONE, netlink.NLM_F_MULTI, seq, struct.pack("=i", 0)),
    ])
    parts = list(t.request(netlink.build_request(netlink.IPVS_CMD_GET_SERVICE), FAMILY,
                           netlink.NLM_F_REQUEST | netlink.NLM_F_DUMP))
    assert len(parts) == 3


def test_replies_to_other_requests_are_skipped(kernel: FakeKernel) -> None:
    t, serve = kernel
    serve(lambda seq: [_ack(seq + 100, errno.EPERM), _ack(seq)])
    assert list(t.request(netlink.build_request(netlink.IPVS_CMD_FLUSH), FAMILY,
                          netlink.NLM_F_REQUEST | netlink.NLM_F_ACK)) == []


def test_an_error_carries_errno_and_extended_ack_text(kernel: FakeKernel) -> None:
    t, serve = kernel
    serve(lambda seq: [_ack(seq, errno.EINVAL, "missing attribute")])
    with pytest.raises(netlink._KernelError) as info:
        list(t.request(netlink.build_request(netlink.IPVS_CMD_NEW_SERVICE), FAMILY,
                       netlink.NLM_F_REQUEST | netlink.NLM_F_ACK))
    assert (info.value.code, info.value.extack) == (errno.EINVAL, "missing attribute")


def _client(t: FakeTransport) -> netlink.IPVS:
    ipvs = object.__new__(netlink.IPVS)
    ipvs.netns = None
    ipvs._t = t
    ipvs.family_id = FAMILY
    ipvs.ops = {}
    return ipvs


def test_services_keep_flags_and_stats_from_a_kernel_dump(kernel: FakeKernel) -> None:
    t, serve = kernel
    serve(lambda seq: [
        _msg(FAMILY, netlink.NLM_F_MULTI, seq,
             _genl(1, _svc_nest("198.51.100.10", 80, 0x8000 | 0x4, 42))),
        _msg(netlink.NLMSG_DONE, netlink.NLM_F_MULTI, seq, struct.pack("=i", 0)),
    ])
    (svc,) = _client(t).services()
    assert (str(svc.addr), svc.port, svc.protocol) == ("198.51.100.10", 80, Protocol.TCP)
    assert svc.synproxy and svc.flags == 0x4 and svc.scheduler == "rr"
    assert svc.stats is not None and (svc.stats.conns, svc.stats.inbytes) == (42, 1000)


def test_a_command_the_kernel_lacks_is_refused_before_sending(kernel: FakeKernel) -> None:
    t, _ = kernel
    ipvs = _client(t)
    ipvs.ops = {netlink.IPVS_CMD_GET_SERVICE: netlink.GENL_CMD_CAP_DUMP}
    with pytest.raises(netlink.NotSupported, match="setting the SYN proxy secret"):
        ipvs.set_synproxy_secret(bytes(16))
