"""model.py: values are valid once built, and bad input names where it came from."""

from __future__ import annotations

import ipaddress

import pytest

from ipvs_synproxy.kernel.model import (
    IP_VS_SVC_F_ONEPACKET,
    IP_VS_SVC_F_PERSISTENT,
    IP_VS_SVC_F_SYNPROXY,
    Dest,
    Family,
    FwdMethod,
    Laddr,
    ModelError,
    Protocol,
    ProxyProtocol,
    Service,
    Stats,
    Timeouts,
    make_dest,
    make_laddr,
    make_service,
    parse_endpoint,
    proxy_protocol_error,
)


def test_service_family_follows_the_address() -> None:
    v4 = make_service(source="t", addr="198.51.100.10", port=80)
    v6 = make_service(source="t", addr="2001:db8:1::10", port=80)
    assert v4.af == Family.INET
    assert v6.af == Family.INET6
    assert str(v4) == "198.51.100.10:80/tcp"
    assert str(v6) == "[2001:db8:1::10]:80/tcp"


def test_fwmark_service_takes_its_family_explicitly() -> None:
    svc = make_service(source="t", fwmark=7, family="ipv6")
    assert svc.af == Family.INET6
    assert svc.addr is None
    assert "fwmark 7" in str(svc)


def test_synproxy_and_persistence_set_kernel_flags() -> None:
    svc = make_service(source="t", addr="198.51.100.10", port=80, synproxy=True,
                       persistent=300, flags=IP_VS_SVC_F_ONEPACKET)
    assert svc.kernel_flags == (IP_VS_SVC_F_SYNPROXY | IP_VS_SVC_F_PERSISTENT
                                | IP_VS_SVC_F_ONEPACKET)
    assert make_service(source="t", addr="198.51.100.10", port=80).kernel_flags == 0


def test_full_netmask_is_the_same_as_none() -> None:
    a = make_service(source="t", addr="198.51.100.10", port=80, netmask=32)
    b = make_service(source="t", addr="198.51.100.10", port=80)
    assert a.prefix == b.prefix == 32
    assert make_service(source="t", addr="2001:db8:1::10", port=80).prefix == 128


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"addr": "198.51.100.300", "port": 80}, "address"),
    ({"addr": "198.51.100.10", "port": 70000}, "port"),
    ({"addr": "198.51.100.10", "port": 0}, "port"),
    ({"addr": "198.51.100.10", "port": "http"}, "port"),
    ({"addr": "198.51.100.10", "port": 80, "protocol": "icmp"}, "protocol"),
    ({"addr": "198.51.100.10", "port": 80, "scheduler": "Round Robin"}, "scheduler"),
    ({"addr": "198.51.100.10", "port": 80, "scheduler": "x" * 16}, "scheduler"),
    ({"addr": "198.51.100.10", "port": 80, "netmask": 33}, "netmask"),
    ({"addr": "198.51.100.10", "port": 80, "synproxy": "yes"}, "synproxy"),
    ({"addr": "198.51.100.10", "port": 80, "synproxy": True, "protocol": "udp"},
     "synproxy"),
    ({"addr": "198.51.100.10", "port": 80, "flags": IP_VS_SVC_F_SYNPROXY}, "flags"),
    ({"fwmark": 5, "addr": "198.51.100.10", "port": 80}, "fwmark"),
    ({}, "address"),
])
def test_bad_service_input_names_source_and_field(kwargs: dict[str, object],
                                                  field: str) -> None:
    with pytest.raises(ModelError) as info:
        make_service(source="lb.yaml:12", **kwargs)
    assert info.value.source == "lb.yaml:12"
    assert info.value.field == field
    assert str(info.value).startswith(f"lb.yaml:12: {field}: ")


def test_port_zero_is_allowed_for_persistent_services() -> None:
    svc = make_service(source="t", addr="198.51.100.10", port=0, persistent=60)
    assert svc.port == 0


@pytest.mark.parametrize(("text", "method"), [
    ("masq", FwdMethod.MASQ), ("nat", FwdMethod.MASQ), ("dr", FwdMethod.ROUTE),
    ("route", FwdMethod.ROUTE), ("tunnel", FwdMethod.TUNNEL), ("local", FwdMethod.LOCAL),
    ("fullnat", FwdMethod.FULLNAT), ("FULLNAT", FwdMethod.FULLNAT), (5, FwdMethod.FULLNAT),
])
def test_forwarding_method_names(text: str | int, method: FwdMethod) -> None:
    assert FwdMethod.parse(text) is method


def test_fullnat_is_method_five() -> None:
    assert int(FwdMethod.FULLNAT) == 5


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"addr": "192.0.2.x"}, "address"),
    ({"addr": "192.0.2.11", "fwd": "nat64"}, "forwarding method"),
    ({"addr": "192.0.2.11", "fwd": 4}, "forwarding method"),
    ({"addr": "192.0.2.11", "weight": -1}, "weight"),
    ({"addr": "192.0.2.11", "weight": 2**31}, "weight"),
    ({"addr": "192.0.2.11", "u_thresh": 10, "l_thresh": 20}, "l_thresh"),
    ({"addr": "192.0.2.11", "port": -5}, "port"),
])
def test_bad_dest_input_names_source_and_field(kwargs: dict[str, object],
                                               field: str) -> None:
    with pytest.raises(ModelError) as info:
        make_dest(source="--real-server", **kwargs)
    assert info.value.source == "--real-server"
    assert info.value.field == field


