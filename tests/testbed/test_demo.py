"""``make demo`` end to end: the steps, then the console reachable from the host.

Boots the guest like the Makefile does (with a forwarded port of its own, free
on the host, so it never clashes with the browser test's), holds for
:data:`HOLD` seconds, and once the first status line shows clients and the SYN
flood running, fetches ``/metrics`` twice from the host's 127.0.0.1 (the SYN
proxy's counters must move in between) and logs in to the console with the
credentials the demo printed (login form with its CSRF token, as a browser
would). The demo must exit 0 and its last status line must show the clients
served, the SYN proxy answering the flood (``synproxy_cookie_sent``) and the
real servers seeing about the clients' SYNs only, far fewer than the flood's.
"""

from __future__ import annotations

import http.cookiejar
import re
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request

from ipvs_synproxy.build import paths
from ipvs_synproxy_testbed import demo as demo_mod
from tests.testbed.guestrun import GuestRun

HOLD = 40
LOGIN = re.compile(r"login: user (\S+), password (\S+)")
STATUS = re.compile(r"^\[\s*\d+ s\] requests ok (\d+) failed (\d+) \| flood SYNs at lb (\d+) "
                    r"\| SYNs at real servers: rs1 (\d+) rs2 (\d+) \| (.*)$", re.M)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Demo(GuestRun):
    def __init__(self, port: int) -> None:
        super().__init__("--topology", "--forward", str(port), "--timeout", "600", "--",
                         "python", "-m", "ipvs_synproxy_testbed.demo", "--console-port",
                         str(port), "--hold", str(HOLD))


def _login(base: str, user: str, password: str) -> str:
    jar = http.cookiejar.CookieJar()
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))
    with opener.open(base + "/", timeout=30) as r:  # redirected to the login form
        assert "/login" in r.geturl()
        form = r.read().decode()
    token = re.search(r'name="csrf_token" value="([^"]+)"', form)
    assert token, form[:2000]
    body = urllib.parse.urlencode({"csrf_token": token.group(1), "username": user,
                                   "password": password}).encode()
    with opener.open(base + "/login", data=body, timeout=30) as r:
        assert r.status == 200 and "/login" not in r.geturl(), r.geturl()
        return str(r.read().decode())


def _synproxy_metrics(base: str) -> dict[str, float]:
    """The SYN proxy's cookies sent and valid cookie ACKs from the console's
    /metrics, summed over the VIPs."""
    with urllib.request.urlopen(base + "/metrics", timeout=30) as r:
        metrics = r.read().decode()
    assert "ipvs_synproxy_up 1.0" in metrics, metrics[:2000]
    assert 'real_server="192.0.2.11"' in metrics
    assert "node_ipvs_" not in metrics
    sums = {"synproxy_cookie_sent": 0.0, "synproxy_ack_valid": 0.0}
    for line in metrics.splitlines():
        if line.startswith("ipvs_synproxy_cookies_sent_total{"):
            sums["synproxy_cookie_sent"] += float(line.rsplit(" ", 1)[1])
        elif line.startswith("ipvs_synproxy_cookie_acks_total{") and 'result="valid"' in line:
            sums["synproxy_ack_valid"] += float(line.rsplit(" ", 1)[1])
    return sums


def _wait_for_output(demo: Demo, pattern: re.Pattern[str], deadline: float) -> re.Match[str]:
    while not (m := pattern.search(demo.output())):
        assert demo.proc.poll() is None, demo.output()[-4000:]
        assert time.monotonic() < deadline, demo.output()[-4000:]
        time.sleep(0.5)
    return m


def test_demo_serves_clients_through_the_syn_flood_with_the_console_live() -> None:
    assert demo_mod.SYNPROXY, "the demo's services must have the SYN-proxy flag"
    subprocess.run([sys.executable, "-m", "ipvs_synproxy.cli", "kmod", "build-toa"],
                   cwd=paths.project_root(), check=True, capture_output=True)
    port = _free_port()
    demo = Demo(port)
    try:
        deadline = time.monotonic() + 400
        user, password = _wait_for_output(demo, LOGIN, deadline).groups()
        base = f"http://127.0.0.1:{port}"
        assert f"URL:   {base}/" in demo.output()

        # The console while the clients and the flood run (the first status line)
        _wait_for_output(demo, STATUS, deadline)
        first = _synproxy_metrics(base)
        time.sleep(3)
        second = _synproxy_metrics(base)
        for name in ("synproxy_cookie_sent", "synproxy_ack_valid"):
            assert second.get(name, 0) > first.get(name, 0), (name, first, second)
        overview = _login(base, user, password)
        assert "198.51.100.10:80" in overview, overview[:2000]
        assert "== stopping" not in demo.output(), "the demo stopped while the console was used"

        demo.proc.wait(300)
    finally:
        if demo.proc.poll() is None:
            demo.proc.terminate()
            demo.proc.wait(60)
        demo.reader.join(10)
    out = demo.output()
    assert demo.proc.returncode == 0, out[-4000:]
    assert "== done" in out
    status = STATUS.findall(out)
    assert len(status) >= 2, out[-4000:]
    *counts, synproxy = status[-1]
    ok, failed, flood_syns, rs1, rs2 = map(int, counts)
    assert ok > 0 and flood_syns > 0, status[-1]
    assert failed <= ok // 100, f"{failed} of {ok + failed} client requests failed"
    cookies = re.search(r"synproxy_cookie_sent=(\d+)", synproxy)
    assert cookies, f"the SYN proxy sent no cookie: {synproxy}"
    # the SYN proxy answers the flood itself: the real servers see the
    # clients' SYNs (one per request) only
    assert int(cookies.group(1)) > flood_syns / 2, status[-1]
    assert rs1 + rs2 <= ok + failed + 10, status[-1]
    assert rs1 + rs2 < flood_syns / 10, status[-1]
