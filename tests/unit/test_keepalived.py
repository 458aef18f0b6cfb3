"""keepalived.conf rendering, the config's keepalived section, and the build's cache key."""

from __future__ import annotations

import hashlib
import io
import ipaddress
from pathlib import Path

import pytest

from ipvs_synproxy.build import keepalived as keepalived_build
from ipvs_synproxy.cli import main as cli
from ipvs_synproxy.config import keepalived
from ipvs_synproxy.config import load as config_load
from ipvs_synproxy.config import reader as config_reader
from ipvs_synproxy.kernel.model import Laddr

DATA = Path(__file__).parent / "data" / "keepalived"
EXAMPLE = DATA / "example.yaml"
GOLDEN = DATA / "example.conf"

SMALL = """\
keepalived:
  healthcheck: {type: tcp, interval: 1}
services:
  - vip: 198.51.100.10:80
    forward: fullnat
    synproxy: true
    laddrs: [192.0.2.100]
    real_servers:
      - addr: 192.0.2.11
"""


def load(text: str, tmp_path: Path, name: str = "ipvs.yaml") -> config_load.Config:
    path = tmp_path / name
    path.write_text(text)
    return config_load.load(str(path))


def render_text(text: str, tmp_path: Path) -> str:
    return keepalived.render(load(text, tmp_path))


# ---- golden output and determinism ------------------------------------------------------


def test_example_renders_to_the_golden_file() -> None:
    cfg = config_load.load(str(EXAMPLE))
    assert keepalived.render(cfg) == GOLDEN.read_text()


def test_rendering_is_deterministic(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                    ) -> None:
    cfg = config_load.load(str(EXAMPLE))
    first = keepalived.render(cfg)
    assert keepalived.render(config_load.load(str(EXAMPLE))) == first
    assert cli.main(["keepalived", "render", str(EXAMPLE)]) == 0
    assert capsys.readouterr().out == first
    out = tmp_path / "keepalived.conf"
    assert cli.main(["keepalived", "render", str(EXAMPLE), "-o", str(out)]) == 0
    assert out.read_text() == first


def test_the_golden_file_uses_the_patched_keywords() -> None:
    text = GOLDEN.read_text()
    assert "    lvs_method FNAT\n    syn_proxy\n    laddr_group_name laddr_tcp_198_51_100_10_80\n" \
        in text
    assert "local_address_group laddr_tcp_198_51_100_10_80 {\n    192.0.2.100-103\n" \
        "    192.0.2.110\n}" in text
    assert "HTTP_GET" in text and "MISC_CHECK" in text and "TCP_CHECK" in text
    # a checker per real server, except for the service with 'type: none'
    assert text.count("real_server ") == 7
    assert text.count("_CHECK {") + text.count("HTTP_GET {") == 6
    assert 'misc_path "/usr/local/bin/check-dns 192.0.2.11 53"' in text


def test_defaults_without_a_keepalived_section(tmp_path: Path) -> None:
    text = render_text("services:\n  - vip: 198.51.100.10:80\n    real_servers:\n"
                       "      - {addr: 192.0.2.11}\n", tmp_path)
    assert "router_id ipvs-synproxy" in text
    assert "vrrp_instance" not in text and "local_address_group" not in text
    assert "lvs_method NAT" in text and "TCP_CHECK {" in text
    assert "connect_timeout 3\n" in text and "delay_loop 5\n" in text


def test_single_vrrp_instance_defaults_to_every_vip(tmp_path: Path) -> None:
    text = render_text(SMALL.replace("keepalived:\n", "keepalived:\n  vrrp:\n"
                                     "    - {name: VI_1, interface: eth0, "
                                     "virtual_router_id: 7}\n"), tmp_path)
    assert "    state BACKUP\n" in text and "priority 100" in text
    assert "virtual_ipaddress {\n        198.51.100.10/32 dev eth0\n    }" in text


