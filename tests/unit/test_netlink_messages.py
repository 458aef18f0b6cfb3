"""netlink.py message layer: what we encode decodes back to the same values,
including the ipvs-synproxy attributes (UAPI.md), without a kernel."""

from __future__ import annotations

import errno
import ipaddress
import struct

import pytest
from pyroute2.netlink import nla
from pyroute2.netlink.generic import ipvs as pr_ipvs

from ipvs_synproxy.kernel import netlink
from ipvs_synproxy.kernel.model import (
    Dest,
    FwdMethod,
    ProxyProtocol,
    Stats,
    make_dest,
    make_service,
)


def _wire(msg: netlink.IpvsMessage) -> bytes:
    msg["header"]["type"] = 0x20
    msg["header"]["flags"] = netlink.NLM_F_REQUEST
    msg.encode()
    return bytes(msg.data)


def _roundtrip(cmd: int, attrs: list[tuple[str, object]]
               ) -> netlink.IpvsMessage | netlink.IpvsInfoMessage:
    return netlink.decode_reply(_wire(netlink.build_request(cmd, attrs)))


def _nla_types(data: bytes, offset: int = 20) -> list[int]:
    """Attribute type numbers at the top level of a generic-netlink message."""
    out = []
    while offset + 4 <= len(data):
        length, kind = struct.unpack_from("=HH", data, offset)
        out.append(kind & 0x3FFF)
        offset += (length + 3) & ~3
    return out


@pytest.mark.parametrize(("addr", "netmask"), [("198.51.100.10", 24),
                                               ("2001:db8:1::10", 64)])
def test_service_roundtrips_with_synproxy_flag_persistence_and_netmask(
        addr: str, netmask: int) -> None:
    svc = make_service(source="t", addr=addr, port=80, scheduler="rr", synproxy=True,
                       persistent=300, netmask=netmask)
    msg = _roundtrip(netlink.IPVS_CMD_NEW_SERVICE,
                     [("IPVS_CMD_ATTR_SERVICE", netlink.service_attrs(svc))])
    nest = msg.get_attr("IPVS_CMD_ATTR_SERVICE")
    assert nest.get_attr("IPVS_SVC_ATTR_FLAGS")["flags"] & 0x8000
    back = netlink.service_from(nest)
    assert back == svc
    assert back.synproxy and back.persistent == 300 and back.prefix == netmask


def test_ipv4_netmask_is_sent_as_a_network_order_mask() -> None:
    svc = make_service(source="t", addr="198.51.100.10", port=80, persistent=60, netmask=24)
    raw = dict(netlink.service_attrs(svc)["attrs"])["IPVS_SVC_ATTR_NETMASK"]
    assert raw == bytes([255, 255, 255, 0])


def test_service_address_is_a_16_byte_inet_addr() -> None:
    svc = make_service(source="t", addr="198.51.100.10", port=80)
    raw = dict(netlink.service_key_attrs(svc)["attrs"])["IPVS_SVC_ATTR_ADDR"]
    assert raw == ipaddress.ip_address("198.51.100.10").packed + bytes(12)


def test_fwmark_service_roundtrips_without_address() -> None:
    svc = make_service(source="t", fwmark=42, family="ipv6", scheduler="sh")
    attrs = dict(netlink.service_key_attrs(svc)["attrs"])
    assert "IPVS_SVC_ATTR_ADDR" not in attrs
    msg = _roundtrip(netlink.IPVS_CMD_NEW_SERVICE,
                     [("IPVS_CMD_ATTR_SERVICE", netlink.service_attrs(svc))])
    assert netlink.service_from(msg.get_attr("IPVS_CMD_ATTR_SERVICE")) == svc


@pytest.mark.parametrize("fwd", list(FwdMethod))
def test_dest_roundtrips_every_forwarding_method(fwd: FwdMethod) -> None:
    dest = make_dest(source="t", addr="2001:db8:2::11", port=8080, fwd=int(fwd), weight=7,
                     u_thresh=100, l_thresh=10)
    svc = make_service(source="t", addr="2001:db8:1::10", port=80)
    msg = _roundtrip(netlink.IPVS_CMD_NEW_DEST,
                     [("IPVS_CMD_ATTR_SERVICE", netlink.service_key_attrs(svc)),
                      ("IPVS_CMD_ATTR_DEST", netlink.dest_attrs(dest))])
    back = netlink.dest_from(msg.get_attr("IPVS_CMD_ATTR_DEST"), svc.af)
    assert back == dest
    assert back.fwd is fwd


