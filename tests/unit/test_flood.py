"""The flood generator's trafgen config, checked by decoding what trafgen makes of it.

trafgen writes to a pcap file when its output device ends in ``.pcap``, so
every kind and family is compiled and sent into a file on the host, and each
frame is decoded here: MACs, spoofed sources inside the pools only, the
target, flags per template, and a correct TCP checksum.
"""

from __future__ import annotations

import ipaddress
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from ipvs_synproxy_testbed import flood, topology

CLIENT_MAC, LB_MAC = "02:00:00:00:01:02", "02:00:00:00:01:01"
FLAG_BITS = {"fin": 0x01, "syn": 0x02, "rst": 0x04, "psh": 0x08, "ack": 0x10, "urg": 0x20,
             "ece": 0x40, "cwr": 0x80}
EXCLUDED = [ipaddress.ip_address(a) for a in
            ("198.51.100.0", "198.51.100.1", "198.51.100.2", "198.51.100.10",
             "198.51.100.255", "2001:db8:1::", "2001:db8:1::1", "2001:db8:1::2",
             "2001:db8:1::10")]

needs_trafgen = pytest.mark.skipif(shutil.which("trafgen") is None,
                                   reason="trafgen (netsniff-ng) not installed: make deps")


def read_pcap(path: Path) -> list[bytes]:
    data = path.read_bytes()
    magic = struct.unpack("<I", data[:4])[0]
    endian = "<" if magic in (0xA1B2C3D4, 0xA1B23C4D) else ">"
    assert struct.unpack(endian + "I", data[20:24])[0] == 1  # Ethernet
    frames, off = [], 24
    while off < len(data):
        incl = struct.unpack(endian + "I", data[off + 8:off + 12])[0]
        frames.append(data[off + 16:off + 16 + incl])
        off += 16 + incl
    return frames


def csum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return s


def decode(frame: bytes) -> dict[str, object]:
    dst, src = frame[0:6].hex(":"), frame[6:12].hex(":")
    etype = struct.unpack("!H", frame[12:14])[0]
    ip = frame[14:]
    if etype == flood.ETH_P_IP:
        ihl = (ip[0] & 0xF) * 4
        total = struct.unpack("!H", ip[2:4])[0]
        assert csum(ip[:ihl]) == 0xFFFF, "IPv4 header checksum"
        proto, s, d = ip[9], ip[12:16], ip[16:20]
        seg = ip[ihl:total]
        pseudo = s + d + struct.pack("!BBH", 0, proto, len(seg))
    else:
        assert etype == flood.ETH_P_IPV6
        plen, proto = struct.unpack("!HB", ip[4:7])
        s, d = ip[8:24], ip[24:40]
        seg = ip[40:40 + plen]
        pseudo = s + d + struct.pack("!IxxxB", len(seg), proto)
    assert proto == 6
    return {"dst_mac": dst, "src_mac": src, "src": ipaddress.ip_address(s),
            "dst": ipaddress.ip_address(d), "sport": struct.unpack("!H", seg[0:2])[0],
            "dport": struct.unpack("!H", seg[2:4])[0], "doff": seg[12] >> 4,
            "flags": seg[13], "csum_ok": csum(pseudo + seg) == 0xFFFF, "len": len(seg)}


def run_trafgen(tmp_path: Path, spec: flood.FloodSpec) -> list[dict[str, object]]:
    cfg = tmp_path / "flood.cfg"
    cfg.write_text(flood.trafgen_config(spec, CLIENT_MAC, LB_MAC))
    out = tmp_path / "flood.pcap"
    res = subprocess.run(flood.trafgen_argv(spec, str(out), str(cfg)), capture_output=True,
                         text=True, timeout=60, check=False)
    assert res.returncode == 0, res.stdout + res.stderr
    sent, seconds = flood.parse_trafgen_output(res.stdout)
    frames = read_pcap(out)
    assert sent == len(frames) == spec.count
    assert seconds is not None
    return [decode(f) for f in frames]


@needs_trafgen
@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize("kind", flood.KINDS)
def test_trafgen_sends_spoofed_segments_from_the_pool_only(
        tmp_path: Path, kind: str, family: int) -> None:
    target = topology.VIP4 if family == 4 else topology.VIP6
    templates = flood.segments(kind)
    spec = flood.FloodSpec(kind=kind, target=target, port=80, count=20 * len(templates),
                           seed=7)
    pkts = run_trafgen(tmp_path, spec)
    pool = set(flood.pool_addresses(family))
    client = ipaddress.ip_network(topology.CLIENT_NET4 if family == 4 else
                                  topology.CLIENT_NET6)
    for i, p in enumerate(pkts):
        seg = templates[i % len(templates)]  # round robin over the templates
        assert p["dst_mac"] == LB_MAC and p["src_mac"] == CLIENT_MAC
        assert str(p["dst"]) == target and p["dport"] == 80
        assert p["src"] in client and str(p["src"]) in pool and p["src"] not in EXCLUDED
        assert 1024 <= p["sport"] <= 65535  # type: ignore[operator]
        assert p["flags"] == sum(FLAG_BITS[f] for f in seg.flags), seg.name
        assert p["doff"] == seg.doff, seg.name
        assert p["csum_ok"], seg.name
    # random sources and ports: a handful of packets already differ
    assert len({p["src"] for p in pkts}) > 5
    assert len({p["sport"] for p in pkts}) > 5


