"""The console's configuration file (YAML) and the values built from it.

```yaml
listen: 127.0.0.1:8080          # default; a non-loopback address must be asked for
netns: lb                       # optional: act on IPVS in this network namespace
secret_key_file: /etc/ipvs-synproxy/webui.key   # signs sessions; created (0600) if absent
audit_log: /var/log/ipvs-synproxy/webui-audit.log   # mode 0600 (0640 with a group)
audit_log_group: adm            # optional: the group that may read the audit log
secret_key_shared: false        # true: accept a key file group/others can read
session_cookie_secure: false    # true when served behind HTTPS
session_idle_minutes: 60        # a session ends after this long without a request
session_lifetime_hours: 8       # and this long after login, however active
trusted_hosts: [lb1.example.net]  # Host names the console answers to (default:
                                # localhost, 127.0.0.1, [::1] and the listen address)
allow_loopback_real_servers: false  # 127.0.0.1/::1 as real servers only if true
trusted_proxies: 0              # reverse proxies in front (their X-Forwarded-For,
                                # -Proto and -Host are believed only when > 0)
flood_syn_rate: 1000            # attack view: "under flood" from this many SYNs/s ...
flood_valid_ack_ratio: 0.5      # ... while fewer than this share of cookies come back
users:
  - name: alice
    role: admin                 # admin: may change things; readonly: may look
    password_hash: "scrypt:…"   # ipvs-synproxy webui --hash-password
  - name: grafana
    role: readonly
    token_hash: "scrypt:…"      # API token: Authorization: Bearer grafana:TOKEN
```

There is no default user and no default password: :func:`load` refuses a file
without at least one user that has a password or token hash.
"""

from __future__ import annotations

import grp
import ipaddress
import math
import os
import re
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ipvs_synproxy.exporter import series
from webui import validate

ROLES = ("admin", "readonly")
DEFAULT_LISTEN = ("127.0.0.1", 8080)
SECRET_LEN = 32
_HOST_RE = re.compile(r"[A-Za-z0-9.-]{1,253}|\[[0-9A-Fa-f:.]{2,45}\]")
NAME_RE = re.compile(r"[A-Za-z0-9_.@-]{1,64}")
_KEYS = ("listen", "netns", "secret_key_file", "audit_log", "users", "session_cookie_secure",
         "session_idle_minutes", "session_lifetime_hours", "trusted_hosts", "trusted_proxies",
         "allow_loopback_real_servers", "audit_log_group", "secret_key_shared",
         "flood_syn_rate", "flood_valid_ack_ratio")
_USER_KEYS = ("name", "role", "password_hash", "token_hash")


class SettingsError(Exception):
    """A missing or bad setting; the message says what to do."""


@dataclass(frozen=True)
class User:
    name: str
    role: str
    password_hash: str | None = None
    token_hash: str | None = None

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"


@dataclass(frozen=True)
class Settings:
    users: Mapping[str, User]
    secret_key: bytes
    audit_log: str
    netns: str | None = None
    listen: tuple[str, int] = DEFAULT_LISTEN
    session_cookie_secure: bool = False
    session_idle: int = 3600  # seconds without a request before a session ends
    session_lifetime: int = 8 * 3600  # seconds after login when it ends regardless
    trusted_hosts: tuple[str, ...] | None = None  # None: loopback names + listen address
    trusted_proxies: int = 0  # reverse proxies in front whose X-Forwarded-* to believe
    allow_loopback_real_servers: bool = False
    audit_log_gid: int | None = None  # None: the audit log is 0600, else 0640 and this group
    # The attack view's threshold (webui.service.FloodThreshold; defaults: the exporter's)
    flood_syn_rate: float = series.FLOOD_SYN_RATE
    flood_valid_ack_ratio: float = series.FLOOD_VALID_ACK_RATIO
    extra: Mapping[str, object] = field(default_factory=dict)  # Flask config overrides


