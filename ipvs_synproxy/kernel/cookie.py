"""Reference implementation of the SYN-proxy cookie (the kernel's must match).

The balancer answers a client's SYN with a SYN/ACK whose ISN is the cookie and
keeps no state. The cookie must let it (a) recognise the client's ACK as the
answer to its own SYN/ACK and (b) recover the client's SYN options, without
timestamps (clients with timestamps off must lose nothing).

Layout of the 32-bit ISN::

    31                                  8 7                 0
    +------------------------------------+-------------------+
    |  24-bit integrity: bits 63..40 of h | options XOR h[7:0] |
    +------------------------------------+-------------------+

    h = SipHash-2-4(key, saddr | daddr | sport | dport | client_isn)

with the addresses and ports exactly as they appear in the client's SYN
(network byte order; 4-byte addresses for IPv4, 16-byte for IPv6) and
``client_isn`` the SYN's sequence number, big-endian. The key is the 16-byte
cookie secret read as two little-endian 64-bit words (the kernel's
``siphash_key_t``). The options byte:

    bits 0-1  MSS class: index into MSS_TABLE (largest entry <= the client's MSS)
    bits 2-5  window scale 0..14, or 15 when the client sent none
    bit  6    SACK permitted
    bit  7    ECN requested (SYN had ECE and CWR)

Masking the options with hash bits keeps them from being readable off the
wire; the 24 integrity bits are what an attacker has to guess (1 in 2**24 per
forged ACK and key). When the client sends timestamps, the SYN/ACK's TSval
carries 8 more bits, ``h[39:32]``, in its low byte (the millisecond clock keeps
the rest, :func:`make_tsval`); the client echoes it as TSecr in every ACK, and
an ACK with a timestamp must match those bits too: 1 in 2**32. An ACK without
timestamps is checked against the ISN alone, so a blind attacker, who can
leave timestamps out, still needs 2**24 tries per key (2**23 with the two keys
accepted at once).

There is no time counter in the cookie: the key changes every
``synproxy_secret_period`` seconds and the previous key is still accepted, so
a cookie lives between one and two periods. The key of epoch
``e = unix_time // period`` and window scale ``w`` (the ``synproxy_wscale`` the
SYN/ACK announces) is derived from the secret (see :func:`epoch_key`), so the
key that validates an ACK also says which scale the client was told, and
balancers that share the secret (set over netlink) and ``synproxy_wscale`` and
keep their clocks in step validate each other's cookies.
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Iterable
from dataclasses import dataclass

MSS_TABLE = (536, 1300, 1440, 1460)
WSCALE_NONE = 15
WSCALE_MAX = 14
KEY_LEN = 16
TS_BITS = 0xFF          # the TSval's low byte carries h[39:32]
DEFAULT_WSCALE = 7      # synproxy_wscale's default

_M64 = (1 << 64) - 1


def _rotl(x: int, b: int) -> int:
    return ((x << b) | (x >> (64 - b))) & _M64


def _round(v0: int, v1: int, v2: int, v3: int) -> tuple[int, int, int, int]:
    v0 = (v0 + v1) & _M64
    v1 = _rotl(v1, 13) ^ v0
    v0 = _rotl(v0, 32)
    v2 = (v2 + v3) & _M64
    v3 = _rotl(v3, 16) ^ v2
    v0 = (v0 + v3) & _M64
    v3 = _rotl(v3, 21) ^ v0
    v2 = (v2 + v1) & _M64
    v1 = _rotl(v1, 17) ^ v2
    v2 = _rotl(v2, 32)
    return v0, v1, v2, v3


def siphash24(key: bytes, data: bytes) -> int:
    """SipHash-2-4 with a 16-byte key, as the kernel's ``siphash()``."""
    if len(key) != KEY_LEN:
        raise ValueError(f"SipHash key must be {KEY_LEN} bytes, not {len(key)}")
    k0, k1 = struct.unpack("<QQ", key)
    v0 = k0 ^ 0x736F6D6570736575
    v1 = k1 ^ 0x646F72616E646F6D
    v2 = k0 ^ 0x6C7967656E657261
    v3 = k1 ^ 0x7465646279746573
    tail = len(data) % 8
    for (m,) in struct.iter_unpack("<Q", data[: len(data) - tail]):
        v3 ^= m
        v0, v1, v2, v3 = _round(*_round(v0, v1, v2, v3))
        v0 ^= m
    last = (len(data) & 0xFF) << 56 | int.from_bytes(data[len(data) - tail:], "little")
    v3 ^= last
    v0, v1, v2, v3 = _round(*_round(v0, v1, v2, v3))
    v0 ^= last
    v2 ^= 0xFF
    for _ in range(4):
        v0, v1, v2, v3 = _round(v0, v1, v2, v3)
    return v0 ^ v1 ^ v2 ^ v3