def test_laddr_ranges() -> None:
    def las(*addrs: str) -> list[Laddr]:
        return [Laddr(ipaddress.ip_address(a)) for a in addrs]

    assert keepalived.laddr_entries(las("192.0.2.100", "192.0.2.101", "192.0.2.102",
                                        "192.0.2.200", "192.0.2.5")) == [
        "192.0.2.100-102", "192.0.2.200", "192.0.2.5"]
    # a run never crosses the last byte
    assert keepalived.laddr_entries(las("192.0.2.255", "192.0.3.0")) == [
        "192.0.2.255", "192.0.3.0"]
    assert keepalived.laddr_entries(las("2001:db8::fe", "2001:db8::ff", "2001:db8::100")) == [
        "2001:db8::fe-100"]


# ---- invalid configs ----------------------------------------------------------------------

BAD = [
    ("keepalived:\n  routerid: x\n", "ipvs.yaml:2: keepalived.routerid: unknown key"),
    ("keepalived:\n  healthcheck: {type: ping}\n",
     "ipvs.yaml:2: keepalived.healthcheck.type: unknown check type 'ping'"),
    ("keepalived:\n  healthcheck:\n    type: tcp\n    interval: -1\n",
     "ipvs.yaml:4: keepalived.healthcheck.interval: -1 out of range"),
    ("keepalived:\n  healthcheck:\n    type: tcp\n    path: /x\n",
     "ipvs.yaml:4: keepalived.healthcheck.path: 'path' is for http checks"),
    ("keepalived:\n  healthcheck:\n    type: misc\n",
     "ipvs.yaml:3: keepalived.healthcheck.command: a misc check needs a 'command'"),
    ("keepalived:\n  healthcheck: {type: misc, command: 'check \"x\"'}\n",
     "keepalived.healthcheck.command: a command may not contain double quotes"),
    ("keepalived:\n  healthcheck: {type: misc, command: 'check {host}'}\n",
     "unknown placeholder {host}"),
    ("keepalived:\n  vrrp:\n    - {name: VI_1, interface: eth0}\n",
     "ipvs.yaml:3: keepalived.vrrp[0]: a VRRP instance needs 'virtual_router_id'"),
    ("keepalived:\n  vrrp:\n    - {name: VI_1, interface: eth0, virtual_router_id: 300}\n",
     "keepalived.vrrp[0].virtual_router_id: 300 out of range 1-255"),
    ("keepalived:\n  vrrp:\n    - {name: VI_1, interface: eth0, virtual_router_id: 1,\n"
     "       state: master, preempt: false, vips: [198.51.100.10]}\n",
     "keepalived.vrrp[0].preempt: 'preempt: false' needs 'state: backup'"),
    ("keepalived:\n  vrrp:\n    - {name: VI_1, interface: eth0, virtual_router_id: 1,"
     " vips: [10.0.0.1/33]}\n", "keepalived.vrrp[0].vips[0]: not an address"),
    ("keepalived:\n  vrrp:\n    - {name: A, interface: eth0, virtual_router_id: 1, vips: [x]}\n",
     "keepalived.vrrp[0].vips[0]: not an address"),
    ("keepalived:\n  vrrp:\n"
     "    - {name: A, interface: eth0, virtual_router_id: 1, vips: [192.0.2.1]}\n"
     "    - {name: A, interface: eth1, virtual_router_id: 2, vips: [192.0.2.2]}\n",
     "ipvs.yaml:4: keepalived.vrrp[1].name: duplicate VRRP instance name 'A'"),
    ("keepalived:\n  vrrp:\n    - {name: A, interface: eth0, virtual_router_id: 1}\n"
     "    - {name: B, interface: eth0, virtual_router_id: 2}\n",
     "keepalived.vrrp[0]: with several VRRP instances each needs its 'vips'"),
    ("keepalived:\n  vrrp:\n    - {name: A, interface: eth0, virtual_router_id: 1,\n"
     "       auth_pass: toolongpassword, vips: [192.0.2.1]}\n",
     "keepalived.vrrp[0].auth_pass: not a password"),
    ("services:\n  - vip: 198.51.100.10:80\n    healthcheck:\n      type: http\n"
     "      status_code: 999\n    real_servers: [{addr: 192.0.2.11}]\n",
     "ipvs.yaml:5: services[0].healthcheck.status_code: 999 out of range 100-599"),
    ("services:\n  - vip: 198.51.100.10:80\n    healthcheck: {tpye: tcp}\n",
     "ipvs.yaml:3: services[0].healthcheck.tpye: unknown key 'tpye'"),
]


