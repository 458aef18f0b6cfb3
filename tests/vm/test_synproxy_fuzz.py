"""Randomised SYN proxy tests (issue 14: nothing but a valid cookie opens a connection).

Test A floods SYN-proxy services (NAT and FULLNAT) with tens of thousands of
spoofed segments: random flags (SYN and ACK alone weighted up), data offsets,
options that are honest, garbage or lying, payloads, truncated headers and bad
checksums, plus a few ACKs forged with the known cookie secret. Nothing but a
valid cookie may open a connection or reach a real server, every forged ACK
that passes the checks must, and every segment must end in exactly one of the
SYN proxy's outcome counters, for the reason patch 0009's decision table gives
(before 0009, SYN/ACK-like segments opened hundreds of connections).

Test B fuzzes a live proxied connection with its own tuple from both sides,
with sequence numbers far outside the windows (or bad checksums), and checks
that the connection still carries data intact and that new ones are served
(before 0009 a blind RST moved the connection to CLOSE in IPVS's state table
and a SYN with ACK or FIN then hit conn_reuse_mode, which expired it at once).

The randomness comes from one seed, printed by every test and settable with
``SP_FUZZ_SEED=N`` (in the guest: ``vm exec --topology -- env SP_FUZZ_SEED=N
python -m pytest tests/vm/test_synproxy_fuzz.py``; forged cookies also depend
on the epoch, everything else replays byte for byte). Frames are built with
struct (scapy per packet is too slow under TCG) and sent with AF_PACKET sockets.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import os
import random
import socket
import struct
import threading
import time
from collections import Counter
from dataclasses import dataclass

import pytest

from ipvs_synproxy.kernel import cookie
from ipvs_synproxy.kernel.model import FwdMethod
from ipvs_synproxy.kernel.netlink import IPVS
from ipvs_synproxy_testbed import flood, netns
from ipvs_synproxy_testbed.transfer import recv_exact
from tests.vm.helpers import (
    ACK,
    CLIENT_MAC,
    CWR,
    ECE,
    FAMILIES,
    FIN,
    IP,
    LB_MAC,
    METHODS,
    NETS,
    PSH,
    RST,
    SYN,
    URG,
    Capture,
    Net,
    dmesg_lines,
    duplicate_conns,
    ext_stats_file,
    kernel_complaints,
    synproxy_service,
    wait_for,
)
from tests.vm.test_fullnat import LB_SERVER_MAC, RS1_MAC, TOA_KIND

SEED = int(os.environ.get("SP_FUZZ_SEED") or random.SystemRandom().randrange(1 << 32))
TAG = f"[fuzz seed {SEED}; replay: SP_FUZZ_SEED={SEED}]"

# Every segment to a SYN-proxy service that matches no connection ends in
# exactly one of these (a counter the running kernel lacks counts 0).
OUTCOMES = ("synproxy_cookie_sent", "synproxy_no_route", "synproxy_nomem",
            "synproxy_ack_valid", "synproxy_ack_invalid", "synproxy_ack_ts_invalid",
            "synproxy_drop_header", "synproxy_drop_options", "synproxy_drop_csum",
            "synproxy_stray_drop")

SPOOFED_PER_FAMILY = 50_000
FORGED_PER_FAMILY = 48          # ACKs with a cookie made from the known secret
TINY_PER_FAMILY = 200           # TCP shorter than its ports: no service to count for
LIVE_FUZZ = 10_000              # segments per live connection (test B)
BATCH = 200


def _rng(*what: object) -> random.Random:
    return random.Random("/".join(map(str, (SEED, *what))))


def _announce() -> None:
    print(f"\nfuzz seed: {SEED} (replay: SP_FUZZ_SEED={SEED})")


# ---- the cookie reference, with or without timestamp bits and scale-keyed keys ----------

_HAS_WSCALE_KEYS = "wscale" in inspect.signature(cookie.epoch_key).parameters
_HAS_TSECR = "tsecr" in inspect.signature(cookie.check_cookie).parameters


def _keys(secret: bytes, period: int, wscale: int, since: float) -> list[bytes]:
    """The keys of every epoch from ``since`` to now (newest first)."""
    now = int(time.time()) // period
    first = int(since) // period - 1
    if _HAS_WSCALE_KEYS:
        return [cookie.epoch_key(secret, e, wscale) for e in range(now, first - 1, -1)]
    return [cookie.epoch_key(secret, e) for e in range(now, first - 1, -1)]


def _valid_cookie(keys: list[bytes], src: str, dst: str, sport: int, dport: int, seq: int,
                  ack: int, tsecr: int | None = None) -> cookie.SynOptions | None:
    if _HAS_TSECR:
        return cookie.check_cookie(keys, src, dst, sport, dport, seq, ack, tsecr=tsecr)
    return cookie.check_cookie(keys, src, dst, sport, dport, seq, ack)


# ---- raw frames -----------------------------------------------------------------------------


def _csum(data: bytes) -> int:
    """The Internet checksum of data (the 16-bit one's-complement sum, inverted)."""
    if len(data) & 1:
        data += b"\0"
    return (0xFFFF - int.from_bytes(data, "big") % 0xFFFF) % 0xFFFF


def _mac(mac: str) -> bytes:
    return bytes.fromhex(mac.replace(":", ""))


@dataclass(frozen=True)
class Path:
    """Where frames of one direction go: addresses and MACs."""

    version: int
    src: bytes
    dst: bytes
    eth: bytes       # dst MAC + src MAC + ethertype

    @classmethod
    def make(cls, src: str, dst: str, src_mac: str, dst_mac: str) -> Path:
        s, d = IP(src), IP(dst)
        etype = b"\x08\x00" if s.version == 4 else b"\x86\xdd"
        return cls(s.version, s.packed, d.packed, _mac(dst_mac) + _mac(src_mac) + etype)

    def frame(self, seg: bytes, csum: int | None, ident: int = 0) -> bytes:
        """seg (checksum field zero) in an IP header and Ethernet frame; its
        checksum set to csum, or the right one when csum is None."""
        n = len(seg)
        if n >= 18:
            if csum is None:
                csum = self.tcp_csum(seg)
            seg = seg[:16] + csum.to_bytes(2, "big") + seg[18:]
        if self.version == 4:
            h = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + n, ident & 0xFFFF, 0x4000, 64, 6,
                            0, self.src, self.dst)
            h = h[:10] + _csum(h).to_bytes(2, "big") + h[12:]
        else:
            h = struct.pack("!IHBB16s16s", 0x6 << 28, n, 6, 64, self.src, self.dst)
        return self.eth + h + seg

    def tcp_csum(self, seg: bytes) -> int:
        n = len(seg)
        if self.version == 4:
            pseudo = self.src + self.dst + b"\0\x06" + n.to_bytes(2, "big")
        else:
            pseudo = self.src + self.dst + n.to_bytes(4, "big") + b"\0\0\0\x06"
        return _csum(pseudo + seg)