def test_dest_counters_do_not_take_part_in_equality() -> None:
    configured = make_dest(source="t", addr="192.0.2.11", port=80, weight=3)
    listed = Dest(addr=ipaddress.ip_address("192.0.2.11"), port=80, weight=3,
                  active_conns=4, inact_conns=9, stats=Stats(conns=13))
    assert configured == listed
    assert configured != make_dest(source="t", addr="192.0.2.11", port=80, weight=4)


def test_service_stats_do_not_take_part_in_equality() -> None:
    a = make_service(source="t", addr="198.51.100.10", port=80)
    b = Service(protocol=Protocol.TCP, addr=ipaddress.ip_address("198.51.100.10"), port=80,
                stats=Stats(conns=1, inbytes=100))
    assert a == b


def test_values_are_frozen() -> None:
    svc = make_service(source="t", addr="198.51.100.10", port=80)
    with pytest.raises(AttributeError):
        svc.port = 81  # type: ignore[misc]


def test_direct_construction_is_validated_too() -> None:
    with pytest.raises(ModelError):
        Dest(addr="192.0.2.11")  # type: ignore[arg-type]
    with pytest.raises(ModelError):
        Timeouts(tcp=-1)


def test_laddr() -> None:
    la = make_laddr(source="t", addr="2001:db8:2::100")
    assert la.af == Family.INET6
    assert la == Laddr(addr=ipaddress.ip_address("2001:db8:2::100"), conn_counts=5)
    with pytest.raises(ModelError) as info:
        make_laddr(source="--laddr-add", addr="192.0.2")
    assert info.value.source == "--laddr-add"


@pytest.mark.parametrize(("text", "addr", "port"), [
    ("198.51.100.10:80", "198.51.100.10", 80),
    ("[2001:db8:1::10]:443", "2001:db8:1::10", 443),
    ("192.0.2.11", "192.0.2.11", 8080),
    ("2001:db8:2::11", "2001:db8:2::11", 8080),
])
def test_parse_endpoint(text: str, addr: str, port: int) -> None:
    assert parse_endpoint(text, "t", default_port=8080) == (ipaddress.ip_address(addr), port)


@pytest.mark.parametrize("text", ["[2001:db8::1", "198.51.100.10:", "host:80",
                                  "[2001:db8::1]x"])
def test_parse_endpoint_rejects(text: str) -> None:
    with pytest.raises(ModelError):
        parse_endpoint(text, "-t")


# ---- the PROXY protocol setting of a real server (issue 21) ----------------------------


@pytest.mark.parametrize(("text", "want"), [("off", 0), ("v1", 1), ("v2", 2), (" V2 ", 2)])
def test_proxy_protocol_parses_its_three_spellings(text: str, want: int) -> None:
    pp = ProxyProtocol.parse(text)
    assert pp == want and str(pp) == text.strip().lower() and f"{pp:>3s}" == f"{pp!s:>3s}"


@pytest.mark.parametrize("bad", ["v3", "2", "on", "", "proxy", None, 2, True, ["v2"]])
def test_anything_else_is_not_a_proxy_protocol_setting(bad: object) -> None:
    with pytest.raises(ModelError) as info:
        ProxyProtocol.parse(bad, "lb.yaml:4")
    assert info.value.source == "lb.yaml:4" and info.value.field == "proxy_protocol"
    assert "(off, v1 or v2)" in info.value.message


def test_a_fullnat_real_server_may_send_either_header() -> None:
    for pp in ProxyProtocol:
        d = make_dest(source="t", addr="192.0.2.11", port=80, fwd="fullnat",
                      proxy_protocol=str(pp))
        assert d.proxy_protocol is pp
    assert make_dest(source="t", addr="192.0.2.11").proxy_protocol is ProxyProtocol.OFF


@pytest.mark.parametrize("fwd", ["masq", "dr", "tunnel", "local"])
def test_the_proxy_header_needs_fullnat_and_the_error_names_the_real_server(fwd: str) -> None:
    with pytest.raises(ModelError) as info:
        make_dest(source="-r", addr="192.0.2.11", port=8080, fwd=fwd, proxy_protocol="v2")
    assert info.value.source == "-r" and info.value.field == "proxy_protocol"
    assert "real server 192.0.2.11:8080" in info.value.message
    assert "needs FULLNAT" in info.value.message
    assert make_dest(source="t", addr="192.0.2.11", fwd=fwd, proxy_protocol="off")


def test_proxy_protocol_is_compared_like_the_other_settings() -> None:
    a = make_dest(source="t", addr="192.0.2.11", port=80, fwd="fullnat")
    assert a != make_dest(source="t", addr="192.0.2.11", port=80, fwd="fullnat",
                          proxy_protocol="v1")


def test_the_proxy_header_is_for_tcp_and_fwmark_services_only() -> None:
    d = make_dest(source="t", addr="192.0.2.11", port=53, fwd="fullnat", proxy_protocol="v1")
    tcp = make_service(source="t", addr="198.51.100.10", port=53)
    mark = make_service(source="t", fwmark=3)
    assert proxy_protocol_error(tcp, d) is None and proxy_protocol_error(mark, d) is None
    for proto in ("udp", "sctp"):
        svc = make_service(source="t", protocol=proto, addr="198.51.100.10", port=53)
        why = proxy_protocol_error(svc, d)
        assert why is not None and "TCP services only" in why and "192.0.2.11:53" in why
        off = make_dest(source="t", addr="192.0.2.11", port=53, fwd="fullnat")
        assert proxy_protocol_error(svc, off) is None