@pytest.mark.parametrize(("text", "message"), BAD)
def test_invalid_keepalived_sections_are_rejected_at_load(
        text: str, message: str, tmp_path: Path) -> None:
    with pytest.raises(config_reader.ConfigError) as exc:
        load(text, tmp_path)
    assert message in str(exc.value)


UNRENDERABLE = [
    ("services:\n  - vip: 198.51.100.10:80\n    scheduler: nosuch\n"
     "    real_servers: [{addr: 192.0.2.11}]\n",
     "ipvs.yaml:3: services[0].scheduler: keepalived does not know the scheduler 'nosuch'"),
    ("services:\n  - vip: 198.51.100.10:80\n    real_servers:\n"
     "      - {addr: 192.0.2.11, forward: local}\n",
     "ipvs.yaml:4: services[0].real_servers[0].forward: keepalived has no 'local'"),
    ("services:\n  - vip: 198.51.100.10:80\n",
     "ipvs.yaml:2: services[0]: keepalived ignores a virtual server without real servers"),
    ("services:\n  - vip: 198.51.100.10:80\n    one_packet: true\n"
     "    real_servers: [{addr: 192.0.2.11}]\n",
     "ipvs.yaml:3: services[0].one_packet: keepalived allows one-packet scheduling only "
     "for UDP"),
]


@pytest.mark.parametrize(("text", "message"), UNRENDERABLE)
def test_what_keepalived_cannot_express_is_rejected_at_render(
        text: str, message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
        ) -> None:
    cfg = load(text, tmp_path)  # fine for apply
    with pytest.raises(config_reader.ConfigError) as exc:
        keepalived.render(cfg)
    assert message in str(exc.value)
    assert cli.main(["keepalived", "render", str(tmp_path / "ipvs.yaml")]) == 2
    out = capsys.readouterr()
    assert out.out == ""
    assert message in out.err and "nothing was rendered" in out.err


