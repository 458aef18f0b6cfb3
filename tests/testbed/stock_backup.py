"""Guest side of the stock-backup check (issue 18): the distribution's IPVS
(``vm exec --modules stock``) as the backup of a pair whose master runs this
project's modules. It gets the messages such a master sends (built by
:mod:`ipvs_synproxy_testbed.syncmsg`, whose bytes the patched backup accepts
in tests/vm/test_ha_sync.py): a SYN-proxy NAT connection with our SYN-proxy
option, a FULLNAT one with both our options, a plain NAT one.

Prints ``stock-backup: <client port> <state>`` for each connection the backup
holds from them and ``stock-backup-complaint: <line>`` for each kernel log line
of IPVS's backup about them; exits non-zero when ipvsadm fails.
"""

from __future__ import annotations

import subprocess
import sys
import time

from ipvs_synproxy_testbed import netns, syncmsg, topology

PORT, FULLNAT_PORT, SYNCID = 8080, 8081, 7
CPORTS = {"nat-synproxy": 42000, "fullnat": 42001, "nat": 42002}


def messages() -> bytes:
    vip, client, rs1 = topology.VIP4, topology.CLIENT4, topology.RS4["rs1"]
    sp = syncmsg.synproxy_option(isn=0x11223344, seq_delta=0x55667788, ts_delta=9,
                                 client_nxt=1000, flags=syncmsg.SP_F_PROXIED | syncmsg.SP_F_TS)
    return syncmsg.encode([
        syncmsg.SyncConn(client, CPORTS["nat-synproxy"], vip, PORT, rs1, PORT, options=[sp]),
        syncmsg.SyncConn(client, CPORTS["fullnat"], vip, FULLNAT_PORT, rs1, FULLNAT_PORT,
                         flags=syncmsg.CONN_F_FULLNAT,
                         options=[syncmsg.fnat_option(topology.LADDRS4[0], 1024), sp]),
        syncmsg.SyncConn(client, CPORTS["nat"], vip, PORT, rs1, PORT),
    ], SYNCID)


def held() -> dict[int, str]:
    out = netns.run("lb", ["ipvsadm", "-Lnc"]).stdout
    return {p: ln.split()[2] for ln in out.splitlines() for p in CPORTS.values()
            if f"{topology.CLIENT4}:{p} " in ln}


def kernel_log() -> list[str]:
    return subprocess.run(["dmesg"], capture_output=True, text=True,
                          check=True).stdout.splitlines()


def main() -> int:
    adm = ["ipvsadm"]
    vip = f"{topology.VIP4}:{PORT}"
    netns.run("lb", [*adm, "-A", "-t", vip, "-s", "rr"])
    netns.run("lb", [*adm, "-a", "-t", vip, "-r", f"{topology.RS4['rs1']}:{PORT}", "-m"])
    netns.run("lb", [*adm, "--start-daemon", "backup", "--mcast-interface", "eth1",
                     "--syncid", str(SYNCID)])
    before = len(kernel_log())
    try:
        time.sleep(1)  # the backup thread joins the group
        syncmsg.send("rs2", "eth0", messages())
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and len(held()) < 2:
            time.sleep(0.2)
        time.sleep(1)  # anything it would still say about the message
        for port, state in sorted(held().items()):
            print(f"stock-backup: {port} {state}")
        for line in kernel_log()[before:]:
            if "IPVS" in line and "BACKUP" in line:
                print(f"stock-backup-complaint: {line}")
    finally:
        netns.run("lb", [*adm, "--stop-daemon", "backup"], check=False)
        netns.run("lb", [*adm, "-C"], check=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