def _bad_csum(good: int, rng: random.Random) -> int:
    """A checksum that is not equivalent to good (0 and 0xFFFF are the same sum)."""
    return (good + rng.randint(1, 0xFFFE)) % 0xFFFF


def _header(sport: int, dport: int, seq: int, ack: int, doff: int, flags: int,
            window: int = 64240, urg: int = 0, reserved: int = 0) -> bytes:
    return struct.pack("!HHIIBBHHH", sport, dport, seq & 0xFFFFFFFF, ack & 0xFFFFFFFF,
                       (doff & 0xF) << 4 | (reserved & 0xF), flags, window, 0, urg)


# ---- random TCP options ---------------------------------------------------------------------

MSS_VALUES = (0, 1, 88, 536, 1220, 1300, 1440, 1460, 8960, 65535)


def _good_options(rng: random.Random, tsecr: int | None = None, ts: bool = False,
                  sack_near: int | None = None) -> bytes:
    """Well-formed options in random order, padded with NOPs (at most 40 bytes)."""
    parts = []
    r = rng.random
    if r() < 0.5:
        mss = rng.choice(MSS_VALUES) if r() < 0.7 else rng.getrandbits(16)
        parts.append(struct.pack("!BBH", 2, 4, mss))
    if r() < 0.4:
        parts.append(struct.pack("!BBB", 3, 3, rng.choice((0, 1, 7, 14, 15, 255))))
    if r() < 0.4:
        parts.append(b"\x04\x02")
    if ts or tsecr is not None or r() < 0.3:
        ecr = rng.getrandbits(32) if tsecr is None else tsecr
        parts.append(struct.pack("!BBII", 8, 10, rng.getrandbits(32), ecr))
    if r() < 0.3:
        n = rng.randint(1, 4)
        if sack_near is None:
            edges = rng.randbytes(8 * n)
        else:
            edges = b"".join(struct.pack("!I", (sack_near + rng.randint(-1 << 16, 1 << 16))
                                         & 0xFFFFFFFF) for _ in range(2 * n))
        parts.append(struct.pack("!BB", 5, 2 + 8 * n) + edges)
    if r() < 0.2:
        parts.append(rng.choice((b"\x01", b"\x01\x01", b"\x00", b"\x01\x00")))
    rng.shuffle(parts)
    opts = b""
    for p in parts:
        if len(opts) + len(p) <= 40:
            opts += p
    return opts + b"\x01" * (-len(opts) % 4)


def _option_starts(opts: bytes) -> list[int]:
    """Offsets of the options with a length byte in well-formed opts."""
    out, i = [], 0
    while i < len(opts):
        if opts[i] in (0, 1):
            i += 1
            continue
        out.append(i)
        i += opts[i + 1]
    return out


def _lying_options(rng: random.Random) -> bytes:
    """Options of which one lies: a length below 2, one running past the
    header, or an option cut off by the header's end."""
    opts = bytearray(_good_options(rng))
    starts = _option_starts(bytes(opts))
    if not starts or rng.random() < 0.3:
        tail = rng.choice((b"\x02", b"\x08", b"\x08\x0a", b"\x02\x04\x05", b"\x05\x0a\x00",
                           b"\x03\x03", b"\x13"))
        return bytes(opts[:40 - len(tail)]) + tail
    i = rng.choice(starts)
    opts[i + 1] = rng.choice((0, 1, min(255, len(opts) - i + rng.randint(1, 24))))
    return bytes(opts)


def _fuzz_options(rng: random.Random, **good: object) -> tuple[bytes, str]:
    r = rng.random()
    if r < 0.3:
        return b"", "none"
    if r < 0.6:
        return _good_options(rng, **good), "good"   # type: ignore[arg-type]
    if r < 0.8:
        return rng.randbytes(rng.randrange(41)), "garbage"
    return _lying_options(rng), "lying"


