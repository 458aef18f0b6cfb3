"""The console in a real browser against the real patched kernel.

The guest runs the standard topology, IPVS services with live traffic and the
console (``tests/testbed/webui_guest.py``); its port is forwarded to the host's
127.0.0.1. Headless Debian Chromium, driven through chromedriver's W3C
WebDriver HTTP protocol (plain urllib, no client library), logs in, looks at
every page, drains a real server and turns the SYN proxy of the FULLNAT service
off, and the guest's ``ipvs-synproxy adm -L -n`` must then show that server
with weight 0 and the service without its ``synproxy`` flag (it had it
before). Screenshots of each page go to build/test-results/screenshots/
(emptied first, so a partial run leaves no old ones behind).

The attack view (issue 20): with the SYN-proxy page open, a spoofed SYN flood
starts on one SYN-proxy VIP (198.51.100.10:8000) in the guest; that VIP's badge
must read "flood" within 10 s of the flood's start while the other SYN-proxy
VIP's ([2001:db8:1::10]:80, real clients only) stays "calm"; after the flood
stops the badge must clear, not before the hold time (FLOOD_CLEAR_S) and within
hold + window + slack.
"""

from __future__ import annotations

import base64
import contextlib
import json
import math
import re
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from werkzeug.security import generate_password_hash

from ipvs_synproxy.build import apt, paths
from ipvs_synproxy.exporter.series import FLOOD_CLEAR_S, FLOOD_SYN_RATE, FLOOD_WINDOW_S
from tests.testbed.guestrun import GuestRun
from tests.testbed.webui_guest import FLOOD_START, FLOOD_STOP

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
ELEMENT = "element-6066-11e4-a52e-4f735466cecf"  # the W3C WebDriver element key
RS = "192.0.2.11_80"
SHOTS = paths.build_dir() / "test-results" / "screenshots"
FLOODED = "tcp_198.51.100.10_8000"  # the guest floods this SYN-proxy service ...
CALM = "tcp_2001:db8:1::10_80"  # ... and not this one (real clients only)
FLAG_WITHIN = 10.0  # s from the flood's start to the badge (issue 20)


@pytest.fixture(scope="module", autouse=True)
def _browser_installed() -> None:
    """Debian's Chromium and its driver, installed on first use (never downloaded
    by a tool of their own)."""
    apt.ensure_debs(["chromium", "chromium-driver"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class WebDriver:
    """The handful of WebDriver commands this test needs."""

    def __init__(self, base: str) -> None:
        self.base = base
        caps = {"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {"binary": CHROMIUM, "args": [
                "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1400,1000", "--no-first-run", "--no-proxy-server"]},
        }}}
        self.session = self._call("POST", "/session", caps)["sessionId"]

    def _call(self, method: str, path: str, body: Any = None) -> Any:
        data = json.dumps(body if body is not None else {}).encode() \
            if method == "POST" else None
        req = urllib.request.Request(self.base + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return json.loads(r.read())["value"]
        except urllib.error.HTTPError as exc:
            raise AssertionError(f"WebDriver {method} {path}: {exc.read()[:500]!r}") from None

    def cmd(self, method: str, path: str, body: Any = None) -> Any:
        return self._call(method, f"/session/{self.session}{path}", body)

    def get(self, url: str) -> None:
        self.cmd("POST", "/url", {"url": url})

    def find(self, css: str) -> str:
        return str(self.cmd("POST", "/element", {"using": "css selector", "value": css})[ELEMENT])

    def find_all(self, css: str) -> list[str]:
        return [e[ELEMENT] for e in self.cmd("POST", "/elements",
                                             {"using": "css selector", "value": css})]

    def type(self, css: str, text: str) -> None:
        self.cmd("POST", f"/element/{self.find(css)}/value", {"text": text})

    def click(self, css: str) -> None:
        self.cmd("POST", f"/element/{self.find(css)}/click", {})

    def _of_element(self, css: str, what: str) -> Any:
        """GET something of the element ``css`` finds. The live pages redraw their
        charts and tables every second: an element found just before a redraw is
        stale by the time it is read, so find it again (a few times at most)."""
        for attempt in range(5):
            try:
                return self.cmd("GET", f"/element/{self.find(css)}/{what}")
            except AssertionError as exc:
                if "stale element" not in str(exc) or attempt == 4:
                    raise
        raise AssertionError("unreachable")

    def text(self, css: str) -> str:
        return str(self._of_element(css, "text"))

    def attr(self, css: str, name: str) -> str | None:
        value = self._of_element(css, f"attribute/{name}")
        return None if value is None else str(value)

    def texts(self, css: str, limit: int = 40) -> list[str]:
        """The text of every element ``css`` finds, read in one script run: no
        element can go stale between the find and the read."""
        return [str(t) for t in self.cmd("POST", "/execute/sync", {
            "script": "return Array.from(document.querySelectorAll(arguments[0]))"
                      ".slice(0, arguments[1]).map(e => e.textContent.trim());",
            "args": [css, limit]})]

    def url(self) -> str:
        return str(self.cmd("GET", "/url"))

    def screenshot(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(self.cmd("GET", "/screenshot")))

    def quit(self) -> None:
        with contextlib.suppress(Exception):
            self._call("DELETE", f"/session/{self.session}")


def _wait(what: str, check: Any, timeout: float = 60) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        try:
            result = check()
            if result:
                return result
        except (AssertionError, OSError):
            if time.monotonic() > deadline:
                raise
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.5)


