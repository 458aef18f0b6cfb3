"""The SYN proxy's cookie secret: rotation by period, setting it over netlink
(balancers of one group validate each other's cookies), and who may set or
read it.

A cookie is made under the key of the epoch ``unix time // period`` and is
accepted while that key is the current or the previous one: between one and
two periods. After a netlink set the new secret signs at once and cookies
already sent under the old one stay valid until the next period boundary.
Crafted SYNs from the client get a cookie; crafted ACKs answer it, and the
counters and a capture at the real servers show whether the ACK was taken.
"""

from __future__ import annotations

import glob
import os
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from ipvs_synproxy.kernel import cookie
from ipvs_synproxy.kernel.model import FwdMethod
from ipvs_synproxy.kernel.netlink import IPVS
from ipvs_synproxy_testbed import netns, topology
from tests.vm.helpers import (
    ACK,
    NETS,
    SYN,
    Capture,
    eth_frame,
    ext_stats_file,
    lb_sysctls,
    read_synacks,
    send_frames,
    synproxy_service,
    tcp_seg,
    wait_for,
)

NET4 = NETS["ipv4"]
MSS_1460 = b"\x02\x04\x05\xb4"
PERIOD = 4  # seconds, for the rotation tests
LONG_PERIOD = 3600  # no period boundary in the middle of a test


def _epoch_position(period: int) -> float:
    return time.time() % period


def wait_for_epoch_start(period: int) -> int:
    """Sleep until a little after the next period boundary; return the epoch."""
    time.sleep(period - _epoch_position(period) + 0.2)
    return int(time.time()) // period


def sleep_until(t: float) -> None:
    time.sleep(max(0.0, t - time.time()))


def get_cookie(sport: int, isn: int) -> int:
    """Send a SYN from client:sport to VIP:80; the ISN of the SYN/ACK."""
    from scapy.layers.inet import TCP

    cap = Capture("client")
    try:
        send_frames([eth_frame(4, tcp_seg(sport, 80, isn, 0, SYN, MSS_1460))])
        assert wait_for(lambda: sport in read_synacks(cap.frames), 10), "no SYN/ACK"
    finally:
        cap.stop()
    return int(read_synacks(cap.frames)[sport][TCP].seq)


def answer(sport: int, isn: int, cookie_isn: int) -> tuple[bool, bool]:
    """ACK the cookie; (accepted, reached a real server): the valid and invalid
    counters say which way the balancer took it, a capture at the real servers
    whether it opened their side."""
    from scapy.layers.inet import TCP
    from scapy.layers.l2 import Ether

    before = ext_stats_file()
    rs1, rs2 = Capture("rs1"), Capture("rs2")

    def syn_at_rs() -> bool:
        for f in rs1.frames + rs2.frames:
            pkt = Ether(f)
            if TCP in pkt and pkt[TCP].flags == "S" and pkt[TCP].seq == isn:
                return True
        return False

    def counted() -> bool:
        now = ext_stats_file()
        return (now["synproxy_ack_valid"] + now["synproxy_ack_invalid"]
                > before["synproxy_ack_valid"] + before["synproxy_ack_invalid"])

    try:
        send_frames([eth_frame(4, tcp_seg(sport, 80, isn + 1, cookie_isn + 1, ACK))])
        assert wait_for(counted, 10), "the ACK was not counted at all"
        after = ext_stats_file()
        accepted = after["synproxy_ack_valid"] == before["synproxy_ack_valid"] + 1
        rejected = after["synproxy_ack_invalid"] == before["synproxy_ack_invalid"] + 1
        assert accepted != rejected, (before, after)
        reached = wait_for(syn_at_rs, 5) if accepted else (time.sleep(1.0), syn_at_rs())[1]
    finally:
        rs1.stop()
        rs2.stop()
    return accepted, reached


def decodes_under(secret: bytes, period: int, sport: int, isn: int,
                  cookie_isn: int) -> cookie.SynOptions | None:
    """What the Python reference makes of a cookie under secret (both keys)."""
    return cookie.check_cookie(cookie.current_keys(secret, period, time.time()),
                               NET4.client, NET4.vip, sport, 80, isn + 1, cookie_isn + 1)


@pytest.fixture
def proxied(ipvs: IPVS, real_servers: dict) -> Iterator[IPVS]:
    """A FULLNAT SYN proxy service on VIP:80; a fresh random secret afterwards."""
    synproxy_service(ipvs, NET4, FwdMethod.FULLNAT)
    yield ipvs
    ipvs.set_synproxy_secret(os.urandom(cookie.KEY_LEN))


# ---- rotation by period -------------------------------------------------------------------


def test_a_cookie_is_still_accepted_one_period_later(proxied: IPVS) -> None:
    with lb_sysctls(synproxy_secret_period=PERIOD):
        epoch = wait_for_epoch_start(PERIOD)
        isn = 0x10203040
        c = get_cookie(46001, isn)
        sleep_until((epoch + 1.5) * PERIOD)
        assert answer(46001, isn, c) == (True, True)


def test_a_cookie_is_rejected_two_periods_later(proxied: IPVS) -> None:
    with lb_sysctls(synproxy_secret_period=PERIOD):
        epoch = wait_for_epoch_start(PERIOD)
        isn = 0x20304050
        c = get_cookie(46002, isn)
        sleep_until((epoch + 2.5) * PERIOD)
        assert answer(46002, isn, c) == (False, False)


# ---- setting the secret over netlink ------------------------------------------------------