def _fuzz_flags(rng: random.Random) -> int:
    r = rng.random()
    if r < 0.2:
        return SYN
    if r < 0.4:
        return ACK
    return rng.getrandbits(8)


# ---- what the kernel should make of a segment (for the printout only) ----------------------


def _options_ok(opts: bytes) -> bool:
    """No option with a length below 2 or running past the header."""
    i = 0
    while i < len(opts):
        kind = opts[i]
        if kind == 0:
            return True
        if kind == 1:
            i += 1
            continue
        if i + 1 >= len(opts) or opts[i + 1] < 2 or i + opts[i + 1] > len(opts):
            return False
        i += opts[i + 1]
    return True


def _timestamp(opts: bytes) -> int | None:
    """TSecr of the (last) timestamp option in opts, read as the SYN proxy
    does: up to EOL or the first malformed option."""
    i, tsecr = 0, None
    while i + 1 < len(opts):
        kind, n = opts[i], opts[i + 1]
        if kind == 0:
            break
        if kind == 1:
            i += 1
            continue
        if n < 2 or i + n > len(opts):
            break
        if kind == 8 and n == 10:
            tsecr = int.from_bytes(opts[i + 6:i + 10], "big")
        i += n
    return tsecr


def _seen_tsecr(seg: bytes) -> int | None:
    """The TSecr the SYN proxy reads in a segment that passes its checks."""
    return _timestamp(seg[20:(seg[12] >> 4) * 4]) if len(seg) >= 20 else None


def expected_outcome(seg: bytes, csum_ok: bool) -> str:
    """The outcome the SYN proxy's classification should reach (decision order
    of patch 0009: header, flags, data offset, options, checksum)."""
    if len(seg) < 20:
        return "drop_header"
    flags = seg[13]
    is_syn = flags & (SYN | ACK | RST | FIN) == SYN
    is_ack = flags & (ACK | SYN | RST) == ACK
    if not (is_syn or is_ack):
        return "stray_drop"
    doff = seg[12] >> 4
    if doff < 5 or doff * 4 > len(seg):
        return "drop_header"
    if not _options_ok(seg[20:doff * 4]):
        return "drop_options"
    if not csum_ok:
        return "drop_csum"
    return "syn" if is_syn else "ack"


# ---- test A: spoofed fuzz -------------------------------------------------------------------


@dataclass(frozen=True)
class Spoofed:
    src: str
    sport: int
    dport: int
    seq: int
    ack: int
    flags: int
    tsecr: int | None  # of the timestamp option the SYN proxy sees
    kind: str        # "fuzz" or "forged" (a cookie ACK made with the secret)
    expect: str      # expected_outcome()
    frame: bytes


def _spoofed_segment(rng: random.Random, path: Path, src: str, sport: int, dport: int
                     ) -> Spoofed:
    flags = _fuzz_flags(rng)
    seq, ack = rng.getrandbits(32), rng.getrandbits(32)
    if flags & ACK and rng.random() < 0.3:
        # an ACK with a timestamp and a random TSecr (the cookie's TSval bits)
        opts = _good_options(rng, ts=True)
        how = "good"
    else:
        opts, how = _fuzz_options(rng)
    honest = how == "good" or rng.random() < 0.3
    doff = 5 + (len(opts) + 3) // 4 if honest else rng.randrange(16)
    opts += b"\0" * (-len(opts) % 4 if honest else 0)
    payload = b"" if rng.random() < 0.5 else rng.randbytes(rng.randint(1, 64))
    reserved = rng.randrange(16) if rng.random() < 0.1 else 0
    seg = _header(sport, dport, seq, ack, doff, flags, rng.getrandbits(16),
                  rng.getrandbits(16) if flags & URG else 0, reserved) + opts + payload
    if rng.random() < 0.06:
        seg = seg[:rng.randint(4, 19)]          # the IP header says so too
    csum_ok = rng.random() >= 0.1
    csum = None
    if len(seg) >= 18:
        good = path.tcp_csum(seg)
        csum = good if csum_ok else _bad_csum(good, rng)
    return Spoofed(src, sport, dport, seq, ack, flags, _seen_tsecr(seg),
                   "fuzz", expected_outcome(seg, csum_ok or len(seg) < 18),
                   path.frame(seg, csum, rng.getrandbits(16)))


