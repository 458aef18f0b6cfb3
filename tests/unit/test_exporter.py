"""The exporter: one reading turned into the documented series, its HTTP endpoint and
its --listen parsing. The kernel side (real modules, a real scrape) is
tests/vm/test_exporter.py."""

from __future__ import annotations

import ipaddress
import os
import random
import re
import string
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from ipvs_synproxy.exporter import collector, series, serve
from ipvs_synproxy.kernel import netlink
from ipvs_synproxy.kernel.model import (
    Dest,
    FwdMethod,
    Laddr,
    Protocol,
    Service,
    Stats,
    SyncDaemon,
)

ROOT = Path(__file__).resolve().parents[2]
V4, V6 = ipaddress.IPv4Address, ipaddress.IPv6Address
SP = {name: i + 1 for i, name in enumerate(series.SERVICE_EXT)}  # distinct values
NAT = Service(addr=V4("198.51.100.10"), port=80, synproxy=True, sp_stats=SP,
              stats=Stats(conns=5, inpkts=50, outpkts=40, inbytes=5000, outbytes=4000))
FNAT6 = Service(addr=V6("2001:db8:1:0::10"), port=443, synproxy=True,
                sp_stats={"synproxy_syn_received": 7})
PLAIN = Service(addr=V4("198.51.100.10"), port=8081)  # never had the SYN proxy
MARK = Service(fwmark=7, scheduler="rr")
RS = Dest(addr=V4("192.0.2.11"), port=80, fwd=FwdMethod.MASQ, weight=3, active_conns=2,
          inact_conns=1, stats=Stats(conns=4, inpkts=9, outpkts=8, inbytes=900, outbytes=800))


def reading(**kw: object) -> collector.Reading:
    args: dict[str, object] = dict(
        services=(collector.ServiceReading(NAT, (RS,), ()),
                  collector.ServiceReading(FNAT6, (), (Laddr(V6("2001:db8:2::100"),
                                                             port_conflict=2,
                                                             conn_counts=100),)),
                  collector.ServiceReading(PLAIN, (), ()),
                  collector.ServiceReading(MARK, (), ())),
        ext={"synproxy_syn_received": 999, "fullnat_conn_new": 11, "fullnat_toa_nomem": 3,
             "synproxy_reuse_time_wait": 2, "some_future_counter": 5},
        daemons=(SyncDaemon("backup", "eth0", 1),),
        knobs={"synproxy_secret_period": 64, "fullnat_lport_min": 1024,
               "fullnat_lport_max": 1123},
        wall=64 * 1000 + 5.0)
    args.update(kw)
    return collector.Reading(**args)  # type: ignore[arg-type]


def scrape(r: collector.Reading | None = None) -> dict[str, float]:
    """Samples as ``name{k="v",...}`` (labels sorted), parsed by prometheus-client."""
    text = generate_latest(collector.registry(lambda: r or reading(), "1.2.3")).decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name.endswith("_created"):
                continue
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            out[s.name + ("{" + labels + "}" if labels else "")] = s.value
    return out


def key(name: str, **labels: str) -> str:
    inner = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    return name + ("{" + inner + "}" if inner else "")


NAT_L = {"vip": "198.51.100.10", "port": "80", "protocol": "tcp"}


def test_every_per_service_counter_is_served_with_the_vips_labels() -> None:
    s = scrape()
    for ext, (name, extra) in series.SERVICE_EXT.items():
        assert s[key(name, **NAT_L, **extra)] == SP[ext], ext
    assert s[key("ipvs_synproxy_syns_received_total", vip="2001:db8:1::10", port="443",
                 protocol="tcp")] == 7
    # a service without the counters (SYN proxy never on) has no SYN-proxy series
    assert not [k for k in s if "port=\"8081\"" in k and "syns_received" in k]


def test_netns_counters_with_a_per_service_twin_are_not_served_twice() -> None:
    s = scrape()
    assert "ipvs_synproxy_syns_received_total" not in s  # no unlabelled netns sum
    assert s["ipvs_synproxy_fullnat_connections_total"] == 11
    assert s[key("ipvs_synproxy_toa_options_total", result="no_memory")] == 3
    assert s[key("ipvs_synproxy_session_reuses_total", from_state="time_wait")] == 2
    assert not [k for k in s if "future" in k]


