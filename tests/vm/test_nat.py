"""Stock IPVS NAT through the testbed: the ground every later test stands on."""

from __future__ import annotations

import itertools

import pytest

from ipvs_synproxy_testbed import peers, topology
from tests.vm.conftest import ipvsadm


def _vs(addr: str, port: int = 80) -> str:
    return f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"


@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_nat_service_round_robins_over_both_real_servers(
    lb: None, real_servers: dict[str, list[peers.HttpServer]], family: str
) -> None:
    vip = topology.VIP4 if family == "ipv4" else topology.VIP6
    rs = topology.RS4 if family == "ipv4" else topology.RS6
    client = topology.CLIENT4 if family == "ipv4" else topology.CLIENT6
    ipvsadm("-A", "-t", _vs(vip), "-s", "rr")
    for name in ("rs1", "rs2"):
        ipvsadm("-a", "-t", _vs(vip), "-r", _vs(rs[name]), "-m")

    replies = [peers.http_get(vip) for _ in range(6)]

    served = [r.server for r in replies]
    assert sorted(set(served)) == ["rs1", "rs2"]
    # rr alternates strictly between the two real servers.
    assert all(a != b for a, b in itertools.pairwise(served)), served
    # NAT rewrites only the destination: real servers see the client itself.
    assert {r.peer for r in replies} == {client}
    conns = ipvsadm("-L", "-n", "-c")
    assert "TIME_WAIT" in conns or "FIN_WAIT" in conns or "ESTABLISHED" in conns, conns


def test_without_a_service_the_vip_refuses(lb: None,
                                           real_servers: dict[str, list[peers.HttpServer]]
                                           ) -> None:
    # The VIP is a local address of lb with nothing listening: a real RST.
    with pytest.raises(ConnectionRefusedError):
        peers.http_get(topology.VIP4, timeout=5)
