"""Guest side of the DKMS test: after ``dkms install`` and ``modprobe ip_vs``,
a SYN-proxy FULLNAT service in ``lb`` serves a client in ``client``.

Run in the guest (``vm exec --topology -- python -m tests.testbed.dkms_guest``):
prints ``served by <name> (saw <addr>)`` for each of a few requests, and
the SYN proxy's ``synproxy_cookie_sent`` and
``synproxy_conn_proxied`` counters; exits non-zero if a request fails.
"""

from __future__ import annotations

import ipaddress
import sys

from ipvs_synproxy.kernel.model import Dest, FwdMethod, Service
from ipvs_synproxy.kernel.netlink import IPVS
from ipvs_synproxy_testbed import peers, topology

IP = ipaddress.ip_address


def main() -> int:
    servers = [peers.start_http_server(name, topology.RS4[name], 80, name=name)
               for name in ("rs1", "rs2")]
    svc = Service(addr=IP(topology.VIP4), port=80, scheduler="rr", synproxy=True)
    try:
        with IPVS("lb") as ipvs:
            ipvs.flush()
            ipvs.add_service(svc)
            ipvs.add_laddr(svc, IP(topology.LADDRS4[0]))
            for name in ("rs1", "rs2"):
                ipvs.add_dest(svc, Dest(addr=IP(topology.RS4[name]), port=80,
                                        fwd=FwdMethod.FULLNAT, weight=1))
            for _ in range(4):
                reply = peers.http_get(topology.VIP4, 80)
                print(f"served by {reply.server} (saw {reply.peer})")
            stats = ipvs.ext_stats()
            for name in ("synproxy_cookie_sent", "synproxy_conn_proxied"):
                print(f"{name} {stats.get(name, 0)}")
            ipvs.flush()
    finally:
        for s in servers:
            s.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