def test_service_and_real_server_traffic() -> None:
    s = scrape()
    assert s[key("ipvs_synproxy_service_connections_total", **NAT_L)] == 5
    assert s[key("ipvs_synproxy_service_packets_total", **NAT_L, direction="in")] == 50
    assert s[key("ipvs_synproxy_service_bytes_total", **NAT_L, direction="out")] == 4000
    rs = {**NAT_L, "real_server": "192.0.2.11", "real_port": "80"}
    assert s[key("ipvs_synproxy_real_server_weight", **rs)] == 3
    assert s[key("ipvs_synproxy_real_server_active_connections", **rs)] == 2
    assert s[key("ipvs_synproxy_real_server_inactive_connections", **rs)] == 1
    assert s[key("ipvs_synproxy_real_server_connections_total", **rs)] == 4
    assert s[key("ipvs_synproxy_real_server_packets_total", **rs, direction="out")] == 8
    assert s[key("ipvs_synproxy_real_server_bytes_total", **rs, direction="in")] == 900
    assert s[key("ipvs_synproxy_service_info", **NAT_L, scheduler="wlc",
                 syn_proxy="on")] == 1
    assert s[key("ipvs_synproxy_service_info", vip="fwmark:7", port="0", protocol="fwmark",
                 scheduler="rr", syn_proxy="off")] == 1


def test_local_ports_used_and_free_per_laddr() -> None:
    la = {"vip": "2001:db8:1::10", "port": "443", "protocol": "tcp",
          "laddr": "2001:db8:2::100"}
    s = scrape()
    assert s[key("ipvs_synproxy_fullnat_lports_used", **la)] == 100
    assert s[key("ipvs_synproxy_fullnat_lports_free", **la)] == 0  # 100 ports, 100 used
    assert s[key("ipvs_synproxy_fullnat_lport_conflicts_total", **la)] == 2
    wide = scrape(reading(knobs={"fullnat_lport_min": 1000, "fullnat_lport_max": 1199}))
    assert wide[key("ipvs_synproxy_fullnat_lports_free", **la)] == 100


def test_cookie_key_epoch_and_never_the_secret() -> None:
    s = scrape()
    assert s["ipvs_synproxy_cookie_key_period_seconds"] == 64
    assert s["ipvs_synproxy_cookie_key_epoch"] == 1000
    text = generate_latest(collector.registry(reading, "1")).decode()
    assert "secret" not in text.replace("secret_period", "").replace("the secret", "")
    stock = scrape(reading(ext=None))
    assert "ipvs_synproxy_cookie_key_epoch" not in stock
    assert stock[key("ipvs_synproxy_build_info", version="1.2.3", extensions="no")] == 1


def test_sync_daemons_both_states_always_present() -> None:
    s = scrape()
    assert s[key("ipvs_synproxy_sync_daemon_running", state="backup")] == 1
    assert s[key("ipvs_synproxy_sync_daemon_running", state="master")] == 0
    none = scrape(reading(daemons=()))
    assert none[key("ipvs_synproxy_sync_daemon_running", state="backup")] == 0


@pytest.mark.parametrize("exc", [netlink.IpvsUnavailable("no IPVS"),
                                 netlink.NetlinkError("EPERM", 1), PermissionError(1, "x")])
def test_a_failed_read_is_up_0_and_nothing_else(exc: Exception) -> None:
    def broken() -> collector.Reading:
        raise exc

    text = generate_latest(collector.registry(broken, "1")).decode()
    samples = [s for f in text_string_to_metric_families(text) for s in f.samples]
    assert [(s.name, s.value) for s in samples] == [("ipvs_synproxy_up", 0)]


def test_served_names_types_and_labels_are_the_series_table() -> None:
    text = generate_latest(collector.registry(reading, "1")).decode()
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    for s in series.ALL:
        base = s.name.removesuffix("_total") if s.kind == "counter" else s.name
        assert base in fams, s.name
        assert fams[base].type == s.kind, s.name
        for sample in fams[base].samples:
            assert set(sample.labels) == set(s.labels), (s.name, sample.labels)
    assert set(fams) == {s.name.removesuffix("_total") if s.kind == "counter" else s.name
                         for s in series.ALL}
    assert not [n for n in fams if n.startswith("node_") or "synproxy_synproxy" in n]