def parse_listen(text: str, source: str = "listen") -> tuple[str, int]:
    """``127.0.0.1:8080``, ``[::1]:8080`` → (host, port)."""
    value = text.strip()
    if value.startswith("["):
        host, sep, rest = value[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise SettingsError(f"{source}: expected [ADDRESS]:PORT, got {text!r}")
        port_text = rest[1:]
    else:
        host, sep, port_text = value.rpartition(":")
        if not sep:
            raise SettingsError(f"{source}: expected ADDRESS:PORT, got {text!r}")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise SettingsError(f"{source}: not an IP address: {host!r}") from None
    try:
        return host, validate.port(port_text)
    except validate.Invalid:
        raise SettingsError(f"{source}: not a port number: {port_text!r}") from None


def format_host(host: str) -> str:
    """A host as it appears in a Host header: IPv6 addresses in brackets."""
    return f"[{host}]" if ":" in host else host


def host_name(header: str) -> str:
    """The name part of a Host header value (no port), lower case."""
    text = header.strip().lower()
    if text.startswith("["):
        return text.partition("]")[0] + "]"
    return text.partition(":")[0]


def trusted_hosts(st: Settings) -> frozenset[str]:
    """The Host names the console answers to (anything else: 400)."""
    if st.trusted_hosts is not None:
        return frozenset(host_name(h) for h in st.trusted_hosts)
    names = {"localhost", "127.0.0.1", "[::1]"}
    if not ipaddress.ip_address(st.listen[0]).is_unspecified:
        names.add(format_host(st.listen[0]))
    return frozenset(names)


def is_loopback(host: str) -> bool:
    return ipaddress.ip_address(host).is_loopback


def check_users(users: Mapping[str, User]) -> None:
    """Refuse to run without credentials: no default user, no default password."""
    if not users:
        raise SettingsError(
            "no users configured: the console never starts with a default login. Add "
            "'users:' with at least one entry (name, role admin|readonly, password_hash); "
            "make a hash with: ipvs-synproxy webui --hash-password")
    for u in users.values():
        if u.role not in ROLES:
            raise SettingsError(f"user {u.name}: role must be one of {', '.join(ROLES)}")
        if not u.password_hash and not u.token_hash:
            raise SettingsError(f"user {u.name}: needs password_hash or token_hash")
        for key, h in (("password_hash", u.password_hash), ("token_hash", u.token_hash)):
            if h is None:
                continue
            try:
                validate.password_hash(h, key)
            except validate.Invalid as exc:
                raise SettingsError(f"user {u.name}: {exc}") from None


def _read_users(raw: object, source: str) -> dict[str, User]:
    if raw is None:
        return {}
    if not isinstance(raw, list):
        raise SettingsError(f"{source}: users: expected a list")
    users: dict[str, User] = {}
    for i, entry in enumerate(raw):
        where = f"{source}: users[{i}]"
        if not isinstance(entry, dict):
            raise SettingsError(f"{where}: expected a mapping")
        unknown = sorted(set(entry) - set(_USER_KEYS))
        if unknown:
            raise SettingsError(f"{where}: unknown key {unknown[0]!r} "
                                f"(expected: {', '.join(_USER_KEYS)})")
        name = entry.get("name")
        if not isinstance(name, str) or not NAME_RE.fullmatch(name):
            raise SettingsError(f"{where}: name: 1-64 of A-Z a-z 0-9 _ . @ -")
        if name in users:
            raise SettingsError(f"{where}: duplicate user {name!r}")
        role = entry.get("role", "readonly")
        hashes = {k: entry.get(k) for k in ("password_hash", "token_hash")}
        for k, v in hashes.items():
            if v is not None and not isinstance(v, str):
                raise SettingsError(f"{where}: {k}: expected a string")
        users[name] = User(name, str(role), hashes["password_hash"], hashes["token_hash"])
    return users


def read_secret_key(path: str, shared: bool = False) -> bytes:
    """The session-signing key; a new random one is written (mode 0600) if absent.
    A key that group or others can read is refused unless ``shared``."""
    p = Path(path)
    if not p.exists():
        p.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, os.urandom(SECRET_LEN).hex().encode() + b"\n")
        finally:
            os.close(fd)
    mode = stat.S_IMODE(p.stat().st_mode)
    if mode & 0o077 and not shared:
        raise SettingsError(f"secret_key_file {path}: mode {mode:04o} lets others read the "
                            f"key that signs sessions: chmod 600 {path} (or set "
                            "secret_key_shared: true)")
    data = p.read_bytes().strip()
    if len(data) < 16:
        raise SettingsError(f"secret_key_file {path}: at least 16 bytes of random data "
                            "needed (delete the file to have one generated)")
    return data