@needs_trafgen
def test_rate_limit_paces_trafgen(tmp_path: Path) -> None:
    spec = flood.FloodSpec(kind="syn", count=40, rate_pps=100)
    cfg = tmp_path / "flood.cfg"
    cfg.write_text(flood.trafgen_config(spec, CLIENT_MAC, LB_MAC))
    res = subprocess.run(flood.trafgen_argv(spec, str(tmp_path / "o.pcap"), str(cfg)),
                         capture_output=True, text=True, timeout=60, check=True)
    sent, seconds = flood.parse_trafgen_output(res.stdout)
    assert sent == 40 and seconds is not None and 0.35 < seconds < 2.0  # 40 gaps of 10 ms


def test_pools_stay_inside_the_client_segment_and_clear_of_its_hosts() -> None:
    v4, v6 = flood.pool_addresses(4), flood.pool_addresses(6)
    assert len(v4) == 127 and v4[0] == "198.51.100.128" and v4[-1] == "198.51.100.254"
    assert len(v6) == 256 and v6[0] == "2001:db8:1::100" and v6[-1] == "2001:db8:1::1ff"
    net4 = ipaddress.ip_network(topology.CLIENT_NET4)
    net6 = ipaddress.ip_network(topology.CLIENT_NET6)
    taken = {a.split("/")[0] for h in topology.HOSTS for i in h.ifaces for a in i.addrs}
    for a in v4 + v6:
        ip = ipaddress.ip_address(a)
        assert ip in (net4 if ip.version == 4 else net6)
        assert a not in taken and ip not in EXCLUDED


def test_config_and_arguments() -> None:
    spec = flood.FloodSpec(kind="syn", target=topology.VIP6, port=8080, count=100,
                           rate_pps=300, seed=1)
    cfg = flood.trafgen_config(spec, CLIENT_MAC, LB_MAC)
    assert cfg.count("{") == 1
    assert f"da={LB_MAC}, sa={CLIENT_MAC}, type=0x86dd" in cfg
    assert "ipv6(sa=2001:db8:1::100, sa[15]=drnd(0, 255), da=2001:db8:1::10" in cfg
    assert "dp=8080" in cfg and "syn" in cfg
    argv = flood.trafgen_argv(spec, "eth0", "/tmp/x.cfg")
    assert argv[:3] == ["trafgen", "-P", "1"]  # one process: see TESTBED-NOTES
    assert argv[argv.index("-o") + 1] == "eth0" and argv[argv.index("-n") + 1] == "100"
    assert argv[argv.index("-t") + 1] == "3333333ns" and argv[argv.index("-E") + 1] == "1"
    v4 = flood.trafgen_config(flood.FloodSpec(), CLIENT_MAC, LB_MAC)
    assert "ipv4(sa=198.51.100.128, sa[3]=drnd(128, 254), da=198.51.100.10" in v4
    assert flood.trafgen_config(flood.FloodSpec(kind="mixed"), CLIENT_MAC, LB_MAC
                                ).count("{") == 4 + len(flood.MALFORMED)


@pytest.mark.parametrize("bad", [
    {"kind": "udp"}, {"target": "192.0.2.11"}, {"target": "8.8.8.8"},
    {"target": "198.51.100.2"}, {"target": "198.51.100.200"}, {"target": "2001:db8:1::150"},
    {"port": 0}, {"count": 0}, {"rate_pps": -5},
])
def test_spec_refuses_what_the_testbed_contract_forbids(bad: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        flood.FloodSpec(**bad)  # type: ignore[arg-type]


def test_flood_arguments() -> None:
    assert flood.Flood(family=6).spec.target == topology.VIP6
    with pytest.raises(ValueError):
        flood.Flood(target=topology.VIP6, family=4)
    with pytest.raises(ValueError):
        flood.Flood(family=5)
    with pytest.raises(ValueError):
        flood.run_flood("syn")  # neither count nor duration


def test_parse_trafgen_output() -> None:
    text = ("     1 packets to schedule\n    54 bytes in total\nRunning! Hang up with ^C!\n\n\n"
            "        1000 packets outgoing\n\n       54000 bytes outgoing\n\n"
            "           1 sec, 999691 usec on CPU0 (1000 packets)\n")
    assert flood.parse_trafgen_output(text) == (1000, pytest.approx(1.999691))
    assert flood.parse_trafgen_output("trafgen: no such device") == (0, None)


def test_nft_script_and_counter() -> None:
    s = flood.nft_script(4)
    assert "add table inet ipvs_sp_flood4\ndelete table inet ipvs_sp_flood4\n" in s
    assert "hook prerouting priority raw" in s and "ip daddr 198.51.100.128/25 counter drop" in s
    assert "ip6 daddr 2001:db8:1::100/120 counter drop" in flood.nft_script(6)
    listing = ('{"nftables": [{"metainfo": {}}, {"table": {"name": "t"}}, '
               '{"rule": {"expr": [{"match": {}}, {"counter": {"packets": 42, "bytes": 1}},'
               ' {"drop": null}]}}]}')
    assert flood.nft_counter(listing) == 42


def test_neighbour_batch_covers_the_pool() -> None:
    add = flood.neigh_batch(4, CLIENT_MAC, "eth0", True)
    assert len(add) == 127
    assert add[0] == f"neigh replace 198.51.100.128 lladdr {CLIENT_MAC} dev eth0 nud permanent"
    delete = flood.neigh_batch(6, CLIENT_MAC, "eth0", False)
    assert delete[-1] == "neigh del 2001:db8:1::1ff dev eth0"
