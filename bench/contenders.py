"""The contenders, each set up on lb (and the real servers) and torn down again.

Module sets: ``patched`` is this project's build (the guest init copies it to
``/lib/modules/KVER/updates/ipvs-synproxy``, where modprobe finds it first);
``stock`` is the distribution's own ``ip_vs.ko``/``ip_vs_rr.ko`` from
``kernel/net/netfilter/ipvs/``, loaded by path. One guest switches between them
with rmmod/insmod, so every contender runs on the same boot, interleaved.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass, field
from ipaddress import ip_address

from ipvs_synproxy.kernel.model import Dest, FwdMethod, Service
from ipvs_synproxy.kernel.netlink import IPVS
from ipvs_synproxy_testbed import netns, topology
from ipvs_synproxy_testbed.flood import SPOOF_NET4

CONN_PORT = 80     # short connections (ConnServer) and the flood's target
XFER_PORT = 8080   # bulk transfers (BlobServer)
# Short connections and downloads straight to a real server, routed by lb past
# IPVS: the host's speed of the moment, for connection rates and throughput.
# Not service ports, so no IPVS connection (lingering in TIME_WAIT) ever
# matches one's replies.
REF_PORT = 81
XFER_REF_PORT = 8081
PORTS = (CONN_PORT, XFER_PORT)
RS_NAMES = ("rs1", "rs2")
IPVS_MODULES = ("ip_vs_rr", "ip_vs")  # unload order


class BenchSetupError(RuntimeError):
    pass


def _sh(argv: list[str]) -> str:
    res = subprocess.run(argv, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise BenchSetupError(f"{' '.join(argv)}: {(res.stderr or res.stdout).strip()}")
    return res.stdout


def loaded_modules() -> set[str]:
    with open("/proc/modules") as f:
        return {line.split()[0] for line in f}


def unload_ipvs() -> None:
    mods = loaded_modules()
    for m in IPVS_MODULES:
        if m in mods:
            _sh(["rmmod", m])


def stock_module_dir() -> str:
    return f"/lib/modules/{os.uname().release}/kernel/net/netfilter/ipvs"


def stock_module(name: str) -> str:
    """The distribution's own file of module ``name``: plain on Debian's 6.1,
    xz-compressed on its 6.12 (insmod reads both)."""
    for suffix in (".ko", ".ko.xz", ".ko.zst", ".ko.gz"):
        path = f"{stock_module_dir()}/{name}{suffix}"
        if os.path.exists(path):
            return path
    raise BenchSetupError(f"no {name}.ko* in {stock_module_dir()}")


def load_ipvs(kind: str) -> None:
    """Load the ``patched`` or ``stock`` IPVS core and rr scheduler (nothing else of
    IPVS loaded) and check which one the kernel got."""
    unload_ipvs()
    if kind == "patched":
        _sh(["modprobe", "-a", "ip_vs", "ip_vs_rr"])
    elif kind == "stock":
        for m in ("ip_vs", "ip_vs_rr"):
            _sh(["insmod", stock_module(m)])
    else:
        raise ValueError(kind)
    if ipvs_kind() != kind:
        raise BenchSetupError(f"asked for {kind} IPVS modules, got {ipvs_kind()}")


def ipvs_kind() -> str:
    """``patched`` when the loaded ip_vs is our out-of-tree build (taint flag O)."""
    with open("/sys/module/ip_vs/taint") as f:
        return "patched" if "O" in f.read() else "stock"


def conn_object_size() -> int:
    """Bytes of one IPVS connection (struct ip_vs_conn) in the loaded module."""
    with open("/sys/kernel/slab/ip_vs_conn/object_size") as f:
        return int(f.read())


def run_nft(ns: str, script: str) -> None:
    res = netns.run(ns, ["nft", "-f", "-"], input=script, check=False)
    if res.returncode != 0:
        raise BenchSetupError(f"nft in {ns}: {res.stderr.strip()}")


def delete_nft_table(ns: str, table: str) -> None:
    netns.run(ns, ["nft", "delete", "table", *table.split()], check=False)


@dataclass
class Contender:
    """One way of answering the flood, with the IPVS services behind it."""

    name: str
    label: str
    modules: str                   # "patched", "stock" or "any"
    fwd: FwdMethod = FwdMethod.MASQ
    synproxy: bool = False
    nf_synproxy: bool = False
    drop_only: bool = False        # the baseline: the flood dropped in lb's raw PREROUTING
    flood: bool = True             # False: a control measured without floods
    _saved: dict[tuple[str, str], str] = field(default_factory=dict)

    def services(self) -> list[Service]:
        return [Service(addr=ip_address(topology.VIP4), port=p, scheduler="rr",
                        synproxy=self.synproxy) for p in PORTS]

    def _sysctl(self, ns: str, key: str, value: str) -> None:
        self._saved.setdefault((ns, key), netns.read_sysctl(ns, key))
        netns.write_sysctl(ns, key, value)

    def setup(self) -> None:
        if self.drop_only:
            add_drop()
            return
        if ipvs_kind() != self.modules:
            raise BenchSetupError(f"{self.name} needs {self.modules} modules")
        with IPVS("lb") as ipvs:
            ipvs.flush()
            for svc in self.services():
                ipvs.add_service(svc)
                for rs in RS_NAMES:
                    ipvs.add_dest(svc, Dest(addr=ip_address(topology.RS4[rs]), port=svc.port,
                                            fwd=self.fwd, weight=1))
                if self.fwd is FwdMethod.FULLNAT:
                    for laddr in topology.LADDRS4:
                        ipvs.add_laddr(svc, ip_address(laddr))
        for rs in RS_NAMES:
            # the distribution's default, stated: cookies once the SYN queue is full
            self._sysctl(rs, "net.ipv4.tcp_syncookies", "1")
        if self.nf_synproxy:
            # SYNPROXY validates the ACK only when conntrack calls it INVALID, and
            # its sequence adjustment needs IPVS to keep conntrack entries updated.
            self._sysctl("lb", "net.netfilter.nf_conntrack_tcp_loose", "0")
            self._sysctl("lb", "net.ipv4.vs.conntrack", "1")
            run_nft("lb", NF_SYNPROXY_RULES)

    def teardown(self) -> None:
        if self.drop_only:
            del_drop()
            return
        if self.nf_synproxy:
            delete_nft_table("lb", "ip bench_nfsp")
        with IPVS("lb") as ipvs:
            ipvs.flush()
        for (ns, key), value in self._saved.items():
            netns.write_sysctl(ns, key, value)
        self._saved.clear()


def add_drop() -> None:
    """The baseline: drop the flood in lb's raw PREROUTING, ahead of everything."""
    run_nft("lb", DROP_RULES)