def test_read_takes_everything_from_one_connection() -> None:
    from tests.unit.fake_ipvs import FakeKernel

    k = FakeKernel()
    k.services_[NAT.key()] = NAT
    k.dests_[NAT.key()] = [RS]
    k.laddrs_[NAT.key()] = [Laddr(V4("192.0.2.100"), conn_counts=3)]
    k.daemons_ = [SyncDaemon("master", "eth0", 1)]
    k.knobs = {"synproxy_secret_period": (32,)}
    r = collector.read(lambda: k, k, clock=lambda: 99.0)
    assert r.services[0].dests == (RS,) and r.services[0].laddrs[0].conn_counts == 3
    assert r.ext == k.ext_stats() and r.daemons[0].state == "master"
    assert r.knobs == {"synproxy_secret_period": 32} and r.wall == 99.0


# -- which extended counters the kernel has, and where each one goes


def _kernel_ext_names(kernel_dir: Path) -> set[str]:
    """The ext-stats names the series leaves in place (added, and not removed later)."""
    line = re.compile(r'^([+-])\s*\[IP_VS_EXT_\w+\]\s*=\s*"(\w+)"', re.M)
    names: set[str] = set()
    for patch in (kernel_dir / "series").read_text().split():
        for sign, name in line.findall((kernel_dir / patch).read_text()):
            (names.add if sign == "+" else names.discard)(name)
    return names


@pytest.mark.parametrize("kernel", ["linux-6.1", "linux-6.12"])
def test_every_extended_counter_of_the_kernel_is_served(kernel: str) -> None:
    names = _kernel_ext_names(ROOT / "kernel_patches" / kernel)
    assert len(names) > 40
    mapped = set(series.SERVICE_EXT) | set(series.NETNS_EXT)
    assert sorted(names - mapped) == [], "add these to exporter/series.py"
    assert sorted(mapped - names) == [], "the kernel has no such counters"


def test_every_series_is_documented() -> None:
    doc = (ROOT / "docs" / "metrics.md").read_text()
    missing = [s.name for s in series.ALL if f"`{s.name}`" not in doc]
    assert missing == []
    for _, (_, extra) in {**series.SERVICE_EXT, **series.NETNS_EXT}.items():
        for value in extra.values():
            assert f"`{value}`" in doc, value


# -- the HTTP side


def _call(path: str, method: str = "GET") -> tuple[str, bytes]:
    status: list[str] = []
    wsgi = serve.app(collector.registry(reading, "1"))
    body = b"".join(wsgi({"PATH_INFO": path, "REQUEST_METHOD": method, "QUERY_STRING": ""},
                         lambda st, headers: status.append(st)))
    return status[0], body


def test_http_endpoint() -> None:
    st, body = _call("/metrics")
    assert st.startswith("200") and b"ipvs_synproxy_up 1.0" in body
    assert _call("/")[0].startswith("200")
    assert _call("/secret")[0].startswith("404")
    assert _call("/metrics", "POST")[0].startswith("405")


@pytest.mark.parametrize("text,want", [
    ("127.0.0.1:10963", ("127.0.0.1", 10963)),
    ("[::1]:9", ("::1", 9)),
    (":10963", ("::", 10963)),
    ("192.0.2.5:65535", ("192.0.2.5", 65535)),
])
def test_listen_ok(text: str, want: tuple[str, int]) -> None:
    assert serve.parse_listen(text) == want


@pytest.mark.parametrize("text", ["", "10963", "127.0.0.1", "127.0.0.1:0",
                                  "127.0.0.1:65536", "::1:80", "localhost:80",
                                  "[::1]80", "1.2.3.4:-1", "1.2.3.4: 80"])
def test_listen_bad(text: str) -> None:
    with pytest.raises(serve.ListenError, match="--listen"):
        serve.parse_listen(text)


def _random_texts(seed: int) -> Iterator[str]:
    rnd = random.Random(seed)
    alphabet = string.printable + "[]:"
    for _ in range(2000):
        yield "".join(rnd.choice(alphabet) for _ in range(rnd.randint(0, 24)))


def test_listen_random_input_is_an_address_or_a_clear_error() -> None:
    seed = int(os.environ.get("TEST_SEED", random.randrange(2**32)))
    print(f"seed {seed} (replay: TEST_SEED={seed})")
    for text in _random_texts(seed):
        try:
            host, port = serve.parse_listen(text)
        except serve.ListenError as exc:
            assert str(exc).startswith("--listen"), (seed, text)
            continue
        ipaddress.ip_address(host)
        assert 0 < port < 65536, (seed, text)


def test_protocols_spelled_as_the_series_table_says() -> None:
    assert collector.service_labels(Service(protocol=Protocol.UDP, addr=V4("192.0.2.1"),
                                            port=53)) == {
        "vip": "192.0.2.1", "port": "53", "protocol": "udp"}
