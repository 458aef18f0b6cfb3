"""A JSON Schema of the config file, for editors and pre-commit checks.

Built from the loader's own key lists, so that a key the loader learns cannot
be missing here (tests/unit/test_safe_apply.py compares them, and the
published copy, docs/ipvs-synproxy.schema.json, with this). The loader stays
the authority: it also checks what a schema cannot say (address families,
SYN proxy only with NAT or FULLNAT, FULLNAT with laddrs, the PROXY protocol
only for FULLNAT and TCP, duplicates, the secret file). ``ipvs-synproxy check --schema`` prints it.
"""

from __future__ import annotations

from typing import Any

from ipvs_synproxy.config import keepalived_settings as ks
from ipvs_synproxy.config import load, xdp_settings
from ipvs_synproxy.kernel.model import FORWARD_NAMES, PROXY_PROTOCOL_NAMES, Protocol
from ipvs_synproxy.kernel.xdp import MODES as XDP_MODES

INT_MAX = 2**31 - 1
_STR = {"type": "string", "minLength": 1}
_BOOL = {"type": "boolean"}
_SECONDS = {"type": "number", "exclusiveMinimum": 0}
# YAML 1.1 reads a bare off as false, which the loader takes as off too
_PROXY = {"enum": [*PROXY_PROTOCOL_NAMES, False],
          "description": "PROXY protocol header to FULLNAT real servers of TCP services: "
                         "off, v1 or v2 (docs/proxy-protocol.md)"}


def _int(lo: int, hi: int) -> dict[str, Any]:
    return {"type": "integer", "minimum": lo, "maximum": hi}


def _obj(keys: tuple[str, ...], props: dict[str, Any], **extra: Any) -> dict[str, Any]:
    missing = set(keys) ^ set(props)
    if missing:
        raise AssertionError(f"schema and loader disagree on keys: {sorted(missing)}")
    return {"type": "object", "additionalProperties": False,
            "properties": {k: props[k] for k in keys}, **extra}


def _check() -> dict[str, Any]:
    return _obj(ks.CHECK_KEYS, {
        "type": {"enum": list(ks.CHECK_TYPES)}, "interval": _SECONDS, "timeout": _SECONDS,
        "retry": _int(0, INT_MAX), "delay_before_retry": _SECONDS, "port": _int(1, 65535),
        "path": _STR, "status_code": _int(100, 599), "command": _STR,
        "inhibit_on_failure": _BOOL})


def _xdp() -> dict[str, Any]:
    ifname = {"type": "string", "pattern": f"^{xdp_settings.IFNAME.pattern}$",
              "not": {"enum": [".", ".."]},
              "description": "a network interface of the namespace"}
    entry = _obj(xdp_settings.XDP_KEYS, {
        "interface": ifname,
        "mode": {"enum": list(XDP_MODES),
                 "description": "native (in the driver), generic (any device) or auto: "
                                "native where the driver has it (default)"}},
        required=["interface"])
    return {"type": ["array", "null"], "items": {"oneOf": [ifname, entry]},
            "description": "the interfaces that run the SYN proxy's XDP fast path "
                           "(docs/xdp.md): all of them, apply detaches the others"}


def schema() -> dict[str, Any]:
    dest = _obj(load.DEST_KEYS, {
        "addr": {**_STR, "description": "ADDR or ADDR:PORT ([ADDR]:PORT for IPv6)"},
        "weight": _int(0, INT_MAX), "forward": {"enum": list(FORWARD_NAMES)},
        "upper_threshold": _int(0, INT_MAX), "lower_threshold": _int(0, INT_MAX),
        "tunnel_type": {"enum": ["ipip", "gue", "gre"]}, "tunnel_port": _int(0, 65535),
        "proxy_protocol": _PROXY},
        required=["addr"])
    service = _obj(load.SERVICE_KEYS, {
        "vip": {**_STR, "description": "ADDR:PORT ([ADDR]:PORT for IPv6)"},
        "fwmark": _int(1, 2**32 - 1), "family": {"enum": ["ipv4", "ipv6", "inet", "inet6"]},
        "protocol": {"enum": [p.value for p in Protocol]}, "scheduler": _STR,
        "persistent": _int(0, 2**32 - 1),
        "netmask": {"oneOf": [_int(1, 128), {"type": "string", "pattern": r"^[0-9.]+$"}]},
        "persistence_engine": _STR, "one_packet": _BOOL,
        "scheduler_flags": {"type": "array", "items": {"enum": list(load.SCHED_FLAGS)}},
        "synproxy": _BOOL, "forward": {"enum": list(FORWARD_NAMES)},
        "proxy_protocol": {**_PROXY, "description": "the default of the service's real "
                                                     "servers (a real server's own wins): "
                                                     "off, v1 or v2"},
        "laddrs": {"type": "array", "items": _STR, "uniqueItems": True},
        "real_servers": {"type": "array", "items": dest}, "healthcheck": _check()},
        oneOf=[{"required": ["vip"], "not": {"required": ["fwmark"]}},
               {"required": ["fwmark"], "not": {"required": ["vip"]}}])
    vrrp = _obj(ks.VRRP_KEYS, {
        "name": _STR, "interface": _STR,
        "state": {"enum": ["master", "backup", "MASTER", "BACKUP"]},
        "virtual_router_id": _int(1, 255), "priority": _int(1, 255),
        "advert_int": _SECONDS, "preempt": _BOOL, "auth_pass": _STR,
        "unicast_src_ip": _STR, "unicast_peers": {"type": "array", "items": _STR},
        "vips": {"type": "array", "items": _STR}}, required=["name", "interface"])
    pair = _obj(ks.PAIR_KEYS, {"sync_interface": _STR, "sync_instance": _STR,
                               "syncid": _int(1, 255), "sync_group": _STR})
    keepalived = _obj(ks.SECTION_KEYS, {
        "router_id": _STR, "healthcheck": _check(), "vrrp": {"type": "array", "items": vrrp},
        "pair": pair,
        "xdp_command": {"type": "string", "pattern": "^/[A-Za-z0-9_.,+=@%/-]*$",
                        "description": "the ipvs-synproxy the XDP notify scripts run "
                                       f"(default {ks.XDP_COMMAND})"}})
    top = _obj(load.TOP_KEYS, {
        "services": {"type": ["array", "null"], "items": service},
        "sysctl": {"type": ["object", "null"], "additionalProperties": {
            "type": ["integer", "string"],
            "description": "a net.ipv4.vs knob (with or without the prefix): a number, "
                           "or numbers separated by spaces"}},
        "cookie_secret_file": {"type": "string", "pattern": "^/"},
        "xdp": _xdp(),
        "keepalived": keepalived})
    return {"$schema": "https://json-schema.org/draft/2020-12/schema",
            "$id": "https://ipvs-synproxy.invalid/schema/config.json",
            "title": "ipvs-synproxy config file (/etc/ipvs-synproxy/ipvs.yaml)",
            **top}