def _forged_ack(rng: random.Random, path: Path, vip: str, src: str, sport: int, dport: int,
                key: bytes) -> Spoofed:
    """An ACK answering a SYN/ACK that the balancer would have sent (made with
    the secret we set), with random flags beside ACK, options and payload."""
    isn = rng.getrandbits(32)
    syn_opts = cookie.SynOptions(mss=rng.choice(cookie.MSS_TABLE),
                                 wscale=rng.choice((None, 0, 7, 14)),
                                 sack=rng.random() < 0.5, ecn=rng.random() < 0.2)
    ck = cookie.make_cookie(key, src, vip, sport, dport, isn, syn_opts)
    flags = ACK | (rng.choice((0, 0, PSH, FIN, URG, ECE | CWR, rng.getrandbits(8)))
                   & ~(SYN | RST))
    tsecr = None
    if hasattr(cookie, "make_tsval") and rng.random() < 0.4:
        tsecr = cookie.make_tsval(key, src, vip, sport, dport, isn, rng.getrandbits(32))
        if rng.random() < 0.3:
            tsecr ^= rng.randint(1, 0xFF)            # the TSval's cookie bits wrong
    opts = _good_options(rng, tsecr=tsecr) if tsecr is not None else \
        bytes(_fuzz_options(rng)[0])
    if tsecr is None and _timestamp(opts) is not None:
        opts = b""                                    # no TS but the one we chose
    honest = rng.random() < 0.8
    doff = 5 + (len(opts) + 3) // 4 if honest else rng.randrange(16)
    opts += b"\0" * (-len(opts) % 4 if honest else 0)
    payload = b"" if rng.random() < 0.5 else rng.randbytes(rng.randint(1, 64))
    seg = _header(sport, dport, isn + 1, ck + 1, doff, flags) + opts + payload
    csum_ok = rng.random() >= 0.1
    good = path.tcp_csum(seg)
    return Spoofed(src, sport, dport, (isn + 1) & 0xFFFFFFFF, (ck + 1) & 0xFFFFFFFF, flags,
                   _seen_tsecr(seg), "forged", expected_outcome(seg, csum_ok),
                   path.frame(seg, good if csum_ok else _bad_csum(good, rng)))


def _in_receives(version: int) -> int:
    """IP packets lb has received (all interfaces): how far it has got."""
    with netns.netns("lb"):
        if version == 4:
            with open("/proc/thread-self/net/snmp") as f:
                rows = [ln.split() for ln in f if ln.startswith("Ip:")]
            return int(rows[1][rows[0].index("InReceives")])
        with open("/proc/thread-self/net/snmp6") as f:
            for ln in f:
                k, v = ln.split()
                if k == "Ip6InReceives":
                    return int(v)
    raise AssertionError("no Ip6InReceives")


def _send_paced(ns: str, frames: list[bytes], version: int) -> int:
    """Send frames from ns's eth0 in batches, each after lb has received the
    one before (so that no backlog overflows); the number of slow batches."""
    with netns.netns(ns):
        s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
    slow = 0
    with s:
        s.bind(("eth0", 0))
        base = _in_receives(version)
        for k in range(0, len(frames), BATCH):
            for f in frames[k:k + BATCH]:
                s.send(f)
            want = k + len(frames[k:k + BATCH])
            if not wait_for(lambda w=want: _in_receives(version) - base >= w, 10):
                slow += 1
    return slow