def test_dest_counters_and_stats64_decode() -> None:
    dest = make_dest(source="t", addr="192.0.2.11", port=80)
    nest = netlink.dest_attrs(dest)
    nest["attrs"] += [
        ["IPVS_DEST_ATTR_ACTIVE_CONNS", 3], ["IPVS_DEST_ATTR_INACT_CONNS", 4],
        ["IPVS_DEST_ATTR_STATS64", {"attrs": [["IPVS_STATS_ATTR_CONNS", 2**40],
                                              ["IPVS_STATS_ATTR_INBYTES", 12345]]}],
    ]
    msg = _roundtrip(netlink.IPVS_CMD_NEW_DEST, [("IPVS_CMD_ATTR_DEST", nest)])
    back = netlink.dest_from(msg.get_attr("IPVS_CMD_ATTR_DEST"), 2)
    assert (back.active_conns, back.inact_conns) == (3, 4)
    assert back.stats == Stats(conns=2**40, inbytes=12345)


def test_laddr_command_carries_attribute_7_with_the_uapi_layout() -> None:
    svc = make_service(source="t", addr="198.51.100.10", port=80)
    addr = ipaddress.ip_address("192.0.2.100")
    data = _wire(netlink.build_request(
        netlink.IPVS_CMD_NEW_LADDR,
        [("IPVS_CMD_ATTR_SERVICE", netlink.service_key_attrs(svc)),
         ("IPVS_CMD_ATTR_LADDR", netlink.laddr_attrs(addr))]))
    assert data[16] == 18  # genl cmd
    assert _nla_types(data) == [1, 7]
    # nested: ADDR (1) as a 16-byte inet addr, then ADDR_FAMILY (4)
    off = 20 + struct.unpack_from("=H", data, 20)[0]
    off = (off + 3) & ~3
    assert _nla_types(data[: off + struct.unpack_from("=H", data, off)[0]], off + 4) == [1, 4]
    assert data[off + 8: off + 24] == addr.packed + bytes(12)


def test_laddr_listing_decodes_counters() -> None:
    nest = netlink.laddr_attrs(ipaddress.ip_address("2001:db8:2::101"))
    nest["attrs"] += [["IPVS_LADDR_ATTR_PORT_CONFLICT", 2**33],
                      ["IPVS_LADDR_ATTR_CONN_COUNTS", 17]]
    msg = _roundtrip(netlink.IPVS_CMD_GET_LADDR, [("IPVS_CMD_ATTR_LADDR", nest)])
    la = netlink.laddr_from(msg.get_attr("IPVS_CMD_ATTR_LADDR"), 10)
    assert str(la.addr) == "2001:db8:2::101"
    assert (la.port_conflict, la.conn_counts) == (2**33, 17)


def test_ext_stats_entries_decode_to_a_dict() -> None:
    entries = [["IPVS_EXT_STATS_ATTR_ENTRY",
                {"attrs": [["IPVS_EXT_STATS_ATTR_NAME", name],
                           ["IPVS_EXT_STATS_ATTR_VALUE", value]]}]
               for name, value in (("fullnat_add_toa_ok", 5), ("synproxy_ack_bad", 2**35))]
    data = _wire(netlink.build_request(netlink.IPVS_CMD_GET_EXT_STATS,
                                       [("IPVS_CMD_ATTR_EXT_STATS", {"attrs": entries})]))
    assert _nla_types(data) == [8]
    msg = netlink.decode_reply(data)
    assert netlink.ext_stats_from(msg.get_attr("IPVS_CMD_ATTR_EXT_STATS")) == {
        "fullnat_add_toa_ok": 5, "synproxy_ack_bad": 2**35}


def test_synproxy_secret_is_attribute_9() -> None:
    secret = bytes(range(16))
    data = _wire(netlink.build_request(netlink.IPVS_CMD_SET_SYNPROXY_SECRET,
                                       [("IPVS_CMD_ATTR_SYNPROXY_SECRET", secret)]))
    assert data[16] == 22
    assert _nla_types(data) == [9]
    assert data[24:40] == secret


def test_info_reply_uses_its_own_attribute_numbers() -> None:
    msg = netlink.IpvsInfoMessage()
    msg["cmd"] = netlink.IPVS_CMD_SET_INFO
    msg["version"] = 1
    msg["attrs"] = [["IPVS_INFO_ATTR_VERSION", 0x010201],
                    ["IPVS_INFO_ATTR_CONN_TAB_SIZE", 4096]]
    msg["header"]["type"] = 0x20
    msg.encode()
    back = netlink.decode_reply(bytes(msg.data))
    assert isinstance(back, netlink.IpvsInfoMessage)
    assert back.get_attr("IPVS_INFO_ATTR_CONN_TAB_SIZE") == 4096


