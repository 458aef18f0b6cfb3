"""Guest side of the browser test: services, real servers, traffic and the console.

Run in the guest (``vm exec --topology --forward PORT -- python -m
tests.testbed.webui_guest CONFIG STOPFILE PORT``): it configures the forwarded
NIC with QEMU user networking's fixed guest address, sets up IPVS services in
``lb`` through ``ipvs_synproxy.kernel.netlink``, starts HTTP servers in rs1/rs2 and a
trickle of client requests, serves the console on 0.0.0.0:PORT of the guest
(the only way in is the host's 127.0.0.1:PORT forward), prints
``ipvs-synproxy adm -L -n`` of ``lb`` between ``--- adm before`` markers, then
``CONSOLE READY``, and waits for STOPFILE. Then it prints the listing again
between ``--- adm`` markers and exits. The FULLNAT service (port 8000) starts
with the SYN-proxy flag.
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
from ipvs_synproxy_testbed import netns, peers, topology
from ipvs_synproxy_testbed.guestnic import nic_up

IP = ipaddress.ip_address


def services() -> None:
    web4 = Service(addr=IP(topology.VIP4), port=80, scheduler="wrr")
    web6 = Service(addr=IP(topology.VIP6), port=80, scheduler="rr")
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
        while not os.path.exists(stopfile) and time.monotonic() < deadline:
            time.sleep(0.5)
        print_adm("--- adm")
        return 0
    finally:
        stop.set()
        console.terminate()
        console.wait(10)
        for s in servers:
            s.close()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