def test_render_of_an_invalid_file_exits_2_and_writes_nothing(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "ipvs.yaml"
    src.write_text("keepalived:\n  vrrp: 1\n")
    out = tmp_path / "keepalived.conf"
    assert cli.main(["keepalived", "render", str(src), "-o", str(out)]) == 2
    assert not out.exists()
    err = capsys.readouterr().err
    assert "invalid config: " in err and "ipvs.yaml:2: keepalived.vrrp: expected a list" in err
    assert cli.main(["keepalived", "render", str(tmp_path / "missing.yaml")]) == 2


# ---- the build ------------------------------------------------------------------------------


def test_series_lists_every_patch_in_order() -> None:
    series = keepalived_build.read_series()
    names = [p.name for p in series]
    assert names == sorted(names) and len(names) == 5
    on_disk = sorted(p.name for p in keepalived_build.patches_dir().glob("*.patch"))
    assert names == on_disk


def test_build_key_follows_the_patches(tmp_path: Path) -> None:
    series = keepalived_build.read_series()
    key = keepalived_build.build_key(series)
    assert key == keepalived_build.build_key(series)
    changed = tmp_path / series[0].name
    changed.write_bytes(series[0].read_bytes() + b"\n")
    assert keepalived_build.build_key([changed, *series[1:]]) != key
    assert keepalived_build.binary_path().parent.name == key


def test_cached_build_is_not_rebuilt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IPVS_SYNPROXY_BUILD", str(tmp_path))
    binary = keepalived_build.binary_path()
    binary.parent.mkdir(parents=True)
    binary.write_text("#!/bin/sh\n")

    def no(*args: object, **kw: object) -> None:
        raise AssertionError("must not rebuild")

    monkeypatch.setattr(keepalived_build, "fetch_tarball", no)
    monkeypatch.setattr("ipvs_synproxy.build.apt.ensure_debs", no)
    res = keepalived_build.build()
    assert not res.rebuilt and res.binary == binary


def test_a_tarball_with_the_wrong_hash_is_refused(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IPVS_SYNPROXY_BUILD", str(tmp_path))

    class Resp(io.BytesIO):
        def __enter__(self) -> Resp:
            return self

    monkeypatch.setattr("urllib.request.urlopen", lambda url, timeout: Resp(b"not keepalived"))
    with pytest.raises(keepalived_build.KeepalivedBuildError, match="SHA-256"):
        keepalived_build.fetch_tarball()
    assert not list((tmp_path / "keepalived" / "dl").iterdir())


def test_a_verified_tarball_is_reused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IPVS_SYNPROXY_BUILD", str(tmp_path))
    data = b"pretend tarball"
    monkeypatch.setattr(keepalived_build, "TARBALL_SHA256", hashlib.sha256(data).hexdigest())
    dl = tmp_path / "keepalived" / "dl"
    dl.mkdir(parents=True)
    (dl / keepalived_build.TARBALL).write_bytes(data)
    monkeypatch.setattr("urllib.request.urlopen", None)
    assert keepalived_build.fetch_tarball() == dl / keepalived_build.TARBALL


# ---- a pair that hands its connections over ---------------------------------------------

PAIR = """\
keepalived:
  vrrp:
    - {name: VI_CLIENT, interface: eth0, virtual_router_id: 51, vips: [198.51.100.10/32]}
    - {name: VI_SERVER, interface: eth1, virtual_router_id: 52,
       vips: [192.0.2.1/24, 192.0.2.100/32, 192.0.2.101/32]}
  pair: {sync_interface: eth1, sync_instance: VI_SERVER, syncid: 7}
services:
  - vip: 198.51.100.10:80
    forward: fullnat
    synproxy: true
    laddrs: [192.0.2.100, 192.0.2.101]
    real_servers: [{addr: 192.0.2.11}]
"""


def test_a_pair_renders_the_sync_daemon_and_one_sync_group(tmp_path: Path) -> None:
    out = render_text(PAIR, tmp_path)
    assert "    lvs_sync_daemon eth1 VI_SERVER id 7\n" in out
    assert "vrrp_sync_group VG_PAIR {\n    group {\n        VI_CLIENT\n        VI_SERVER\n" \
        "    }\n}\n" in out
    # without a pair, neither
    plain = render_text(PAIR.replace(
        "  pair: {sync_interface: eth1, sync_instance: VI_SERVER, syncid: 7}\n", ""), tmp_path)
    assert "lvs_sync_daemon" not in plain and "vrrp_sync_group" not in plain


def test_a_pair_defaults_to_the_first_instance_and_syncid_1(tmp_path: Path) -> None:
    out = render_text(PAIR.replace("sync_instance: VI_SERVER, syncid: 7", "sync_group: G1"),
                      tmp_path)
    assert "    lvs_sync_daemon eth1 VI_CLIENT id 1\n" in out
    assert "vrrp_sync_group G1 {" in out


PAIR_BAD = [
    (PAIR.replace("192.0.2.101/32]", "192.0.2.102/32]"),
     "keepalived.pair: services[0] laddr 192.0.2.101 is not a VIP of any VRRP instance"),
    (PAIR.replace("sync_instance: VI_SERVER", "sync_instance: VI_NONE"),
     "keepalived.pair.sync_instance: no VRRP instance is named 'VI_NONE'"),
    (PAIR.replace("syncid: 7", "syncid: 256"), "syncid: 256 out of range 1-255"),
    (PAIR.replace("sync_interface: eth1, ", ""), "a pair needs 'sync_interface'"),
    (PAIR.replace("syncid: 7", "sync_id: 7"), "keepalived.pair.sync_id: unknown key"),
    ("keepalived:\n  pair: {sync_interface: eth1}\n",
     "keepalived.pair: a pair needs 'vrrp' instances"),
]


@pytest.mark.parametrize(("text", "message"), PAIR_BAD)
def test_an_incoherent_pair_is_rejected_at_load(text: str, message: str,
                                                tmp_path: Path) -> None:
    with pytest.raises(config_reader.ConfigError) as exc:
        load(text, tmp_path)
    assert message in str(exc.value)