def del_drop() -> None:
    delete_nft_table("lb", "ip bench_drop")


_PORTS_SET = "{ " + ", ".join(map(str, PORTS)) + " }"

DROP_RULES = f"""
table ip bench_drop {{
  chain raw {{
    type filter hook prerouting priority raw - 10; policy accept;
    ip saddr {SPOOF_NET4} ip daddr {topology.VIP4} tcp dport {CONN_PORT} drop
  }}
}}
"""

# The netfilter SYNPROXY recipe (nft's synproxy expression): client SYNs to the
# VIP untracked, the SYNPROXY answers untracked SYNs and validates INVALID ACKs,
# the rest of INVALID dropped. Options like this project's SYN/ACK defaults.
NF_SYNPROXY_RULES = f"""
table ip bench_nfsp {{
  chain raw {{
    type filter hook prerouting priority raw; policy accept;
    ip daddr {topology.VIP4} tcp dport {_PORTS_SET} tcp flags & (syn|ack) == syn notrack
  }}
  chain input {{
    type filter hook input priority filter; policy accept;
    ip daddr {topology.VIP4} tcp dport {_PORTS_SET} ct state invalid,untracked \
synproxy mss 1452 wscale 7 timestamp sack-perm
    ip daddr {topology.VIP4} tcp dport {_PORTS_SET} ct state invalid drop
  }}
}}
"""

BASELINE, CONTROL = "drop", "patched-nat"
CONTENDERS: dict[str, Contender] = {c.name: c for c in (
    Contender(BASELINE, "drop in lb raw PREROUTING (generator baseline)", "any",
              drop_only=True),
    Contender(CONTROL, "control: patched IPVS NAT, SYN proxy off", "patched", flood=False),
    Contender("ipvs-synproxy-nat", "(a) IPVS SYN proxy, NAT", "patched", synproxy=True),
    Contender("ipvs-synproxy-fullnat", "(a) IPVS SYN proxy, FULLNAT", "patched",
              fwd=FwdMethod.FULLNAT, synproxy=True),
    Contender("nf-synproxy", "(b) netfilter SYNPROXY + stock IPVS NAT", "stock",
              nf_synproxy=True),
    Contender("rs-syncookies", "(c) stock IPVS NAT, real server's SYN cookies", "stock"),
)}
OURS = ("ipvs-synproxy-nat", "ipvs-synproxy-fullnat")
NF, STOCK = "nf-synproxy", "rs-syncookies"
