"""Guest side of the package test: once the packages are installed and the
apply unit's command has set up a SYN-proxy FULLNAT service on VIP4:80 in
``lb`` (from /etc/ipvs-synproxy/ipvs.yaml), it serves a client in ``client``.

Run in the guest (``vm exec --topology -- python -m tests.testbed.dkms_guest``):
starts the real servers, prints ``served by <name> (saw <addr>)`` for each of
a few requests, and the SYN proxy's ``synproxy_cookie_sent`` and
``synproxy_conn_proxied`` counters; exits non-zero if a request fails. It
adds nothing to the table: what serves is what the package's command applied.
"""

from __future__ import annotations

import ipaddress
import sys

from ipvs_synproxy.kernel.model import Service
from ipvs_synproxy.kernel.netlink import IPVS
from ipvs_synproxy_testbed import peers, topology

IP = ipaddress.ip_address


def main() -> int:
    servers = [peers.start_http_server(name, topology.RS4[name], 80, name=name)
               for name in ("rs1", "rs2")]
    try:
        with IPVS("lb") as ipvs:
            svc = ipvs.service(Service(addr=IP(topology.VIP4), port=80))
            print(f"service {svc} synproxy={svc.synproxy} "
                  f"dests={sorted(str(d.addr) for d in ipvs.dests(svc))} "
                  f"fwd={sorted({d.fwd.name for d in ipvs.dests(svc)})}")
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
