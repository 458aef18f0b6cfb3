"""The sync-message builder the guest tests play a master with: the layout of
ip_vs_sync.c (version 1) and of our options (kernel_patches/UAPI.md)."""

from __future__ import annotations

import struct

from ipvs_synproxy_testbed import syncmsg


def test_an_ipv4_connection_is_36_bytes_before_its_options() -> None:
    c = syncmsg.SyncConn("198.51.100.2", 40000, "198.51.100.10", 80, "192.0.2.11", 80)
    b = c.encode()
    assert len(b) == 36
    assert struct.unpack("!BBHIH", b[:10]) == (0, 6, 36, syncmsg.CONN_F_MASQ,
                                              syncmsg.TCP_S_ESTABLISHED)
    assert b[24:28] == bytes([198, 51, 100, 2]) and b[32:36] == bytes([192, 0, 2, 11])


def test_an_ipv6_connection_is_72_bytes_and_typed_inet6() -> None:
    c = syncmsg.SyncConn("2001:db8:1::2", 40000, "2001:db8:1::10", 80, "2001:db8:2::11", 80)
    b = c.encode()
    assert len(b) == 72 and b[0] == 1


def test_the_size_counts_options_and_padding_lies_between_connections() -> None:
    fnat = syncmsg.fnat_option("192.0.2.100", 1024, toa=3)
    assert fnat == (0x70, bytes.fromhex("0400 03 00 c0000264".replace(" ", "")))
    a = syncmsg.SyncConn("198.51.100.2", 40000, "198.51.100.10", 80, "192.0.2.11", 80,
                         flags=syncmsg.CONN_F_FULLNAT, options=[fnat, (0x5F, b"x")])
    b = syncmsg.SyncConn("198.51.100.2", 40001, "198.51.100.10", 80, "192.0.2.12", 80)
    msg = syncmsg.encode([a, b], syncid=7)
    size_a = 36 + 2 + 8 + 2 + 1
    assert struct.unpack("!HH", a.encode()[2:4] + b"\0\0")[0] == size_a
    pad = -size_a % 4
    assert len(msg) == 8 + size_a + pad + 36
    assert struct.unpack("!BBHBbH", msg[:8]) == (0, 7, len(msg), 2, 1, 0)
    assert msg[8 + size_a:8 + size_a + pad] == b"\0" * pad


def test_the_synproxy_option_is_20_bytes_big_endian() -> None:
    t, d = syncmsg.synproxy_option(isn=0x01020304, seq_delta=-1, ts_delta=5, client_nxt=6,
                                   flags=syncmsg.SP_F_PROXIED | syncmsg.SP_F_TS,
                                   lb_wscale=7, rs_wscale=9, client_wscale=8)
    assert t == 0x71 and len(d) == 20
    assert d[:4] == bytes([3, 7, 9, 8])
    assert struct.unpack("!IIII", d[4:]) == (0x01020304, 0xFFFFFFFF, 5, 6)