def load(path: str) -> Settings:
    """Read the YAML settings file; :class:`SettingsError` on any problem."""
    try:
        with open(path) as f:
            raw = yaml.safe_load(f)
    except OSError as exc:
        raise SettingsError(f"{path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise SettingsError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise SettingsError(f"{path}: expected a mapping of settings")
    unknown = sorted(set(raw) - set(_KEYS))
    if unknown:
        raise SettingsError(f"{path}: unknown key {unknown[0]!r} (expected: "
                            f"{', '.join(_KEYS)})")
    users = _read_users(raw.get("users"), path)
    check_users(users)
    base = Path(path).resolve().parent

    def _path(key: str) -> str:
        value = raw.get(key)
        if not isinstance(value, str) or not value.strip():
            raise SettingsError(f"{path}: {key}: a file name is required")
        return str(base / value.strip())

    listen = parse_listen(str(raw["listen"]), f"{path}: listen") if "listen" in raw \
        else DEFAULT_LISTEN
    netns = raw.get("netns")
    if netns is not None and (not isinstance(netns, str) or not NAME_RE.fullmatch(netns)):
        raise SettingsError(f"{path}: netns: not a namespace name: {netns!r}")
    secure = raw.get("session_cookie_secure", False)
    if not isinstance(secure, bool):
        raise SettingsError(f"{path}: session_cookie_secure: true or false")
    loopback = raw.get("allow_loopback_real_servers", False)
    if not isinstance(loopback, bool):
        raise SettingsError(f"{path}: allow_loopback_real_servers: true or false")
    hosts = raw.get("trusted_hosts")
    if hosts is not None and (not isinstance(hosts, list) or not hosts or not all(
            isinstance(h, str) and _HOST_RE.fullmatch(h) for h in hosts)):
        raise SettingsError(f"{path}: trusted_hosts: a list of host names or addresses "
                            "(IPv6 in brackets), e.g. [lb1.example.net, 192.0.2.5]")
    idle = _number(raw, "session_idle_minutes", 60, 1, 24 * 60, path)
    lifetime = _number(raw, "session_lifetime_hours", 8, 1, 7 * 24, path)
    shared = raw.get("secret_key_shared", False)
    if not isinstance(shared, bool):
        raise SettingsError(f"{path}: secret_key_shared: true or false")
    group, gid = raw.get("audit_log_group"), None
    if group is not None:
        try:
            gid = grp.getgrnam(str(group)).gr_gid
        except KeyError:
            raise SettingsError(f"{path}: audit_log_group: no group {group!r}") from None
    return Settings(users=users,
                    secret_key=read_secret_key(_path("secret_key_file"), shared),
                    audit_log=_path("audit_log"), netns=netns, listen=listen,
                    session_cookie_secure=secure, session_idle=idle * 60,
                    session_lifetime=lifetime * 3600,
                    trusted_hosts=tuple(hosts) if hosts is not None else None,
                    trusted_proxies=_number(raw, "trusted_proxies", 0, 0, 5, path),
                    allow_loopback_real_servers=loopback, audit_log_gid=gid,
                    flood_syn_rate=_rate(raw, "flood_syn_rate", series.FLOOD_SYN_RATE,
                                         path),
                    flood_valid_ack_ratio=_ratio(raw, "flood_valid_ack_ratio",
                                                 series.FLOOD_VALID_ACK_RATIO, path))


def _number(raw: Mapping[str, object], key: str, default: int, lo: int, hi: int,
            source: str) -> int:
    value = raw.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise SettingsError(f"{source}: {key}: a whole number {lo}-{hi}, got {value!r}")
    return value


def _rate(raw: Mapping[str, object], key: str, default: float, source: str) -> float:
    value = raw.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or \
            not 0 < value < math.inf:
        raise SettingsError(f"{source}: {key}: SYNs per second, a number above 0 "
                            f"(default {default:g}), got {value!r}")
    return float(value)


def _ratio(raw: Mapping[str, object], key: str, default: float, source: str) -> float:
    value = raw.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 1:
        raise SettingsError(f"{source}: {key}: the share of cookies answered by valid ACKs, "
                            f"above 0 and at most 1 (default {default:g}), got {value!r}")
    return float(value)
