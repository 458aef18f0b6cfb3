"""``make demo`` end to end: the steps, then the console reachable from the host.

Boots the guest like the Makefile does (with a forwarded port of its own, free
on the host, so it never clashes with the browser test's 8080), holds for
:data:`HOLD` seconds, and meanwhile fetches ``/metrics`` from the host's
127.0.0.1 and logs in to the console with the credentials the demo printed
(login form with its CSRF token, as a browser would). The demo must exit 0 and
its status lines must show clients served while the SYN flood ran.
"""

from __future__ import annotations

import http.cookiejar
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request

from ipvs_synproxy import paths
from ipvs_synproxy.testbed import demo as demo_mod

HOLD = 25
LOGIN = re.compile(r"login: user (\S+), password (\S+)")
STATUS = re.compile(r"^\[\s*\d+ s\] requests ok (\d+) failed (\d+) \| flood SYNs at lb (\d+) "
                    r"\| SYNs at real servers: rs1 (\d+) rs2 (\d+)", re.M)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Demo:
    def __init__(self, port: int) -> None:
        self.lines: list[str] = []
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ipvs_synproxy.cli", "vm", "exec", "--topology",
             "--forward", str(port), "--timeout", "600", "--",
             "python", "-m", "ipvs_synproxy.testbed.demo", "--console-port", str(port),
             "--hold", str(HOLD)],
            cwd=paths.project_root(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)

    def output(self) -> str:
        return "".join(self.lines)


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


def test_demo_ends_with_the_console_reachable_from_the_host() -> None:
    subprocess.run([sys.executable, "-m", "ipvs_synproxy.cli", "kmod", "build-toa"],
                   cwd=paths.project_root(), check=True, capture_output=True)
    port = _free_port()
    demo = Demo(port)
    try:
        deadline = time.monotonic() + 400
        while not LOGIN.search(demo.output()):
            assert demo.proc.poll() is None, demo.output()[-4000:]
            assert time.monotonic() < deadline, demo.output()[-4000:]
            time.sleep(0.5)
        base = f"http://127.0.0.1:{port}"
        assert f"URL:   {base}/" in demo.output()
        m = LOGIN.search(demo.output())
        assert m is not None
        user, password = m.groups()

        with urllib.request.urlopen(base + "/metrics", timeout=30) as r:
            metrics = r.read().decode()
        assert "ipvs_synproxy_up 1.0" in metrics, metrics[:2000]
        assert 'remote_address="192.0.2.11"' in metrics

        overview = _login(base, user, password)
        assert "198.51.100.10:80" in overview, overview[:2000]

        demo.proc.wait(300)
    finally:
        if demo.proc.poll() is None:
            demo.proc.terminate()
            demo.proc.wait(60)
        demo.reader.join(10)
    out = demo.output()
    assert demo.proc.returncode == 0, out[-4000:]
    status = [tuple(map(int, g)) for g in STATUS.findall(out)]
    assert status, out[-4000:]
    ok, _failed, flood_syns, rs1, rs2 = status[-1]
    assert ok > 0 and flood_syns > 0, status
    assert "== done" in out
    if demo_mod.SYNPROXY and "synproxy_cookie_sent=" in out:
        # the SYN proxy answers the flood itself: the real servers see about the
        # clients' SYNs only
        assert rs1 + rs2 < flood_syns / 2, status