def _outcomes(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {k: after.get(k, 0) - before.get(k, 0) for k in OUTCOMES}


def _synproxy_deltas(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {k: after[k] - before.get(k, 0) for k in after
            if k.startswith("synproxy_") and after[k] != before.get(k, 0)}


def _settle(before: dict[str, int], want: int, timeout: float = 60) -> dict[str, int]:
    """Counters once the outcomes add up to want or stop moving for 1.5 s."""
    deadline = time.monotonic() + timeout
    last, since = -1, time.monotonic()
    while time.monotonic() < deadline:
        now = ext_stats_file()
        total = sum(_outcomes(before, now).values())
        if total != last:
            last, since = total, time.monotonic()
        elif (total == want and time.monotonic() - since > 0.3) or \
                time.monotonic() - since > 1.5:
            return now
        time.sleep(0.2)
    return ext_stats_file()


def _spoofed_connections(pool: set[str]) -> list[tuple[str, int, int, str]]:
    """(source, source port, virtual port, state) of lb's connections from the pool."""
    out = []
    for ln in netns.run("lb", ["ipvsadm", "-Lnc"]).stdout.splitlines():
        f = ln.split()
        if not ln.startswith("TCP") or len(f) < 5:
            continue
        addr, _, port = f[3].rpartition(":")
        _, _, vport = f[4].rpartition(":")
        a = str(IP(addr.strip("[]")))
        if a in pool:
            out.append((a, int(port), int(vport), f[2]))
    return out


def _tcp_of(frame: bytes) -> tuple[int, str, str, bytes] | None:
    """(IP version, source, destination, TCP bytes) of a captured frame."""
    etype = frame[12:14]
    if etype == b"\x08\x00" and len(frame) >= 34 and frame[23] == 6:
        ihl = (frame[14] & 0xF) * 4
        total = int.from_bytes(frame[16:18], "big")
        return (4, str(IP(frame[26:30])), str(IP(frame[30:34])),
                frame[14 + ihl:14 + total])
    if etype == b"\x86\xdd" and len(frame) >= 54 and frame[20] == 6:
        plen = int.from_bytes(frame[18:20], "big")
        return 6, str(IP(frame[22:38])), str(IP(frame[38:54])), frame[54:54 + plen]
    return None


def _toa(tcp: bytes, version: int) -> tuple[str, int] | None:
    """The client (address, port) of a TOA option in a TCP header."""
    if len(tcp) < 20:
        return None
    opts, i = tcp[20:(tcp[12] >> 4) * 4], 0
    while i + 1 < len(opts):
        if opts[i] == 0:
            break
        if opts[i] == 1:
            i += 1
            continue
        n = opts[i + 1]
        if opts[i] == TOA_KIND[version] and n >= 8 and i + n <= len(opts):
            return str(IP(opts[i + 4:i + n])), int.from_bytes(opts[i + 2:i + 4], "big")
        i += max(n, 2)
    return None


def _rs_flows(frames: list[bytes], version: int, laddrs: set[str], ports: set[int]
              ) -> dict[tuple[str, int, str, int], tuple[tuple[str, int] | None, bool]]:
    """TCP flows the real servers saw, by (src, sport, dst, dport): the client
    they carry (NAT: the source; FULLNAT: the TOA; None when unknown), and
    whether any of their segments had SYN set."""
    flows: dict[tuple[str, int, str, int], tuple[tuple[str, int] | None, bool]] = {}
    for f in frames:
        t = _tcp_of(f)
        if t is None or t[0] != version or len(t[3]) < 14:
            continue
        _, src, dst, tcp = t
        sport, dport = struct.unpack("!HH", tcp[:4])
        if dport not in ports and sport not in ports:
            continue
        key = (src, sport, dst, dport)
        client = (src, sport) if str(IP(src)) not in laddrs else _toa(tcp, version)
        had, syn = flows.get(key, (None, False))
        flows[key] = (had or client, syn or bool(tcp[13] & SYN))
    return flows


def _ours(flow: tuple[tuple[str, int] | None, bool], pool: set[str]) -> bool:
    """Whether a real server's flow can come from the fuzz. Its segments all
    come from pool addresses, so a flow of another known client is an earlier
    test's connection still closing. A FULLNAT flow of unknown client that
    never carried SYN cannot be new either: IPVS makes a connection only from
    a segment with SYN, and forwards that segment first."""
    client, syn = flow
    return str(IP(client[0])) in pool if client is not None else syn


def _describe(s: Spoofed) -> str:
    return (f"{s.kind} {s.src}:{s.sport}->:{s.dport} flags=0x{s.flags:02x} seq={s.seq:#x} "
            f"ack={s.ack:#x} expect={s.expect} frame={s.frame.hex()}")


@pytest.mark.parametrize("family", FAMILIES)
def test_spoofed_fuzz_opens_nothing_but_valid_cookies(ipvs: IPVS, family: str) -> None:
    """50,000 random segments from spoofed sources to a NAT (port 80) and a
    FULLNAT (port 81) SYN-proxy service: no connection and no packet at a
    real server but for a valid cookie; every segment counted exactly once;
    the kernel says nothing."""
    _announce()
    net: Net = NETS[family]
    v = net.version
    rng = _rng("spoofed", family)
    secret = rng.randbytes(16)
    ipvs.set_synproxy_secret(secret)
    synproxy_service(ipvs, net, FwdMethod.MASQ, port=80)
    synproxy_service(ipvs, net, FwdMethod.FULLNAT, port=81)
    period = int(netns.read_sysctl("lb", "net.ipv4.vs.synproxy_secret_period"))
    wscale = int(netns.read_sysctl("lb", "net.ipv4.vs.synproxy_wscale"))
    pool = flood.pool_addresses(v)
    pool_set = {str(IP(a)) for a in pool}
    paths = {a: Path.make(a, net.vip, CLIENT_MAC, LB_MAC) for a in pool}
    # A flood test just before (test_flood's SYNs to a plain NAT service)
    # leaves SYN_RECV entries from the same pool for a minute: a fuzz SYN on
    # one of their tuples would join it, and they would count as ours.
    assert wait_for(lambda: not _spoofed_connections(pool_set), 120), \
        f"earlier tests' connections from the pool: {_spoofed_connections(pool_set)[:5]}"

    started = time.time()
    t0 = time.monotonic()
    key = _keys(secret, period, wscale, started)[0]
    segs = [_spoofed_segment(rng, paths[src], src, rng.randint(1024, 59999),
                             rng.choice((80, 81)))
            for src in (rng.choice(pool) for _ in range(SPOOFED_PER_FAMILY))]
    forged_ports = rng.sample(range(60000, 65536), FORGED_PER_FAMILY)
    for sport in forged_ports:
        src = rng.choice(pool)
        segs.insert(rng.randrange(len(segs) + 1),
                    _forged_ack(rng, paths[src], net.vip, src, sport, rng.choice((80, 81)),
                                key))
    tiny = [paths[src].frame(_header(rng.randint(1024, 59999), rng.choice((80, 81)), 0, 0, 5,
                                     SYN)[:rng.randrange(4)], None)
            for src in (rng.choice(pool) for _ in range(TINY_PER_FAMILY))]
    built = time.monotonic() - t0

    log = dmesg_lines()
    problems: list[str] = []
    with flood.ReplySink(v) as sink:
        rs1, rs2 = Capture("rs1"), Capture("rs2")
        try:
            before = ext_stats_file()
            t0 = time.monotonic()
            slow = _send_paced("client", [s.frame for s in segs], v)
            sent_in = time.monotonic() - t0
            after = _settle(before, len(segs))
            # segments too short to name a port: no service to count them for
            _send_paced("client", tiny, v)
            time.sleep(2.0)
        finally:
            rs_frames = rs1.stop() + rs2.stop()
        replies = sink.replies()
    conns = _spoofed_connections(pool_set)
    complaints = kernel_complaints(log)

    # which tuples a valid cookie may have opened
    by_tuple: dict[tuple[str, int, int], list[Spoofed]] = {}
    for s in segs:
        by_tuple.setdefault((str(IP(s.src)), s.sport, s.dport), []).append(s)
    keys = _keys(secret, period, wscale, started)

    def cookie_ok(s: Spoofed, ts: bool = True) -> bool:
        return _valid_cookie(keys, s.src, net.vip, s.sport, s.dport, s.seq, s.ack,
                             s.tsecr if ts else None) is not None

    def valid(t: tuple[str, int, int]) -> list[Spoofed]:
        return [s for s in by_tuple.get(t, []) if s.flags & ACK and cookie_ok(s)]

    outcomes = _outcomes(before, after)
    expect = Counter(s.expect for s in segs)
    forged = [s for s in segs if s.kind != "fuzz"]
    print(f"{family}: {len(segs)} segments ({len(forged)} forged cookie ACKs) built in "
          f"{built:.0f} s, sent in {sent_in:.0f} s ({slow} slow batches); lb sent "
          f"{replies} replies to the pool")
    print(f"  expected by class: {dict(sorted(expect.items()))}")
    print(f"  outcome counters:  {outcomes} (sum {sum(outcomes.values())})")
    print(f"  all synproxy deltas: {_synproxy_deltas(before, after)}")

    # (1) connections from spoofed sources: only valid cookies
    opened = {(a, p, vp) for a, p, vp, _ in conns}
    bad_conns = sorted(t for t in opened if not valid(t))
    for t in sorted(opened - set(bad_conns)):
        print(f"  valid cookie opened {t}: {[_describe(s) for s in valid(t)]}")
    if bad_conns:
        flags = Counter(f"0x{s.flags:02x}" for t in bad_conns for s in by_tuple.get(t, []))
        classes = Counter(s.expect for t in bad_conns for s in by_tuple.get(t, []))
        examples = "\n    ".join(_describe(s) for t in bad_conns[:8]
                                 for s in by_tuple.get(t, [])[:2])
        unknown = [t for t in bad_conns if t not in by_tuple]
        problems.append(
            f"{len(bad_conns)} connections from spoofed sources without a valid cookie "
            f"(of {len(opened)} from the pool; states "
            f"{dict(Counter(st for *_, st in conns))}); their segments' flags "
            f"{dict(flags.most_common(12))}, classes {dict(classes)}; tuples sent by "
            f"nobody: {unknown[:5]}; e.g.\n    {examples}")

    # (2) nothing at the real servers but the valid cookies' connections
    all_flows = _rs_flows(rs_frames, v, {str(IP(a)) for a in net.laddrs}, {80, 81})
    flows = {k: f[0] for k, f in all_flows.items() if _ours(f, pool_set)}
    if len(flows) != len(all_flows):
        print(f"  earlier tests' flows at the real servers: "
              f"{[k for k in all_flows if k not in flows][:8]}")
    bad_flows = {k: c for k, c in flows.items()
                 if c is None or not valid((str(IP(c[0])), c[1], k[3] if k[3] in (80, 81)
                                            else k[1]))}
    if bad_flows:
        n = sum(1 for f in rs_frames if (t := _tcp_of(f)) and t[0] == v)
        problems.append(f"real servers saw {len(bad_flows)} flows without a valid cookie "
                        f"({n} TCP packets in all): {list(bad_flows.items())[:8]}")

    # (3) every segment counted once, and for the reason the decision table
    # of patch 0009 gives (header, flags, data offset, options, checksum; then
    # a SYN is answered and an ACK's cookie checked)
    if sum(outcomes.values()) != len(segs):
        problems.append(f"outcome counters add up to {sum(outcomes.values())}, not the "
                        f"{len(segs)} segments sent: {outcomes}; expected by class "
                        f"{dict(expect)}")
    got = {"syn": outcomes["synproxy_cookie_sent"] + outcomes["synproxy_no_route"]
           + outcomes["synproxy_nomem"],
           "ack": outcomes["synproxy_ack_valid"] + outcomes["synproxy_ack_invalid"]
           + outcomes["synproxy_ack_ts_invalid"],
           **{k: outcomes[f"synproxy_{k}"] for k in
              ("drop_header", "drop_options", "drop_csum", "stray_drop")}}
    if got != {k: expect.get(k, 0) for k in got}:
        problems.append(f"segments counted for other reasons than expected: counted {got}, "
                        f"expected {dict(expect)}")

    # (5) and a valid cookie does open: every forged ACK that gets past the
    # checks reaches a real server (a SYN with its client's tuple)
    at_rs = {(str(IP(c[0])), c[1], k[3] if k[3] in (80, 81) else k[1])
             for k, c in flows.items() if c is not None}
    should = [s for s in forged if s.expect == "ack" and cookie_ok(s)]
    missing = [s for s in should if (str(IP(s.src)), s.sport, s.dport) not in at_rs]
    ts_bad = sum(1 for s in forged if s.expect == "ack" and not cookie_ok(s))
    print(f"  forged: {len(forged)}; {len(should)} should open, {len(missing)} did not; "
          f"{ts_bad} with wrong TSecr bits; {len(opened)} connections from the pool listed")
    if missing:
        problems.append(f"{len(missing)} of {len(should)} forged cookie ACKs never reached "
                        f"a real server: " + "; ".join(_describe(s) for s in missing[:5]))
    if outcomes["synproxy_ack_valid"] < len(should) or \
            outcomes["synproxy_ack_ts_invalid"] < ts_bad:
        problems.append(f"forged cookie ACKs: {len(should)} valid and {ts_bad} with wrong "
                        f"TSecr bits sent, counted {outcomes['synproxy_ack_valid']} valid and "
                        f"{outcomes['synproxy_ack_ts_invalid']} ts_invalid")

    # (4) the kernel says nothing
    if complaints:
        problems.append(f"kernel complaints: {complaints[:10]}")
    assert not problems, f"{TAG} {family}:\n" + "\n".join(problems)


# ---- test B: fuzz on live connections -------------------------------------------------------


class EchoServer:
    """Echoes every connection's bytes back until EOF; records the peers."""

    def __init__(self, ns: str, addr: str, port: int) -> None:
        fam = socket.AF_INET6 if ":" in addr else socket.AF_INET
        self.sock = netns.socket_in(ns, fam, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if fam == socket.AF_INET6:
            self.sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        self.sock.bind((addr, port))
        self.sock.listen(16)
        self.peers: list[tuple[str, int]] = []
        self.conns: list[socket.socket] = []
        self.errors: list[str] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, peer = self.sock.accept()
            except OSError:
                return
            self.peers.append((str(IP(peer[0])), peer[1]))
            self.conns.append(conn)
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    def _echo(self, conn: socket.socket) -> None:
        try:
            while data := conn.recv(65536):
                conn.sendall(data)
            conn.shutdown(socket.SHUT_WR)
        except OSError as exc:
            self.errors.append(repr(exc))

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self._thread.join(5)
        for c in self.conns:
            with contextlib.suppress(OSError):
                c.close()


def _echo(sock: socket.socket, data: bytes) -> bytes:
    """Send data and read as many bytes back (a sender thread for big data)."""
    if len(data) <= 4096:
        sock.sendall(data)
        return recv_exact(sock, len(data))
    err: list[BaseException] = []

    def send() -> None:
        try:
            sock.sendall(data)
        except BaseException as exc:     # reported by the reader's check
            err.append(exc)

    t = threading.Thread(target=send, daemon=True)
    t.start()
    h, got, buf = hashlib.sha256(), 0, bytearray(256 * 1024)
    while got < len(data):
        k = sock.recv_into(buf, min(len(buf), len(data) - got))
        if not k:
            raise ConnectionError(f"EOF after {got} of {len(data)} bytes echoed; {err}")
        h.update(memoryview(buf)[:k])
        got += k
    t.join(30)
    if err:
        raise ConnectionError(f"sending failed: {err[0]!r}")
    return data if h.digest() == hashlib.sha256(data).digest() else b"<changed>"


def _last_seqs(frames: list[bytes], version: int, src: str, sport: int, dport: int
               ) -> tuple[int, int]:
    """(next seq, ack) of the last captured segment from src:sport to dport."""
    last = None
    for f in frames:
        t = _tcp_of(f)
        if t is None or t[0] != version or t[1] != src or len(t[3]) < 20:
            continue
        tcp = t[3]
        if struct.unpack("!HH", tcp[:4]) != (sport, dport):
            continue
        doff = (tcp[12] >> 4) * 4
        seq, ack = struct.unpack("!II", tcp[4:12])
        last = ((seq + len(tcp) - doff + bool(tcp[13] & (SYN | FIN))) & 0xFFFFFFFF, ack)
    assert last is not None, f"{TAG} no segment {src}:{sport} -> :{dport} captured"
    return last


def _live_flags(rng: random.Random) -> int:
    r = rng.random()
    for p, flags in ((0.25, ACK), (0.40, ACK | PSH), (0.47, RST), (0.52, RST | ACK),
                     (0.57, SYN), (0.62, SYN | ACK), (0.67, FIN | ACK)):
        if r < p:
            return flags
    return rng.getrandbits(8)


def _live_segment(rng: random.Random, path: Path, sport: int, dport: int, snd_nxt: int,
                  rcv_nxt: int) -> tuple[bytes, str]:
    """A fuzzed segment of the connection: sequence numbers far outside the
    window when its checksum is right; a bad checksum sometimes in the window
    (whoever fixed the checksum would let TCP take it)."""
    flags = _live_flags(rng)
    csum_ok = rng.random() >= 0.15
    if not csum_ok and rng.random() < 0.5:
        seq, ack = snd_nxt, rcv_nxt
    else:
        seq = snd_nxt + (1 << 31) + rng.randint(-(1 << 29), 1 << 29)
        ack = rcv_nxt + rng.randint(-4096, 4096) if rng.random() < 0.5 else \
            rcv_nxt + (1 << 31) + rng.randint(-(1 << 29), 1 << 29)
    opts, how = _fuzz_options(rng, sack_near=rcv_nxt, ts=rng.random() < 0.5)
    honest = how in ("good", "none") or rng.random() < 0.4
    doff = 5 + (len(opts) + 3) // 4 if honest else rng.randrange(16)
    opts += b"\0" * (-len(opts) % 4 if honest else 0)
    payload = b"" if rng.random() < 0.4 else rng.randbytes(rng.randint(1, 64))
    seg = _header(sport, dport, seq, ack, doff, flags, rng.getrandbits(16),
                  rng.getrandbits(16) if flags & URG else 0) + opts + payload
    if rng.random() < 0.05:
        seg = seg[:rng.randint(4, 19)]
    csum = None
    if len(seg) >= 18:
        good = path.tcp_csum(seg)
        csum = good if csum_ok else _bad_csum(good, rng)
    return path.frame(seg, csum, rng.getrandbits(16)), expected_outcome(seg, csum_ok)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", METHODS)
def test_fuzz_on_a_live_connection_leaves_it_intact(ipvs: IPVS, method: str,
                                                    family: str) -> None:
    """Thousands of fuzzed segments with a live proxied connection's own tuple,
    from the client's side and the real server's: afterwards it still echoes
    megabytes intact, new connections are served, the kernel says nothing."""
    _announce()
    net: Net = NETS[family]
    v = net.version
    rng = _rng("live", method, family)
    port = 9100 + 2 * (method == "fullnat") + (family == "ipv6")
    rs = net.rs["rs1"]
    synproxy_service(ipvs, net, METHODS[method], port=port, servers=("rs1",))
    server = EchoServer("rs1", rs, port)
    log = dmesg_lines()
    fam = socket.AF_INET6 if v == 6 else socket.AF_INET
    try:
        cap_c, cap_rs = Capture("client"), Capture("rs1")
        try:
            sock = netns.socket_in("client", fam, socket.SOCK_STREAM)
            sock.settimeout(30)
            sock.connect((net.vip, port))
            cport = sock.getsockname()[1]
            first = rng.randbytes(100)
            assert _echo(sock, first) == first, f"{TAG} first echo"
            assert wait_for(lambda: bool(server.peers), 10)
            time.sleep(0.5)
        finally:
            client_frames, rs_frames = cap_c.stop(), cap_rs.stop()
        peer, pport = server.peers[0]
        # sequence numbers: the VIP's and the client's in the client's space, the
        # real server's in its own (the client's reach it unchanged)
        v_nxt, c_nxt = _last_seqs(client_frames, v, str(IP(net.vip)), port, cport)
        c_nxt_rs, r_nxt = _last_seqs(rs_frames, v, peer, pport, port)
        assert c_nxt_rs == c_nxt, f"{TAG} client seq {c_nxt:#x} at the client, " \
            f"{c_nxt_rs:#x} at the real server"
        from_client = Path.make(net.client, net.vip, CLIENT_MAC, LB_MAC)
        from_rs = Path.make(rs, peer, RS1_MAC, LB_SERVER_MAC)
        print(f"{method}/{family}: client {net.client}:{cport}, real server sees "
              f"{peer}:{pport}; seqs client {c_nxt:#x} vip {v_nxt:#x} rs {r_nxt:#x}")

        before = ext_stats_file()
        classes: Counter[str] = Counter()
        t0 = time.monotonic()
        with netns.netns("client"):
            out_c = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
        with netns.netns("rs1"):
            out_rs = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
        with out_c, out_rs:
            out_c.bind(("eth0", 0))
            out_rs.bind(("eth0", 0))
            echoed = 0
            for k in range(LIVE_FUZZ // 100):
                for _ in range(100):
                    if rng.random() < 0.5:
                        f, cls = _live_segment(rng, from_client, cport, port, c_nxt, v_nxt)
                        out_c.send(f)
                        classes["client:" + cls] += 1
                    else:
                        f, cls = _live_segment(rng, from_rs, port, pport, r_nxt, c_nxt)
                        out_rs.send(f)
                        classes["rs:" + cls] += 1
                # the connection keeps working in between (and stays in use)
                data = rng.randbytes(rng.randint(1, 1500))
                try:
                    got = _echo(sock, data)
                except OSError as exc:
                    pytest.fail(f"{TAG} {method}/{family}: echo after {100 * (k + 1)} fuzzed "
                                f"segments failed: {exc!r}; counters "
                                f"{_synproxy_deltas(before, ext_stats_file())}")
                assert got == data, f"{TAG} {method}/{family}: echo changed after " \
                    f"{100 * (k + 1)} fuzzed segments: sent {data[:16].hex()}…, got " \
                    f"{got[:16].hex()}…"
                c_nxt, v_nxt, r_nxt = c_nxt + len(data), v_nxt + len(data), r_nxt + len(data)
                echoed += len(data)
        fuzz_s = time.monotonic() - t0
        print(f"  {LIVE_FUZZ} fuzzed segments in {fuzz_s:.0f} s ({dict(sorted(classes.items()))});"
              f" {echoed} bytes echoed between them")

        # the same connection carries megabytes intact
        big = rng.randbytes(3 << 20)
        t0 = time.monotonic()
        try:
            got = _echo(sock, big)
        except OSError as exc:
            pytest.fail(f"{TAG} {method}/{family}: the 3 MB echo after the fuzz failed: "
                        f"{exc!r}; counters {_synproxy_deltas(before, ext_stats_file())}")
        assert got == big, f"{TAG} {method}/{family}: 3 MB echo arrived changed"
        print(f"  3 MB echoed in {time.monotonic() - t0:.1f} s; counters "
              f"{_synproxy_deltas(before, ext_stats_file())}")
        sock.shutdown(socket.SHUT_WR)
        assert sock.recv(1) == b"", f"{TAG} no clean EOF"
        sock.close()

        # new connections through the same VIP are served
        for i in range(2):
            s = netns.socket_in("client", fam, socket.SOCK_STREAM)
            with s:
                s.settimeout(30)
                s.connect((net.vip, port))
                data = rng.randbytes(64 << 10)
                assert _echo(s, data) == data, f"{TAG} new connection {i}"
        assert server.errors == [], f"{TAG} echo server: {server.errors}"
        assert duplicate_conns() == [], f"{TAG} {duplicate_conns()}"
    finally:
        server.close()
    assert kernel_complaints(log) == [], TAG