@dataclass(frozen=True)
class SynOptions:
    """What the cookie remembers of the client's SYN."""

    mss: int = 536          # a MSS_TABLE value after encoding
    wscale: int | None = None
    sack: bool = False
    ecn: bool = False

    def encode(self) -> int:
        idx = mss_index(self.mss)
        if self.wscale is None:
            ws = WSCALE_NONE
        elif 0 <= self.wscale <= WSCALE_MAX:
            ws = self.wscale
        else:
            # RFC 7323: a shift above 14 is treated as 14.
            ws = WSCALE_MAX
        return idx | ws << 2 | int(self.sack) << 6 | int(self.ecn) << 7

    @classmethod
    def decode(cls, byte: int) -> SynOptions:
        ws = (byte >> 2) & 0xF
        return cls(mss=MSS_TABLE[byte & 0x3], wscale=None if ws == WSCALE_NONE else ws,
                   sack=bool(byte & 0x40), ecn=bool(byte & 0x80))


def epoch_key(secret: bytes, epoch: int, wscale: int = DEFAULT_WSCALE) -> bytes:
    """The cookie key of one epoch and announced window scale: two SipHash words
    of (epoch, i | wscale << 8) for i = 0, 1 under the secret, as the kernel's
    ``siphash_2u64(epoch, i | wscale << 8, secret)``."""
    if not 0 <= wscale <= WSCALE_MAX:
        raise ValueError(f"window scale must be 0..{WSCALE_MAX}, not {wscale}")
    words = (siphash24(secret, struct.pack("<QQ", epoch & _M64, i | wscale << 8))
             for i in (0, 1))
    return struct.pack("<QQ", *words)


def current_keys(secret: bytes, period: int, now: float,
                 wscale: int = DEFAULT_WSCALE) -> list[bytes]:
    """The keys a balancer accepts at ``now`` (its ``synproxy_wscale`` unchanged
    for two periods): this epoch's, then the previous one's."""
    epoch = int(now) // period
    return [epoch_key(secret, epoch, wscale), epoch_key(secret, epoch - 1, wscale)]


def mss_index(mss: int) -> int:
    """Index of the largest table MSS not above the client's (0 if below all)."""
    idx = 0
    for i, value in enumerate(MSS_TABLE):
        if value <= mss:
            idx = i
    return idx


def _message(saddr: str, daddr: str, sport: int, dport: int, client_isn: int) -> bytes:
    s, d = ipaddress.ip_address(saddr), ipaddress.ip_address(daddr)
    if s.version != d.version:
        raise ValueError("source and destination address families differ")
    return s.packed + d.packed + struct.pack("!HHI", sport, dport, client_isn & 0xFFFFFFFF)


def make_cookie(key: bytes, saddr: str, daddr: str, sport: int, dport: int,
                client_isn: int, opts: SynOptions) -> int:
    """The ISN of the SYN/ACK answering a SYN with these fields."""
    h = siphash24(key, _message(saddr, daddr, sport, dport, client_isn))
    return ((h >> 40) & 0xFFFFFF) << 8 | ((opts.encode() ^ h) & 0xFF)


def make_tsval(key: bytes, saddr: str, daddr: str, sport: int, dport: int,
               client_isn: int, clock: int) -> int:
    """The TSval of that SYN/ACK, when the client sent timestamps: ``clock``
    (milliseconds) with the hash's bits 39..32 in its low byte."""
    h = siphash24(key, _message(saddr, daddr, sport, dport, client_isn))
    return (clock & ~TS_BITS & 0xFFFFFFFF) | ((h >> 32) & TS_BITS)


def check_cookie(keys: Iterable[bytes], saddr: str, daddr: str, sport: int, dport: int,
                 seq: int, ack_seq: int, tsecr: int | None = None) -> SynOptions | None:
    """Validate the client's handshake ACK (its ``seq`` and ``ack_seq``, and its
    TSecr when it carried a timestamp) against each of ``keys`` (current secret
    first, then the previous one); return the SYN's options, or None when no key
    produced this cookie."""
    cookie = (ack_seq - 1) & 0xFFFFFFFF
    msg = _message(saddr, daddr, sport, dport, (seq - 1) & 0xFFFFFFFF)
    for key in keys:
        h = siphash24(key, msg)
        if cookie >> 8 != (h >> 40) & 0xFFFFFF:
            continue
        if tsecr is not None and tsecr & TS_BITS != (h >> 32) & TS_BITS:
            continue
        return SynOptions.decode((cookie ^ h) & 0xFF)
    return None