class Guest(GuestRun):
    """The console and its traffic in the guest (tests/testbed/webui_guest.py)."""

    def __init__(self, config: Path, stopfile: Path, port: int) -> None:
        super().__init__("--topology", "--forward", str(port), "--timeout", "1500", "--",
                         sys.executable, "-m", "tests.testbed.webui_guest", str(config),
                         str(stopfile), str(port))


@pytest.fixture
def console(tmp_path: Path) -> Iterator[tuple[str, str, Guest, Path]]:
    shutil.rmtree(SHOTS, ignore_errors=True)
    port = _free_port()    # the host's end of the forward: never one that is in use
    work = paths.build_dir() / "test-results" / "webui"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    password = secrets.token_urlsafe(12)
    config = work / "console.yaml"
    digest = generate_password_hash(password)
    config.write_text("secret_key_file: secret.key\naudit_log: audit.log\nusers:\n"
                      f"  - name: admin\n    role: admin\n    password_hash: '{digest}'\n")
    stopfile = work / "stop"
    guest = Guest(config, stopfile, port)
    try:
        _wait("the console in the guest",
              lambda: "CONSOLE READY" in guest.output() or guest.proc.poll() is not None,
              timeout=900)
        assert "CONSOLE READY" in guest.output(), guest.output()[-3000:]
        yield f"http://127.0.0.1:{port}", password, guest, stopfile
    finally:
        stopfile.touch()
        try:
            guest.proc.wait(300)
        except subprocess.TimeoutExpired:
            guest.proc.terminate()
            guest.proc.wait(60)
        guest.reader.join(10)


