"""keepalived's ``proxy_protocol`` keyword (keepalived/patches/0005): what the
renderer writes, that the patch series applies and documents its keywords, and
the built keepalived's own ``--config-test`` of rendered and hand-written
files (when ``ipvs-synproxy keepalived build`` has run; it needs no kernel).
Programming the attribute into a kernel is tests/vm/test_keepalived_proxy.py's.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from ipvs_synproxy.build import keepalived as keepalived_build
from ipvs_synproxy.config import keepalived
from ipvs_synproxy.config import load as config_load
from ipvs_synproxy.kernel.model import ProxyProtocol

README = Path(__file__).parents[2] / "keepalived" / "README.md"

PROXY = """\
keepalived:
  healthcheck: {type: tcp, interval: 1}
services:
  - vip: 198.51.100.10:80
    forward: fullnat
    synproxy: true
    proxy_protocol: v2
    laddrs: [192.0.2.100]
    real_servers:
      - addr: 192.0.2.11
      - {addr: 192.0.2.12, proxy_protocol: v1}
      - {addr: 192.0.2.13, proxy_protocol: "off"}
  - vip: 198.51.100.10:443
    forward: fullnat
    laddrs: [192.0.2.100]
    real_servers:
      - {addr: 192.0.2.11, proxy_protocol: v1}
      - {addr: 192.0.2.12}
  - vip: "[2001:db8:1::10]:80"
    forward: fullnat
    laddrs: ["2001:db8::100"]
    real_servers:
      - {addr: "[2001:db8::11]:8080", proxy_protocol: v2}
"""


def render(text: str, tmp_path: Path) -> str:
    src = tmp_path / "ipvs.yaml"
    src.write_text(text)
    return keepalived.render(config_load.load(str(src)))


def real_server_blocks(text: str) -> dict[str, str]:
    """'VIP PORT -> RS PORT' -> the real_server block's lines."""
    out: dict[str, str] = {}
    for vs in text.split("\nvirtual_server ")[1:]:
        head = vs.split(" {", 1)[0]
        for rs in vs.split("\n    real_server ")[1:]:
            out[f"{head} -> {rs.split(' {', 1)[0]}"] = rs.split("\n    }", 1)[0]
    return out


# ---- rendering ------------------------------------------------------------------------------


def test_real_servers_get_their_proxy_protocol(tmp_path: Path) -> None:
    text = render(PROXY, tmp_path)
    rs = real_server_blocks(text)
    # the service's default, a real server's own, and off (no keyword)
    assert "        lvs_method FNAT\n        proxy_protocol v2\n" in rs[
        "198.51.100.10 80 -> 192.0.2.11 80"]
    assert "        proxy_protocol v1\n" in rs["198.51.100.10 80 -> 192.0.2.12 80"]
    assert "proxy_protocol" not in rs["198.51.100.10 80 -> 192.0.2.13 80"]
    # without a service default, only the real server that asks
    assert "        proxy_protocol v1\n" in rs["198.51.100.10 443 -> 192.0.2.11 443"]
    assert "proxy_protocol" not in rs["198.51.100.10 443 -> 192.0.2.12 443"]
    assert "        proxy_protocol v2\n" in rs["2001:db8:1::10 80 -> 2001:db8::11 8080"]
    # written per real server only: the virtual_server blocks carry none
    assert text.count("proxy_protocol") == 4
    assert all(line.startswith("        proxy_protocol ")
               for line in text.splitlines() if "proxy_protocol" in line)


def test_the_rendered_value_is_the_models(tmp_path: Path) -> None:
    src = tmp_path / "ipvs.yaml"
    src.write_text(PROXY)
    cfg = config_load.load(str(src))
    text = keepalived.render(cfg)
    rs = real_server_blocks(text)
    for st in cfg.state.services:
        head = (f"{st.service.addr} {st.service.port}")
        for d in st.dests:
            block = rs[f"{head} -> {d.addr} {d.port}"]
            if d.proxy_protocol is ProxyProtocol.OFF:
                assert "proxy_protocol" not in block
            else:
                assert f"proxy_protocol {d.proxy_protocol}\n" in block + "\n"