def test_inheriting_a_used_pyroute2_class_loses_new_attributes_unless_reset() -> None:
    """The trap _own_nla_table exists for: pyroute2 caches the compiled table on
    the class, and a subclass inherits the cache."""
    pr_ipvs.ipvsmsg()  # make sure pyroute2 compiled its table

    class Naive(pr_ipvs.ipvsmsg):  # type: ignore[misc]
        nla_map = (*pr_ipvs.ipvsmsg.nla_map, ("IPVS_CMD_ATTR_LADDR", "cdata"))

    @netlink._own_nla_table
    class Fixed(pr_ipvs.ipvsmsg):  # type: ignore[misc]
        nla_map = (*pr_ipvs.ipvsmsg.nla_map, ("IPVS_CMD_ATTR_LADDR", "cdata"))

    def encode(cls: type) -> bytes:
        m = cls()
        m["cmd"] = 18
        m["attrs"] = [["IPVS_CMD_ATTR_LADDR", b"\x01\x02\x03\x04"]]
        m["header"]["type"] = 0x20
        m.encode()
        return bytes(m.data)

    assert 7 not in _nla_types(encode(Naive))
    assert _nla_types(encode(Fixed)) == [7]
    assert issubclass(netlink.IpvsMessage, pr_ipvs.ipvsmsg)
    assert issubclass(netlink.IpvsLaddr, nla)


def test_kernel_errors_become_specific_netlink_errors() -> None:
    svc = make_service(source="t", addr="198.51.100.10", port=80)
    err = netlink.IPVS._error(netlink._KernelError(errno.ESRCH, ""), "x",
                              netlink.IPVS._svc_errors(svc))
    assert isinstance(err, netlink.ServiceNotFound)
    assert str(err) == "service 198.51.100.10:80/tcp does not exist"
    err = netlink.IPVS._error(netlink._KernelError(errno.EINVAL, "bad attr"),
                              "adding service", {})
    assert isinstance(err, netlink.InvalidRequest)
    assert "Invalid argument" in str(err) and "bad attr" in str(err)
    assert err.code == errno.EINVAL


def test_unknown_dest_fields_from_the_kernel_are_rejected_loudly() -> None:
    nest = netlink.dest_key_attrs(Dest(addr=ipaddress.ip_address("192.0.2.11")))
    nest["attrs"].append(["IPVS_DEST_ATTR_FWD_METHOD", 4])  # BYPASS: not a dest method
    msg = _roundtrip(netlink.IPVS_CMD_NEW_DEST, [("IPVS_CMD_ATTR_DEST", nest)])
    with pytest.raises(ValueError, match="kernel"):
        netlink.dest_from(msg.get_attr("IPVS_CMD_ATTR_DEST"), 2)


def _nla(kind: int, payload: bytes) -> bytes:
    raw = struct.pack("=HH", 4 + len(payload), kind) + payload
    return raw + bytes(-len(raw) % 4)


def test_kernel_style_laddr_reply_with_pad_attribute_decodes() -> None:
    """What the kernel's nla_put_u64_64bit sends: a PAD attribute (5) ahead of
    the u64 when it would be misaligned."""
    addr = ipaddress.ip_address("192.0.2.101")
    laddr = (_nla(1, addr.packed + bytes(12)) + _nla(4, struct.pack("=H", 2))
             + _nla(5, b"") + _nla(2, struct.pack("=Q", 7)) + _nla(3, struct.pack("=I", 9)))
    svc = _nla(1, struct.pack("=H", 2)) + _nla(2, struct.pack("=H", 6))
    body = struct.pack("=BBH", netlink.IPVS_CMD_NEW_LADDR, 1, 0) + _nla(1, svc) + _nla(7, laddr)
    data = struct.pack("=IHHII", 16 + len(body), 0x20, 2, 1, 0) + body
    msg = netlink.decode_reply(data)
    la = netlink.laddr_from(msg.get_attr("IPVS_CMD_ATTR_LADDR"), 2)
    assert (la.addr, la.port_conflict, la.conn_counts) == (addr, 7, 9)


def _kernel_service(extra: bytes) -> bytes:
    """A GET_SERVICE reply as the kernel builds it: TCP 198.51.100.10:80 plus extra."""
    addr = ipaddress.ip_address("198.51.100.10")
    svc = (_nla(1, struct.pack("=H", 2)) + _nla(2, struct.pack("=H", 6))
           + _nla(3, addr.packed + bytes(12)) + _nla(4, struct.pack("!H", 80))
           + _nla(6, b"rr\0") + _nla(7, struct.pack("=II", 0x8000, 0xffffffff))
           + _nla(8, struct.pack("=I", 0)) + _nla(9, struct.pack("=I", 0xffffffff)) + extra)
    body = struct.pack("=BBH", netlink.IPVS_CMD_NEW_SERVICE, 1, 0) + _nla(1, svc)
    return struct.pack("=IHHII", 16 + len(body), 0x20, 2, 1, 0) + body