@pytest.fixture
def browser() -> Iterator[WebDriver]:
    port = _free_port()
    driver = subprocess.Popen([CHROMEDRIVER, f"--port={port}"], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        base = f"http://127.0.0.1:{port}"
        _wait("chromedriver", lambda: urllib.request.urlopen(base + "/status", timeout=5))
        wd = WebDriver(base)
        try:
            yield wd
        finally:
            wd.quit()
    finally:
        driver.terminate()
        driver.wait(30)


def _adm_listing(out: str, marker: str) -> list[str]:
    return out.split(f"--- {marker}\n", 1)[1].split(f"--- end {marker}", 1)[0].splitlines()


def _service_line(adm: list[str], addr_port: str) -> list[str]:
    return next(ln.split() for ln in adm if addr_port in ln and ln.startswith("TCP"))


def _badge(browser: WebDriver, sid: str) -> str | None:
    return browser.attr(f'#attack .badge[data-service="{sid}"]', "data-state")


def _nice_axis(browser: WebDriver, css: str) -> None:
    """Every chart's y labels (found by ``css``) are 0 and steps of 1, 2 or 5 x 10^n,
    with a K/M/G unit and "/s": never an odd top such as "3.1"."""
    labels = browser.texts(css, 40)  # a few charts' worth
    labels = [t for t in labels if t.endswith("/s")]
    assert labels, f"no y-axis labels under {css}"
    scale = {"": 1.0, "K": 1e3, "M": 1e6, "G": 1e9}
    values = []
    for text in labels:
        m = re.fullmatch(r"(\d+(?:\.\d+)?)([KMG]?)/s", text)
        assert m, f"odd axis label {text!r}"
        values.append(float(m.group(1)) * scale[m.group(2)])
    for chart in (values[i:i + 2] for i in range(0, len(values) - 1)):
        step = chart[1] - chart[0]
        if chart[0] == 0 and step > 0:
            lead = step / 10 ** math.floor(math.log10(step))
            assert round(lead, 6) in (1, 2, 5), f"axis step {step} in {labels}"


def _attack_view_flags_the_flooded_vip_and_clears(browser: WebDriver, guest: Guest,
                                                   work: Path, shots: Path) -> int:
    """Flood one SYN-proxy VIP in the guest; watch the attack view's badges. Returns
    the SYNs the flood sent."""
    _wait("the attack view's samples",
          lambda: int(browser.attr("#attack", "data-samples") or 0) >= 4, timeout=60)
    assert _badge(browser, FLOODED) == "calm" and _badge(browser, CALM) == "calm"
    assert browser.attr(f'#attack .badge[data-service="{FLOODED}"]', "data-vip") == \
        "198.51.100.10"
    assert f"{FLOOD_SYN_RATE:g} SYNs/s" in browser.text("#flood-threshold")

    (work / FLOOD_START).touch()
    asked = time.monotonic()
    _wait("the flood in the guest", lambda: "FLOOD STARTED" in guest.output(), timeout=120)
    started = time.monotonic()
    _wait("the flooded VIP's badge",
          lambda: _badge(browser, FLOODED) == "flood", timeout=FLAG_WITHIN)
    flagged = time.monotonic()
    print(f"attack view: flagged {flagged - started:.1f} s after the guest said FLOOD STARTED "
          f"({flagged - asked:.1f} s after the host asked for it)")
    assert _badge(browser, CALM) == "calm", "the VIP that is not flooded was flagged"
    # let the chart show a few seconds of it
    for _ in range(6):
        time.sleep(1)
        assert _badge(browser, CALM) == "calm", "the VIP that is not flooded was flagged"
    legend = browser.text(f'#attack .vip-card[data-service="{FLOODED}"] ul.legend')
    _nice_axis(browser, f'#attack .vip-card[data-service="{FLOODED}"] svg .grid text')
    browser.screenshot(shots / "06a-attack-flood.png")

    (work / FLOOD_STOP).touch()
    _wait("the flood to stop", lambda: "FLOOD STOPPING" in guest.output(), timeout=120)
    stopped = time.monotonic()
    _wait("the flood's figures", lambda: "FLOOD STOPPED" in guest.output(), timeout=120)
    m = re.search(r"FLOOD STOPPED sent=(\d+) seconds=([\d.]+) pps=(\d+)", guest.output())
    assert m, guest.output()[-2000:]
    pps = int(m.group(3))
    print(f"attack view: flood {m.group(0)}; legend while flooded: {legend!r}")
    assert pps > FLOOD_SYN_RATE, f"the flood reached {pps} pps only: below the threshold"
    assert _badge(browser, FLOODED) == "flood"
    _wait("the badge to clear", lambda: _badge(browser, FLOODED) == "calm",
          timeout=FLOOD_CLEAR_S + FLOOD_WINDOW_S + 15)
    cleared = time.monotonic() - stopped
    print(f"attack view: cleared {cleared:.1f} s after the flood stopped")
    # held for the clear time after the last flooded window (at or after the flood's
    # end), less the time the guest's word took to arrive and the page's polling
    assert cleared >= FLOOD_CLEAR_S - 2, f"cleared {cleared:.1f} s after the flood: no hold"
    assert _badge(browser, CALM) == "calm"
    browser.screenshot(shots / "06b-attack-clear.png")
    return int(m.group(1))


def test_browser_logs_in_sees_services_drains_a_real_server_and_turns_the_syn_proxy_off(
        console: tuple[str, str, Guest, Path], browser: WebDriver) -> None:
    url, password, guest, stopfile = console
    shots = SHOTS
    sid = "tcp_198.51.100.10_80"

    browser.get(url + "/")
    assert "/login" in browser.url()
    browser.screenshot(shots / "01-login.png")
    browser.type("#username", "admin")
    browser.type("#password", password)
    browser.click("#login")

    _wait("the overview", lambda: "198.51.100.10:80/tcp" in browser.text("#services"))
    overview = browser.text("#services")
    assert "[2001:db8:1::10]:80/tcp" in overview and "192.0.2.11:80 up" in overview
    browser.screenshot(shots / "02-overview.png")

    browser.get(f"{url}/services/{sid}")
    row = f'#real-servers tr[data-rs="{RS}"]'
    assert browser.text(f"{row} .weight") == "2"
    browser.screenshot(shots / "03-service.png")

    browser.click(f"{row} button.drain")
    _wait("the confirmation page", lambda: "Drain real server" in browser.text("main"))
    browser.screenshot(shots / "04-confirm-drain.png")
    browser.click("#confirm")
    _wait("the drained weight", lambda: browser.text(f"{row} .weight") == "0")
    assert browser.text(f"{row} .health") == "drained"
    browser.screenshot(shots / "05-service-drained.png")

    browser.get(f"{url}/synproxy")
    _wait("chart samples",
          lambda: int(browser.attr("#ext-charts", "data-samples") or 0) >= 8, timeout=120)
    assert browser.find_all("#ext-charts .chart svg path.line")
    browser.screenshot(shots / "06-synproxy.png")
    # the per-counter charts are folded under "All extended counters"
    browser.click("#ext-details summary")
    # FULLNAT traffic runs in the guest: its counter moves on the live page
    total = '#ext-totals tr[data-counter="fullnat_conn_new"] .total'
    _wait("the FULLNAT counter", lambda: int(browser.text(total) or 0) > 0)
    _nice_axis(browser, "#ext-charts .chart svg .grid text")
    browser.screenshot(shots / "06-synproxy-details.png")
    browser.click("#ext-details summary")

    flood_sent = _attack_view_flags_the_flooded_vip_and_clears(browser, guest,
                                                               stopfile.parent, shots)

    fnat = f"{url}/services/tcp_198.51.100.10_8000"
    browser.get(fnat)
    assert browser.text("#synproxy-state") == "on"
    browser.click("#toggle-synproxy")
    _wait("the confirmation page",
          lambda: "Turn the SYN proxy off" in browser.text("main"))
    browser.screenshot(shots / "07-confirm-synproxy-off.png")
    browser.click("#confirm")
    _wait("the SYN proxy off", lambda: browser.text("#synproxy-state") == "off")
    assert browser.url().rstrip("/") == fnat
    browser.screenshot(shots / "08-synproxy-off.png")

    browser.get(f"{url}/sysctl")
    assert "net.ipv4.vs.fullnat_lport_min" in browser.text("#sysctls")
    browser.screenshot(shots / "09-sysctl.png")

    with urllib.request.urlopen(url + "/metrics", timeout=30) as r:
        metrics = r.read().decode()
    # the exporter's series (ipvs_synproxy.exporter), per VIP; node_exporter's are gone
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for fam in text_string_to_metric_families(metrics) for s in fam.samples}
    assert any(name == "ipvs_synproxy_real_server_weight" and
               ("real_server", "192.0.2.11") in labels for name, labels in samples), metrics
    flooded = samples[("ipvs_synproxy_syns_received_total", (
        ("port", "8000"), ("protocol", "tcp"), ("vip", "198.51.100.10")))]
    calm = samples[("ipvs_synproxy_syns_received_total", (
        ("port", "80"), ("protocol", "tcp"), ("vip", "2001:db8:1::10")))]
    assert flooded >= flood_sent / 2 > calm, (flooded, flood_sent, calm)
    assert "node_ipvs_" not in metrics

    stopfile.touch()
    guest.proc.wait(300)
    guest.reader.join(10)
    out = guest.output()
    assert guest.proc.returncode == 0, out[-3000:]
    adm = _adm_listing(out, "adm")
    vip = next(i for i, ln in enumerate(adm) if "198.51.100.10:80 wrr" in ln)
    rows = adm[vip + 1:vip + 3]
    drained = [ln.split() for ln in rows if "192.0.2.11:80" in ln]
    assert drained and drained[0][3] == "0", adm  # -> ADDR:PORT Forward Weight …
    # The browser's click flipped the kernel's flag
    assert "synproxy" in _service_line(_adm_listing(out, "adm before"), "198.51.100.10:8000")
    assert "synproxy" not in _service_line(adm, "198.51.100.10:8000"), adm
    audit = (paths.build_dir() / "test-results" / "webui" / "audit.log").read_text()
    assert '"action": "drain"' in audit and '"user": "admin"' in audit
    assert '"action": "set_synproxy"' in audit
