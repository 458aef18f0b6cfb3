"""The XDP program's maps as the control plane writes them: the Python packing
against the C structs (read from the compiled object's BTF, so a field moved on
either side fails here), and what goes into each map."""

from __future__ import annotations

import ipaddress
import re
import struct
import subprocess

import pytest

from ipvs_synproxy.build import xdp as xdp_build
from ipvs_synproxy.kernel import xdp
from ipvs_synproxy.kernel.model import Protocol, Service


def _btf_structs() -> dict[str, tuple[int, dict[str, int]]]:
    """name -> (size, {member: byte offset}) of the object's structs."""
    obj = xdp_build.build()
    raw = subprocess.run(["bpftool", "btf", "dump", "file", str(obj), "format", "raw"],
                         capture_output=True, text=True, check=True).stdout
    out: dict[str, tuple[int, dict[str, int]]] = {}
    current: dict[str, int] | None = None
    for line in raw.splitlines():
        if m := re.match(r"\[\d+\] STRUCT '(\w+)' size=(\d+)", line):
            current = {}
            out[m.group(1)] = (int(m.group(2)), current)
        elif current is not None and (m := re.match(r"\s+'(\w+)' .*bits_offset=(\d+)", line)):
            current[m.group(1)] = int(m.group(2)) // 8
        else:
            current = None
    return out


def _offsets(fmt: str, names: list[str]) -> dict[str, int]:
    """Byte offsets of the named fields of a struct format (x pads skipped)."""
    out, off = {}, 0
    codes = re.findall(r"\d*[a-zA-Z]", fmt.lstrip("<"))
    it = iter(names)
    for code in codes:
        size = struct.calcsize("<" + code)
        if not code.endswith("x"):
            out[next(it)] = off
        off += size
    return out


def test_config_and_service_key_match_the_programs_structs() -> None:
    structs = _btf_structs()
    size, members = structs["sp_config"]
    assert size == xdp._CONFIG.size
    names = ["secret", "secret_hi", "tai_offset_ns", "period", "mss", "wscale", "sack",
             "timestamp", "ttl", "ready", "generation"]
    ours = _offsets(xdp._CONFIG.format, names)
    ours.pop("secret_hi")
    assert {k: v for k, v in members.items() if k != "pad"} == ours
    size, members = structs["sp_service_key"]
    assert size == xdp._SVC_KEY.size
    assert members == _offsets(xdp._SVC_KEY.format, ["family", "pad", "port", "addr"])
    # one counter per name of the program's enum, in its order
    src = xdp_build.paths.xdp_source().read_text()
    enum = re.findall(r"^\s+SP_XDP_(\w+),", src, re.M)
    assert [e.lower() for e in enum if e != "STAT_MAX"] == list(xdp.STATS)


@pytest.mark.parametrize("addr", ["198.51.100.10", "2001:db8:1::10"])
def test_a_synproxy_tcp_vip_is_keyed_by_family_port_and_address(addr: str) -> None:
    ip = ipaddress.ip_address(addr)
    key = xdp.service_key(Service(addr=ip, port=8080, synproxy=True))
    assert key is not None and len(key) == 20
    assert key[0] == ip.version and key[2:4] == struct.pack("!H", 8080)
    assert key[4:4 + len(ip.packed)] == ip.packed and key[4 + len(ip.packed):] == bytes(
        16 - len(ip.packed))
    assert xdp.vip_of(key) == (f"[{addr}]:8080" if ip.version == 6 else f"{addr}:8080")


def test_what_the_program_does_not_answer_has_no_key() -> None:
    vip = ipaddress.ip_address("198.51.100.10")
    assert xdp.service_key(Service(addr=vip, port=80)) is None          # no SYN proxy
    assert xdp.service_key(Service(addr=vip, port=53, protocol=Protocol.UDP)) is None
    assert xdp.service_key(Service(fwmark=7, synproxy=True)) is None      # the module's


def test_the_config_carries_the_secret_as_the_module_reads_it() -> None:
    secret = bytes(range(16))
    sysctls = {"synproxy_secret_period": 64, "synproxy_mss": 1452, "synproxy_wscale": 7,
               "synproxy_sack": 1, "synproxy_timestamp": 0}
    raw = xdp.config_value(secret, sysctls, 5)
    k0, k1, tai, period, mss, ws, sack, ts, ttl, ready, gen = xdp._CONFIG.unpack(raw)
    # the module: get_unaligned_le64(secret), get_unaligned_le64(secret + 8)
    assert (k0, k1) == struct.unpack("<QQ", secret)
    assert (period, mss, ws, sack, ts, ready, gen) == (64, 1452, 7, 1, 0, 1, 5)
    assert ttl == 64 and tai % 10**9 == 0
