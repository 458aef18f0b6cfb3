"""The ``xdp:`` list of the config file: the interfaces that run the SYN
proxy's XDP fast path (docs/xdp.md), each in its mode.

.. code-block:: yaml

    xdp:
      - {interface: eth0, mode: native}
      - eth1                       # the same as {interface: eth1}: mode auto

``apply`` attaches, re-attaches and detaches to match it
(:mod:`~ipvs_synproxy.config.plan`); ``keepalived render`` gives it to the
VRRP instances' notify scripts (:mod:`~ipvs_synproxy.config.keepalived`).
:func:`read` is called by :func:`~ipvs_synproxy.config.load.loads`, so a bad
entry is an error of every command that loads the file.
"""

from __future__ import annotations

import re

from ipvs_synproxy.config.reader import Reader, YamlMap, typename
from ipvs_synproxy.config.state import XdpAttachment
from ipvs_synproxy.kernel.xdp import MODES

XDP_KEYS = ("interface", "mode")
# What the kernel takes as a device name (dev_valid_name: under 16 bytes, no
# '/', ':' or blank, not . or ..), narrowed to what needs no quoting in a
# path or a keepalived notify script
IFNAME = re.compile(r"[A-Za-z0-9_.@-]{1,15}")
IFNAME_RULE = "1-15 letters, digits, _ . @ -; not . or .."


def interface_error(value: object) -> str | None:
    """Why ``value`` is not an interface name; None when it is one."""
    if not isinstance(value, str):
        return f"expected an interface name, got {typename(value)}"
    if not IFNAME.fullmatch(value) or value in (".", ".."):
        return f"not an interface name: {value!r} ({IFNAME_RULE})"
    return None


def _interface(r: Reader, value: object, line: int, path: str) -> str:
    why = interface_error(value)
    if why is not None:
        raise r.err(line, path, why)
    assert isinstance(value, str)
    return value


def _mode(r: Reader, value: object, line: int, path: str) -> str:
    if not isinstance(value, str) or value.lower() not in MODES:
        raise r.err(line, path, f"unknown XDP mode {value!r} ({', '.join(MODES)})")
    return value.lower()


def _read_entry(r: Reader, raw: object, line: int, path: str) -> XdpAttachment:
    if isinstance(raw, str):  # the short form: an interface name, mode auto
        return XdpAttachment(_interface(r, raw, line, path))
    if not isinstance(raw, YamlMap):
        raise r.err(line, path, "expected an interface name or a mapping {interface: NAME, "
                                f"mode: MODE}}, got {typename(raw)}")
    m = r.mapping(raw, line, path, XDP_KEYS)
    if "interface" not in m:
        raise r.err(m.line, path, "an XDP entry needs 'interface' (the device to attach to)")
    dev = _interface(r, m["interface"], r.at(m, "interface"), f"{path}.interface")
    if "mode" not in m:
        return XdpAttachment(dev)
    return XdpAttachment(dev, _mode(r, m["mode"], r.at(m, "mode"), f"{path}.mode"))


def read(r: Reader, top: YamlMap) -> tuple[XdpAttachment, ...]:
    """The ``xdp`` entries of ``top`` in file order (none without the key)."""
    raw = top.get("xdp")
    if raw is None:
        return ()
    seq = r.seq(raw, r.at(top, "xdp"), "xdp")
    out: list[XdpAttachment] = []
    first: dict[str, int] = {}
    for i, item in enumerate(seq):
        line = seq.item_lines[i]
        entry = _read_entry(r, item, line, f"xdp[{i}]")
        if entry.dev in first:
            raise r.err(line, f"xdp[{i}]", f"duplicate XDP interface {entry.dev} (first on "
                                           f"line {first[entry.dev]})")
        first[entry.dev] = line
        out.append(entry)
    return tuple(out)