def test_after_a_set_cookies_of_the_old_secret_live_until_the_period_ends(
        proxied: IPVS) -> None:
    old, new = os.urandom(16), os.urandom(16)
    with lb_sysctls(synproxy_secret_period=LONG_PERIOD):
        if _epoch_position(LONG_PERIOD) > LONG_PERIOD - 60:
            wait_for_epoch_start(LONG_PERIOD)
        proxied.set_synproxy_secret(old)
        isn_old = 0x30405060
        c_old = get_cookie(46011, isn_old)
        assert decodes_under(old, LONG_PERIOD, 46011, isn_old, c_old) is not None

        proxied.set_synproxy_secret(new)
        isn_new = 0x40506070
        c_new = get_cookie(46012, isn_new)
        # The new SYN/ACK is signed with the new secret, as the reference says
        opts = decodes_under(new, LONG_PERIOD, 46012, isn_new, c_new)
        assert opts is not None and opts.mss == 1460, opts
        assert decodes_under(old, LONG_PERIOD, 46012, isn_new, c_new) is None

        assert answer(46011, isn_old, c_old) == (True, True), \
            "a cookie of the old secret died with the set"
        assert answer(46012, isn_new, c_new) == (True, True)


def test_after_a_set_cookies_of_the_old_secret_die_at_the_next_boundary(
        proxied: IPVS) -> None:
    with lb_sysctls(synproxy_secret_period=PERIOD):
        epoch = wait_for_epoch_start(PERIOD)
        isn = 0x50607080
        c = get_cookie(46021, isn)
        proxied.set_synproxy_secret(os.urandom(16))
        sleep_until((epoch + 1.5) * PERIOD)
        assert answer(46021, isn, c) == (False, False)


# ---- who may set it, who may read it ------------------------------------------------------

SET_AS_NOBODY = """
import sys
from ipvs_synproxy.kernel.netlink import IPVS, PermissionDenied
try:
    with IPVS() as conn:
        conn.set_synproxy_secret(bytes.fromhex(sys.argv[1]))
except PermissionDenied as exc:
    print("PermissionDenied", exc)
    sys.exit(3)
print("set")
"""

UNPRIVILEGED = {
    "no-capabilities": ["--inh-caps=-all", "--bounding-set=-all"],
    "nobody": ["--reuid=65534", "--regid=65534", "--clear-groups",
               "--inh-caps=-all", "--bounding-set=-all"],
}


@pytest.mark.parametrize("who", UNPRIVILEGED)
def test_a_process_without_cap_net_admin_cannot_set_the_secret(
        proxied: IPVS, who: str) -> None:
    secret, attempted = os.urandom(16), os.urandom(16)
    with lb_sysctls(synproxy_secret_period=LONG_PERIOD):
        if _epoch_position(LONG_PERIOD) > LONG_PERIOD - 60:
            wait_for_epoch_start(LONG_PERIOD)
        proxied.set_synproxy_secret(secret)
        res = netns.run("lb", ["setpriv", *UNPRIVILEGED[who], sys.executable, "-c",
                               SET_AS_NOBODY, attempted.hex()],
                        check=False, cwd=os.getcwd(),
                        env={**os.environ, "PYTHONPATH": os.getcwd()})
        assert res.returncode == 3, (res.returncode, res.stdout, res.stderr)
        assert "PermissionDenied" in res.stdout
        # a port per case: the last case's connection still holds its tuple
        sport, isn = 46031 + list(UNPRIVILEGED).index(who), 0x60708090
        c = get_cookie(sport, isn)
        assert decodes_under(secret, LONG_PERIOD, sport, isn, c) is not None, \
            "the secret changed"
        assert decodes_under(attempted, LONG_PERIOD, sport, isn, c) is None
        assert answer(sport, isn, c) == (True, True)


def _renderings(secret: bytes) -> list[bytes]:
    """The secret as raw bytes, hex, and its two 64-bit key words in decimal."""
    words = [int.from_bytes(secret[i:i + 8], "little") for i in (0, 8)]
    out = [secret, secret.hex().encode(), secret.hex().upper().encode()]
    return out + [str(w).encode() for w in words] + [f"{w:x}".encode() for w in words]


def test_no_sysctl_proc_file_or_netlink_dump_shows_the_secret(
        proxied: IPVS, monkeypatch: pytest.MonkeyPatch) -> None:
    secret = os.urandom(16)
    proxied.set_synproxy_secret(secret)
    # A connection in the table too
    isn = 0x708090A0
    assert answer(46041, isn, get_cookie(46041, isn)) == (True, True)
    seen: dict[str, bytes] = {}
    with netns.netns("lb"):
        for path in sorted(glob.glob("/proc/sys/net/ipv4/vs/*") + glob.glob("/proc/net/ip_vs*")):
            try:
                with open(path, "rb") as f:
                    seen[path] = f.read()
            except OSError as exc:
                seen[path] = repr(exc).encode()
    assert "/proc/sys/net/ipv4/vs/synproxy_secret_period" in seen
    assert "/proc/net/ip_vs_ext_stats" in seen

    raw: list[bytes] = []
    original = proxied._t.request

    def recording(*args: object, **kwargs: object) -> Iterator[bytes]:
        for part in original(*args, **kwargs):  # type: ignore[arg-type]
            raw.append(part)
            yield part

    monkeypatch.setattr(proxied._t, "request", recording)
    services = proxied.services()
    for svc in services:
        proxied.dests(svc)
        proxied.laddrs(svc)
    proxied.info()
    proxied.timeouts()
    proxied.daemons()
    proxied.ext_stats()
    assert services and raw
    seen["netlink"] = b"".join(raw)

    for where, data in seen.items():
        for form in _renderings(secret):
            assert form not in data, f"{where} shows the secret ({form!r})"
    # and the ipvsadm view of everything
    listing = subprocess.run(["ip", "netns", "exec", "lb", "ipvsadm", "-Ln", "--stats"],
                             capture_output=True, check=False).stdout
    assert not any(form in listing for form in _renderings(secret))
    assert topology.VIP4.encode() in listing