def test_service_synproxy_stats_attribute_13_decodes_with_pad() -> None:
    """0029: IPVS_SVC_ATTR_SYNPROXY_STATS (13) nests ext-stats entries (name,
    PAD, u64 value), as nla_put_u64_64bit writes them."""
    def entry(name: str, value: int) -> bytes:
        return _nla(1, _nla(2, name.encode() + b"\0") + _nla(4, b"")
                    + _nla(3, struct.pack("=Q", value)))
    nest = entry("synproxy_syn_received", 12) + entry("synproxy_ack_invalid", 2**40)
    msg = netlink.decode_reply(_kernel_service(_nla(13, nest)))
    svc = netlink.service_from(msg.get_attr("IPVS_CMD_ATTR_SERVICE"))
    assert svc.synproxy and svc.port == 80
    assert svc.sp_stats == {"synproxy_syn_received": 12, "synproxy_ack_invalid": 2**40}


def test_a_service_without_synproxy_stats_has_none() -> None:
    msg = netlink.decode_reply(_kernel_service(b""))
    assert netlink.service_from(msg.get_attr("IPVS_CMD_ATTR_SERVICE")).sp_stats is None


# ---- IPVS_DEST_ATTR_PROXY_PROTOCOL (16, u8; issue 21) ----------------------------------


def _dest_nla_types(dest: Dest, edit: bool = False) -> dict[int, bytes]:
    """The nested dest attributes of a NEW_DEST/SET_DEST request: type -> payload."""
    msg = netlink.build_request(netlink.IPVS_CMD_NEW_DEST, [
        ("IPVS_CMD_ATTR_DEST", netlink.dest_attrs(dest, edit=edit))])
    data = _wire(msg)
    length, kind = struct.unpack_from("=HH", data, 20)
    assert kind & 0x3FFF == 2  # IPVS_CMD_ATTR_DEST
    out, offset = {}, 24
    while offset + 4 <= 20 + length:
        alen, atype = struct.unpack_from("=HH", data, offset)
        out[atype & 0x3FFF] = data[offset + 4:offset + alen]
        offset += (alen + 3) & ~3
    return out


@pytest.mark.parametrize("pp", list(ProxyProtocol))
@pytest.mark.parametrize("addr", ["192.0.2.11", "2001:db8:2::11"])
def test_proxy_protocol_roundtrips_as_attribute_16_a_u8(pp: ProxyProtocol, addr: str) -> None:
    dest = make_dest(source="t", addr=addr, port=80, fwd="fullnat", weight=2,
                     proxy_protocol=str(pp))
    attrs = _dest_nla_types(dest)
    assert attrs[16] == bytes([int(pp)])  # sent even when off: a SET_DEST turning it off
    assert attrs[15] == struct.pack("=H", 0)  # TUN_FLAGS stays 15
    msg = _roundtrip(netlink.IPVS_CMD_SET_DEST, [("IPVS_CMD_ATTR_DEST",
                                                  netlink.dest_attrs(dest))])
    back = netlink.dest_from(msg.get_attr("IPVS_CMD_ATTR_DEST"), 2)
    assert back == dest and back.proxy_protocol is pp


@pytest.mark.parametrize("fwd", [f for f in FwdMethod if f is not FwdMethod.FULLNAT])
def test_new_real_servers_of_other_methods_send_no_proxy_attribute(fwd: FwdMethod) -> None:
    dest = make_dest(source="t", addr="192.0.2.11", port=80, fwd=int(fwd))
    assert 16 not in _dest_nla_types(dest)
    # the kernel keeps an unnamed setting on SET_DEST: an edit says 0 (leaving FULLNAT)
    assert _dest_nla_types(dest, edit=True)[16] == b"\0"


def test_a_dump_without_the_attribute_is_off_and_an_unknown_value_is_refused() -> None:
    dest = make_dest(source="t", addr="192.0.2.11", port=80, fwd="fullnat")
    stock = netlink.dest_attrs(dest)
    stock["attrs"] = [a for a in stock["attrs"] if a[0] != "IPVS_DEST_ATTR_PROXY_PROTOCOL"]
    msg = _roundtrip(netlink.IPVS_CMD_NEW_DEST, [("IPVS_CMD_ATTR_DEST", stock)])
    assert netlink.dest_from(msg.get_attr("IPVS_CMD_ATTR_DEST"), 2).proxy_protocol \
        is ProxyProtocol.OFF
    stock["attrs"].append(["IPVS_DEST_ATTR_PROXY_PROTOCOL", 3])
    msg = _roundtrip(netlink.IPVS_CMD_NEW_DEST, [("IPVS_CMD_ATTR_DEST", stock)])
    with pytest.raises(ValueError, match="unknown PROXY protocol version 3"):
        netlink.dest_from(msg.get_attr("IPVS_CMD_ATTR_DEST"), 2)
