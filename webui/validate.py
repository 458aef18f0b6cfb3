"""One validating function per kind of value the console takes from outside: the
web forms, the JSON API and the console's settings file all use these.

Each returns the typed value or raises :class:`Invalid` naming the field; the
callers turn that into their own error (a 400, a settings error).
"""

from __future__ import annotations

import ipaddress
import re

from ipvs_synproxy.kernel.model import PROXY_PROTOCOL_NAMES, IPAddress, ProxyProtocol

_DIGITS = re.compile(r"[0-9]{1,12}", re.ASCII)  # no "²", "٣" or "1_000": int() takes those
_SIGNED = re.compile(r"-?[0-9]{1,12}", re.ASCII)
_HEX = re.compile(r"[0-9a-f]+", re.ASCII)
_SALT = re.compile(r"[A-Za-z0-9]{8,64}", re.ASCII)

SCRYPT_MIN_N, SCRYPT_MIN_R = 2**14, 8
SCRYPT_MAX_MEMORY = 64 * 1024 * 1024  # 128 * n * r * p bytes per check
PBKDF2_HASHES = {"sha256": 64, "sha512": 128}  # name: hex digits of the hash
PBKDF2_MIN_ITERATIONS, PBKDF2_MAX_ITERATIONS = 600_000, 10_000_000


class Invalid(ValueError):
    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


def integer(value: object, field: str, lo: int, hi: int) -> int:
    """An integer lo-hi: a JSON number or ASCII decimal digits (a leading "-" only
    for a negative value, which is then out of range when lo >= 0)."""
    if isinstance(value, str):
        text = value.strip()
        if not _SIGNED.fullmatch(text):
            raise Invalid(field, f"must be an integer {lo}-{hi}, got {value!r}")
        value = int(text)
    if isinstance(value, bool) or not isinstance(value, int):
        raise Invalid(field, f"must be an integer {lo}-{hi}, got {value!r}")
    if not lo <= value <= hi:
        raise Invalid(field, f"{value} out of range {lo}-{hi}")
    return value


def port(value: object, field: str = "port", lo: int = 1) -> int:
    """A TCP/UDP port: 1-65535 (0 only where the caller allows it)."""
    return integer(value, field, lo, 65535)


def ip_address(value: object, field: str = "addr") -> IPAddress:
    """An IPv4 or IPv6 address in its usual text form: no zone id, no brackets."""
    if not isinstance(value, str) or not value.strip():
        raise Invalid(field, "an IP address is required")
    text = value.strip()
    if "%" in text:
        raise Invalid(field, f"no zone ids (…%eth0) in addresses: {value!r}")
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        raise Invalid(field, f"not an IP address: {value!r}") from None


def real_server_address(value: object, field: str = "addr", *,
                        allow_loopback: bool = False) -> IPAddress:
    """An address IPVS can forward to: not unspecified, broadcast or multicast, not
    IPv4-mapped; loopback only when ``allow_loopback``."""
    addr = ip_address(value, field)
    if addr.is_unspecified:
        raise Invalid(field, f"{addr} is the unspecified address")
    if addr.is_multicast:
        raise Invalid(field, f"{addr} is a multicast address")
    if isinstance(addr, ipaddress.IPv4Address) and addr == ipaddress.IPv4Address(
            "255.255.255.255"):
        raise Invalid(field, f"{addr} is the broadcast address")
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        raise Invalid(field, f"{addr} is IPv4-mapped: give {addr.ipv4_mapped}")
    if addr.is_loopback and not allow_loopback:
        raise Invalid(field, f"{addr} is a loopback address (allow_loopback_real_servers "
                             "to use one)")
    return addr


def proxy_protocol(value: object, field: str = "proxy_protocol") -> ProxyProtocol:
    """A PROXY protocol setting: the string off, v1 or v2 (any case)."""
    if not isinstance(value, str) or value.strip().lower() not in PROXY_PROTOCOL_NAMES:
        raise Invalid(field, f"must be one of {', '.join(PROXY_PROTOCOL_NAMES)}, "
                             f"got {value!r}")
    return ProxyProtocol.parse(value, field)


def password_hash(value: str, field: str = "password_hash") -> str:
    """A werkzeug hash the console accepts: scrypt or pbkdf2 (sha256/sha512) with
    sound parameters, a salt and a hash of the right length."""
    method, sep1, rest = value.partition("$")
    salt, sep2, digest = rest.partition("$")
    if not (sep1 and sep2) or "$" in digest:
        raise Invalid(field, "not a password hash (METHOD$SALT$HASH; never put a clear-text "
                             "password in the file: ipvs-synproxy webui --hash-password)")
    if not _SALT.fullmatch(salt):
        raise Invalid(field, "the salt must be 8-64 letters and digits")
    name, *args = method.split(":")
    if name == "scrypt":
        if len(args) != 3 or not all(_DIGITS.fullmatch(a) for a in args):
            raise Invalid(field, "scrypt:N:R:P with whole numbers")
        n, r, p = map(int, args)
        if n < SCRYPT_MIN_N or n & (n - 1) or r < SCRYPT_MIN_R or p < 1 or \
                128 * n * r * p > SCRYPT_MAX_MEMORY:
            raise Invalid(field, f"scrypt needs N a power of two >= {SCRYPT_MIN_N}, "
                                 f"R >= {SCRYPT_MIN_R}, P >= 1 and 128*N*R*P <= "
                                 f"{SCRYPT_MAX_MEMORY // 2**20} MiB, got {method}")
        digits = 128
    elif name == "pbkdf2":
        if len(args) != 2 or args[0] not in PBKDF2_HASHES or not _DIGITS.fullmatch(args[1]):
            raise Invalid(field, "pbkdf2:sha256:ITERATIONS or pbkdf2:sha512:ITERATIONS")
        if not PBKDF2_MIN_ITERATIONS <= int(args[1]) <= PBKDF2_MAX_ITERATIONS:
            raise Invalid(field, f"pbkdf2 needs {PBKDF2_MIN_ITERATIONS:,}-"
                                 f"{PBKDF2_MAX_ITERATIONS:,} iterations, got {args[1]}")
        digits = PBKDF2_HASHES[args[0]]
    else:
        raise Invalid(field, f"method {name!r}: only scrypt or pbkdf2 (make one with "
                             "ipvs-synproxy webui --hash-password)")
    if len(digest) != digits or not _HEX.fullmatch(digest):
        raise Invalid(field, f"the hash must be {digits} lower-case hex digits")
    return value