def test_a_file_without_proxy_protocol_renders_no_keyword(tmp_path: Path) -> None:
    text = render(re.sub(r", proxy_protocol: [^}]*}", "}",
                         PROXY.replace("    proxy_protocol: v2\n", "")), tmp_path)
    assert "proxy_protocol" not in text
    example = Path(__file__).parent / "data" / "keepalived" / "example.conf"
    assert "proxy_protocol" not in example.read_text()


# ---- the patch ----------------------------------------------------------------------------


def patch_keywords() -> dict[str, list[str]]:
    """Every keyword the patches install: patch name -> keywords."""
    out: dict[str, list[str]] = {}
    for p in keepalived_build.read_series():
        out[p.name] = re.findall(r'^\+\s*install_keyword(?:_root)?\("([^"]+)"',
                                 p.read_text(), re.M)
    return out


def test_the_proxy_protocol_patch_is_last_in_the_series() -> None:
    series = keepalived_build.read_series()
    assert series[-1].name == "0005-ipvs-add-the-proxy_protocol-keyword.patch"
    text = series[-1].read_text()
    assert patch_keywords()[series[-1].name] == ["proxy_protocol", "proxy_protocol"]
    assert "#define IPVS_DEST_ATTR_PROXY_PROTOCOL\t16\n" in text
    assert "NLA_PUT_U8(msg, IPVS_DEST_ATTR_PROXY_PROTOCOL, dst->proxy_protocol);" in text
    # a reload applies a changed setting
    assert "rs->proxy_protocol != new_rs->proxy_protocol" in text


def test_every_patched_keyword_is_documented() -> None:
    readme = README.read_text()
    keywords = {k for ks in patch_keywords().values() for k in ks}
    assert {"syn_proxy", "local_address_group", "laddr_group_name",
            "proxy_protocol"} <= keywords
    for k in sorted(keywords):
        assert f"`{k}" in readme, f"keepalived/README.md does not document {k}"
    assert "`proxy_protocol v1|v2|off`" in readme


def test_the_attribute_number_is_the_kernel_patchs() -> None:
    """16 in keepalived's ip_vs.h; the kernel patch adds the attribute right
    after IPVS_DEST_ATTR_TUN_FLAGS (15 since Linux 5.7)."""
    kernel = [p for p in (Path(__file__).parents[2] / "kernel_patches").glob("*/*.patch")
              if "+\tIPVS_DEST_ATTR_PROXY_PROTOCOL," in p.read_text()]
    if not kernel:
        pytest.skip("no kernel patch adds IPVS_DEST_ATTR_PROXY_PROTOCOL yet")
    for p in kernel:
        text = p.read_text()
        assert re.search(r"\n \tIPVS_DEST_ATTR_TUN_FLAGS,[^\n]*\n \n"
                         r"\+\tIPVS_DEST_ATTR_PROXY_PROTOCOL,", text), p
        for name, value in (("OFF", 0), ("V1", 1), ("V2", 2)):
            assert re.search(rf"#define IP_VS_PROXY_PROTOCOL_{name}\t+{value}\b", text), p
    ka = keepalived_build.read_series()[-1].read_text()
    assert "+#define IPVS_DEST_ATTR_PROXY_PROTOCOL\t16\n" in ka


def test_the_series_applies_to_the_pristine_tarball(tmp_path: Path) -> None:
    tarball = keepalived_build.cache_dir() / "dl" / keepalived_build.TARBALL
    if not tarball.exists():
        pytest.skip(f"{tarball} not downloaded (ipvs-synproxy keepalived build fetches it)")
    tree = keepalived_build.extract(tarball, tmp_path)
    for p in keepalived_build.read_series():
        keepalived_build.apply_patch(tree, p)
    parser = (tree / "keepalived" / "check" / "check_parser.c").read_text()
    assert parser.count('install_keyword("proxy_protocol"') == 2
    libipvs = (tree / "keepalived" / "check" / "libipvs.c").read_text()
    assert "IPVS_DEST_ATTR_PROXY_PROTOCOL" in libipvs


