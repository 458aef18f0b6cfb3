"""Guest side of the browser test: services, real servers, traffic and the console.

Run in the guest (``vm exec --topology --forward PORT -- python -m
tests.testbed.webui_guest CONFIG STOPFILE PORT``): it configures the forwarded
NIC with QEMU user networking's fixed guest address, sets up IPVS services in
``lb`` through ``ipvs_synproxy.kernel.netlink``, starts HTTP servers in rs1/rs2 and a
trickle of client requests, serves the console on 0.0.0.0:PORT of the guest
(the only way in is the host's 127.0.0.1:PORT forward), prints
``ipvs-synproxy adm -L -n`` of ``lb`` between ``--- adm before`` markers, then
``CONSOLE READY``, and waits for STOPFILE. Then it prints the listing again
between ``--- adm`` markers and exits. Two services start with the SYN-proxy
flag: the FULLNAT one (198.51.100.10:8000) and the IPv6 NAT one
([2001:db8:1::10]:80), each with its trickle of real clients.

The attack view's flood: when FLOOD_START appears beside STOPFILE, a spoofed
SYN flood (:mod:`ipvs_synproxy_testbed.flood`, trafgen in the ``client``
namespace, sources from the client segment's spoof pool, unpaced) hits
198.51.100.10:8000 and ``FLOOD STARTED`` is printed; when FLOOD_STOP appears it
stops (``FLOOD STOPPING`` as trafgen is told to) and ``FLOOD STOPPED sent=N
seconds=S pps=P`` says what it sent.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import subprocess
import sys
import threading
import time
import urllib.request

from ipvs_synproxy.kernel.model import Dest, FwdMethod, Service
from ipvs_synproxy.kernel.netlink import IPVS, IPVS_CMD_NEW_LADDR
from ipvs_synproxy_testbed import flood, netns, peers, topology
from ipvs_synproxy_testbed.guestnic import nic_up

IP = ipaddress.ip_address
FLOOD_START, FLOOD_STOP = "flood-start", "flood-stop"  # files beside STOPFILE
FLOOD_PORT = 8000  # the FULLNAT SYN-proxy service on VIP4


def services() -> None:
    web4 = Service(addr=IP(topology.VIP4), port=80, scheduler="wrr")
    web6 = Service(addr=IP(topology.VIP6), port=80, scheduler="rr", synproxy=True)
    with IPVS("lb") as ipvs:
        for svc, rs in ((web4, topology.RS4), (web6, topology.RS6)):
            ipvs.add_service(svc)
            for name in ("rs1", "rs2"):
                ipvs.add_dest(svc, Dest(addr=IP(rs[name]), port=80, fwd=FwdMethod.MASQ,
                                        weight=2))
        if ipvs.supports(IPVS_CMD_NEW_LADDR):
            fnat = Service(addr=IP(topology.VIP4), port=8000, scheduler="rr", synproxy=True)
            ipvs.add_service(fnat)
            for laddr in topology.LADDRS4[:2]:
                ipvs.add_laddr(fnat, IP(laddr))
            for name in ("rs1", "rs2"):
                ipvs.add_dest(fnat, Dest(addr=IP(topology.RS4[name]), port=80,
                                         fwd=FwdMethod.FULLNAT, weight=1))


def traffic(stop: threading.Event) -> None:
    """A trickle of HTTP requests to every service, so rates and charts move."""
    while not stop.is_set():
        for vip, port in ((topology.VIP4, 80), (topology.VIP6, 80), (topology.VIP4, 8000)):
            with contextlib.suppress(OSError):
                peers.http_get(vip, port, timeout=3)
        stop.wait(0.3)


def print_adm(marker: str) -> None:
    """``ipvs-synproxy adm -L -n`` of lb between ``MARKER`` and ``--- end MARKER[4:]``."""
    adm = netns.run("lb", [sys.executable, "-m", "ipvs_synproxy.cli", "adm", "-L", "-n"])
    print(f"{marker}\n{adm.stdout}--- end {marker[4:]}", flush=True)


def main(argv: list[str]) -> int:
    config, stopfile, port = argv[0], argv[1], int(argv[2])
    try:
        nic_up()
    except RuntimeError as exc:
        raise SystemExit(str(exc)) from None
    services()
    servers = [peers.start_http_server(rs, addr, 80) for rs in ("rs1", "rs2")
               for addr in (topology.RS4[rs], topology.RS6[rs])]
    stop = threading.Event()
    threading.Thread(target=traffic, args=(stop,), daemon=True).start()
    syn_flood: flood.Flood | None = None
    # plain HTTP on the guest's NIC: its only peer is QEMU's forward from the
    # host's 127.0.0.1, so --insecure-listen exposes nothing
    console = subprocess.Popen([sys.executable, "-m", "ipvs_synproxy.cli", "webui",
                                "--config", config, "--listen", f"0.0.0.0:{port}",
                                "--insecure-listen", "--netns", "lb"])
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5)
                break
            except OSError:
                if time.monotonic() > deadline or console.poll() is not None:
                    print("CONSOLE FAILED", flush=True)
                    return 1
                time.sleep(0.5)
        print_adm("--- adm before")
        print("CONSOLE READY", flush=True)
        deadline = time.monotonic() + 900
        here = os.path.dirname(stopfile)
        while not os.path.exists(stopfile) and time.monotonic() < deadline:
            if syn_flood is None and os.path.exists(os.path.join(here, FLOOD_START)):
                # unpaced: trafgen's pacing tops out below 1000 pps under TCG
                syn_flood = flood.Flood("syn", target=topology.VIP4, port=FLOOD_PORT).start()
                print("FLOOD STARTED", flush=True)
            if syn_flood is not None and syn_flood.result is None and \
                    os.path.exists(os.path.join(here, FLOOD_STOP)):
                print("FLOOD STOPPING", flush=True)
                res = syn_flood.stop()
                print(f"FLOOD STOPPED sent={res.sent} seconds={res.seconds:.2f} "
                      f"pps={res.pps:.0f}", flush=True)
            time.sleep(0.2)
        print_adm("--- adm")
        return 0
    finally:
        if syn_flood is not None:
            syn_flood.stop()
        stop.set()
        console.terminate()
        console.wait(10)
        for s in servers:
            s.close()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