# ---- the built keepalived's --config-test ---------------------------------------------------


@pytest.fixture(scope="module")
def binary() -> Path:
    path = keepalived_build.binary_path()
    if not path.exists():
        pytest.skip(f"{path} not built (ipvs-synproxy keepalived build)")
    return path


def config_test(binary: Path, tmp_path: Path, text: str, name: str = "k.conf"
                ) -> tuple[int, str]:
    conf = tmp_path / name
    conf.write_text(text)
    res = keepalived_build.config_test(binary, conf)
    return res.returncode, res.stdout + res.stderr


def test_keepalived_accepts_the_rendered_file(binary: Path, tmp_path: Path) -> None:
    rc, out = config_test(binary, tmp_path, render(PROXY, tmp_path))
    assert rc == 0, out


HAND = """\
global_defs {
    router_id t
}
virtual_server 198.51.100.10 80 {
    protocol TCP
    lvs_sched rr
    lvs_method FNAT
    proxy_protocol v2
    real_server 192.0.2.11 80 {
        weight 1
    }
    real_server 192.0.2.12 80 {
        weight 1
        proxy_protocol v1
    }
    real_server 192.0.2.13 80 {
        weight 1
        proxy_protocol off
    }
}
"""

REFUSED = [
    (HAND.replace("proxy_protocol v1", "proxy_protocol v3"),
     "real server proxy_protocol: unknown value 'v3' (v1, v2 or off) - ignoring"),
    (HAND.replace("    proxy_protocol v2", "    proxy_protocol V2"),
     "virtual server proxy_protocol: unknown value 'V2'"),
    (HAND.replace("proxy_protocol v1", "proxy_protocol"),
     "real server proxy_protocol needs a value (v1, v2 or off)"),
    # the virtual server's default with another method
    (HAND.replace("    lvs_method FNAT", "    lvs_method NAT"),
     "Virtual server [198.51.100.10]:tcp:80: proxy_protocol requires lvs_method FNAT"),
    # a real server's own with another method
    (HAND.replace("        proxy_protocol v1", "        proxy_protocol v1\n"
                  "        lvs_method DR"),
     "real server [192.0.2.12]:tcp:80: proxy_protocol requires lvs_method FNAT"),
    # ... or the default it inherits
    (HAND.replace("        proxy_protocol off", "        lvs_method NAT"),
     "real server [192.0.2.13]:tcp:80: proxy_protocol requires lvs_method FNAT"),
    (HAND.replace("protocol TCP", "protocol UDP"),
     "Virtual server [198.51.100.10]:udp:80: proxy_protocol requires protocol TCP"),
]


def test_keepalived_accepts_the_keyword_in_both_blocks(binary: Path, tmp_path: Path) -> None:
    rc, out = config_test(binary, tmp_path, HAND)
    assert rc == 0, out
    assert out == ""
    # off everywhere, and a fwmark service (its protocol is the kernel's to check)
    fwmark = HAND.replace("virtual_server 198.51.100.10 80 {\n    protocol TCP\n",
                          "virtual_server fwmark 7 {\n").replace(" 80 {\n        weight",
                                                                  " {\n        weight")
    rc, out = config_test(binary, tmp_path, fwmark, "fwmark.conf")
    assert rc == 0, out


@pytest.mark.parametrize(("text", "message"), REFUSED)
def test_keepalived_refuses_bad_proxy_protocol(binary: Path, tmp_path: Path, text: str,
                                               message: str) -> None:
    assert text != HAND
    rc, out = config_test(binary, tmp_path, text)
    assert rc != 0
    assert message in out, out
