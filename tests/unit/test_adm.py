"""ipvsadm compatibility (ipvs_synproxy.adm) without a kernel: parsing, errors, formats.

The expected texts are real ipvsadm 1.31 runs (Debian 12's binary in the testbed
guest), recorded in data/ipvsadm-1.31.json by data/capture_ipvsadm.py: each
entry holds the argv, exit status, stdout and stderr. The listings are rebuilt
here from model values describing the table that run had set up.
"""

from __future__ import annotations

import io
import ipaddress
import json
from pathlib import Path
from typing import Any

import pytest

from ipvs_synproxy.adm import cmdline, listing
from ipvs_synproxy.adm import command as adm_command
from ipvs_synproxy.adm import execute as adm
from ipvs_synproxy.kernel import netlink
from ipvs_synproxy.kernel.model import (
    Dest,
    Family,
    FwdMethod,
    Info,
    Laddr,
    Protocol,
    ProxyProtocol,
    Service,
    Stats,
    SyncDaemon,
    Timeouts,
    TunnelType,
)
from tests.unit.fake_ipvs import FakeKernel

REAL: dict[str, dict[str, Any]] = json.loads(
    (Path(__file__).parent / "data" / "ipvsadm-1.31.json").read_text())

IP = ipaddress.ip_address
V4, V6 = IP("198.51.100.10"), IP("2001:db8:1::10")
R1, R2 = IP("192.0.2.11"), IP("192.0.2.12")
R61, R62 = IP("2001:db8:2::11"), IP("2001:db8:2::12")
INFO = Info(version="1.2.1", conn_tab_size=4096)
N = adm_command.Format(numeric=True)


def _svc(addr: ipaddress.IPv4Address | ipaddress.IPv6Address | None, port: int = 0,
         **kw: Any) -> Service:
    return Service(addr=addr, port=port, stats=Stats(), **kw)


def _dest(addr: ipaddress.IPv4Address | ipaddress.IPv6Address, port: int, **kw: Any
          ) -> Dest:
    return Dest(addr=addr, port=port, stats=Stats(), **kw)


MASQ, ROUTE, TUN = FwdMethod.MASQ, FwdMethod.ROUTE, FwdMethod.TUNNEL

# The table data/capture_ipvsadm.py builds, in the kernel's (unsorted) order
# that ``ipvsadm -L -n --nosort`` showed.
TABLE: list[tuple[Service, list[Dest]]] = [
    (_svc(V4, 0, persistent=360), []),
    (_svc(V4, 53, protocol=Protocol.UDP, scheduler="wrr", flags=0x4),
     [_dest(R1, 5353)]),
    (_svc(V4, 80, scheduler="rr"), [_dest(R1, 80, weight=3), _dest(R2, 80, weight=2)]),
    (_svc(V4, 3868, protocol=Protocol.SCTP, scheduler="nq"), []),
    (_svc(V4, 8080, scheduler="dh", flags=0x8 | 0x20),
     [_dest(R1, 8080, fwd=TUN, tun_type=TunnelType.GUE, tun_port=6080, tun_flags=1)]),
    (_svc(V4, 443, scheduler="sh", flags=0x8 | 0x10, persistent=600, netmask=24),
     [_dest(R2, 443, fwd=TUN, u_thresh=100, l_thresh=10),
      _dest(R1, 443, fwd=ROUTE, weight=0)]),
    (_svc(V4, 5060, protocol=Protocol.UDP, persistent=60, pe_name="sip"), []),
    (_svc(V6, 80, persistent=120, netmask=64),
     [_dest(R61, 80), _dest(R62, 8080, weight=5, u_thresh=7, l_thresh=2)]),
    (_svc(None, fwmark=9, scheduler="lc"), [_dest(R1, 0, fwd=ROUTE)]),
    (_svc(None, fwmark=10, fwmark_af=Family.INET6, scheduler="mh", flags=0x10), []),
]


def entries(table: list[tuple[Service, list[Dest]]] = TABLE
            ) -> list[tuple[Service, list[Dest], list[Laddr]]]:
    return [(s, d, []) for s, d in table]


def real(name: str) -> str:
    out: str = REAL[name]["stdout"]
    return out


# ---- listings, byte for byte ---------------------------------------------------------------


@pytest.mark.parametrize(("capture", "fmt"), [
    ("list", N),
    ("list_combined", N),
    ("sort", N),
    ("stats", adm_command.Format(numeric=True, stats=True)),
    ("stats_exact", adm_command.Format(numeric=True, stats=True, exact=True)),
    ("rate", adm_command.Format(numeric=True, rate=True)),
    ("rate_exact", adm_command.Format(numeric=True, rate=True, exact=True)),
    ("thresholds", adm_command.Format(numeric=True, thresholds=True)),
    ("persistent_conn", adm_command.Format(numeric=True, persistent_conn=True)),
    ("tun_info", adm_command.Format(numeric=True, tun_info=True)),
    ("nosort", adm_command.Format(numeric=True, nosort=True)),
])
def test_table_listing_is_ipvsadms_byte_for_byte(capture: str, fmt: adm_command.Format) -> None:
    assert listing.format_table(INFO, entries(), fmt) == real(capture)


def test_save_is_ipvsadms_byte_for_byte() -> None:
    fmt = adm_command.Format(numeric=True, rule=True)
    assert listing.format_table(None, entries(), fmt) == real("save")


def test_port_names_without_numeric(monkeypatch: pytest.MonkeyPatch) -> None:
    # hosts are looked up too, but the testbed's addresses have no names anywhere
    monkeypatch.setattr(listing, "_resolve_addr", listing.ntop)
    assert listing.format_table(INFO, entries(), adm_command.Format()) == real("list_names")
    saved = listing.format_table(None, entries(), adm_command.Format(rule=True))
    assert saved == real("save_names")


def test_single_service_listing_has_no_version_line() -> None:
    svc, dests = TABLE[2]
    assert listing.format_title(N) + listing.format_service(svc, dests, N) == real("list_one")
    svc6, dests6 = TABLE[7]
    assert listing.format_title(N) + listing.format_service(svc6, dests6, N) == real("list_one6")
    stats = adm_command.Format(numeric=True, stats=True)
    assert listing.format_title(stats) + listing.format_service(svc, dests, stats) == \
        real("list_one_stats")


TRAFFIC = [
    (Service(addr=V4, port=80, scheduler="rr",
             stats=Stats(conns=4, inpkts=20, outpkts=21, inbytes=1188, outbytes=1544,
                         outpps=1, inbps=29, outbps=39)),
     [Dest(addr=R1, port=80, inact_conns=2,
           stats=Stats(conns=2, inpkts=10, outpkts=10, inbytes=594, outbytes=746,
                       inbps=15, outbps=19)),
      Dest(addr=R2, port=80, inact_conns=2,
           stats=Stats(conns=2, inpkts=10, outpkts=11, inbytes=594, outbytes=798,
                       inbps=14, outbps=20))]),
    (Service(addr=V6, port=80, scheduler="rr", persistent=30,
             stats=Stats(conns=2, inpkts=10, outpkts=10, inbytes=794, outbytes=948,
                         inbps=24, outbps=28)),
     [Dest(addr=R61, port=80, inact_conns=2, persist_conns=1,
           stats=Stats(conns=2, inpkts=10, outpkts=10, inbytes=794, outbytes=948,
                       inbps=24, outbps=28))]),
]


@pytest.mark.parametrize(("capture", "fmt"), [
    ("tr_list", N),
    ("tr_stats", adm_command.Format(numeric=True, stats=True)),
    ("tr_stats_exact", adm_command.Format(numeric=True, stats=True, exact=True)),
    ("tr_rate", adm_command.Format(numeric=True, rate=True)),
    ("tr_rate_exact", adm_command.Format(numeric=True, rate=True, exact=True)),
    ("tr_thr", adm_command.Format(numeric=True, thresholds=True)),
    ("tr_pc", adm_command.Format(numeric=True, persistent_conn=True)),
])
def test_listings_with_counters_from_real_traffic(capture: str, fmt: adm_command.Format) -> None:
    assert listing.format_table(INFO, entries(TRAFFIC), fmt) == real(capture)


def test_connection_listing_from_the_proc_file() -> None:
    proc = real("proc_conn")
    assert listing.format_connections(proc, N) == real("tr_conn").replace("01:58", "01:54") \
        .replace("00:28", "00:24")
    pc = adm_command.Format(numeric=True, persistent_conn=True)
    assert listing.format_connections(proc, pc) == real("tr_conn_pc").replace("01:57", "01:54") \
        .replace("00:27", "00:24")
    assert listing.format_connections(proc.splitlines()[0] + "\n", N) == real("conn_empty")


def test_connection_listing_shows_the_persistence_engine_columns() -> None:
    # no real capture (needs SIP traffic): expected text follows print_conn()'s
    # "%-3s %-6s %-11s %-18s %-18s %-16s %-18s %s"
    proc = ("Pro FromIP   FPrt ToIP     TPrt DestIP   DPrt State       Expires PEName PEData\n"
            "UDP C6336402 13C4 C633640A 13C4 C000020B 13C4 UDP            179 sip abc@x\n")
    out = listing.format_connections(proc, adm_command.Format(numeric=True, persistent_conn=True))
    assert out.splitlines()[2] == ("UDP 02:59  UDP         198.51.100.2:5060  "
                                   "198.51.100.10:5060 192.0.2.11:5060  sip                "
                                   "abc@x")


def test_timeouts_line() -> None:
    assert listing.format_timeouts(Timeouts(900, 120, 300)) == real("timeout")


@pytest.mark.parametrize(("value", "exact", "text"), [
    (0, False, "        0"), (99_999_999, False, " 99999999"),
    (100_000_000, False, "  100000K"), (999_999_999, False, "  999999K"),
    (1_000_000_000, False, "    1000M"), (99_999_999_999, False, "   99999M"),
    (100_000_000_000, False, "     100G"), (100_000_000_000_000, False, "     100T"),
    (123, True, "      123"), (12_345_678, True, " 12345678"),
    (123_456_789, True, " 123456789"), (12_345_678_901_234, True, " 12345678901234"),
])
def test_large_numbers_are_abbreviated_unless_exact(value: int, exact: bool,
                                                    text: str) -> None:
    # print_largenum(): "%9llu" below 10^8, then "%8llu" + K/M/G/T; --exact: one
    # leading blank and at least 9 columns
    assert listing.format_largenum(value, exact) == text


def test_sorting_orders_by_fwmark_family_protocol_address_port() -> None:
    shuffled = [s for s, _ in reversed(TABLE)]
    got = [str(s) for s in listing.sort_services(shuffled)]
    assert got == [
        "198.51.100.10:0/tcp", "198.51.100.10:80/tcp", "198.51.100.10:443/tcp",
        "198.51.100.10:8080/tcp", "198.51.100.10:53/udp", "198.51.100.10:5060/udp",
        "198.51.100.10:3868/sctp", "[2001:db8:1::10]:80/tcp", "fwmark 9/ipv4",
        "fwmark 10/ipv6"]


# ---- extensions ----------------------------------------------------------------------------


FNAT = Service(addr=V4, port=80, scheduler="rr", synproxy=True, stats=Stats())
FNAT_DESTS = [Dest(addr=R1, port=80, fwd=FwdMethod.FULLNAT, weight=2, stats=Stats())]
FNAT_LADDRS = [Laddr(addr=IP("192.0.2.100")), Laddr(addr=IP("192.0.2.101"))]


def test_extensions_in_the_listing() -> None:
    out = listing.format_table(INFO, [(FNAT, FNAT_DESTS, [])], N)
    assert out.splitlines()[3:] == [
        "TCP  198.51.100.10:80 rr synproxy",
        "  -> 192.0.2.11:80                FullNat 2      0          0         "]


def test_extensions_in_the_save_format() -> None:
    out = listing.format_table(None, [(FNAT, FNAT_DESTS, FNAT_LADDRS)],
                           adm_command.Format(numeric=True, rule=True))
    assert out == ("-A -t 198.51.100.10:80 -s rr --synproxy\n"
                   "-a -t 198.51.100.10:80 -r 192.0.2.11:80 --fullnat -w 2\n"
                   "--laddr-add 192.0.2.100 -t 198.51.100.10:80\n"
                   "--laddr-add 192.0.2.101 -t 198.51.100.10:80\n")


def test_save_lines_parse_back_to_the_same_values() -> None:
    fmt = adm_command.Format(numeric=True, rule=True)
    text = listing.format_table(None, [*entries(), (FNAT, FNAT_DESTS, FNAT_LADDRS)], fmt)
    services, dests, laddrs = [], [], []
    for line in text.splitlines():
        cmd = cmdline.parse(line.split())
        if cmd.command == "add-service":
            services.append(cmd.service)
        elif cmd.command == "add-server":
            dests.append((cmd.service, cmd.dest))
        else:
            assert cmd.command == "laddr-add", line
            laddrs.append((cmd.service, cmd.laddr))
    assert {str(s): s for s in services} == {str(s): s for s, _ in [*TABLE, (FNAT, [])]}
    # thresholds are not part of ipvsadm's save format: compare without them
    expected_dests = {(str(s), str(d)): (d.fwd, d.weight, d.tun_type, d.tun_port,
                                         d.tun_flags)
                      for s, ds in [*TABLE, (FNAT, FNAT_DESTS)] for d in ds}
    assert {(str(s), str(d)): (d.fwd, d.weight, d.tun_type, d.tun_port, d.tun_flags)
            for s, d in dests if s is not None and d is not None} == expected_dests
    assert [(str(s), a) for s, a in laddrs] == [(str(FNAT), la.addr) for la in FNAT_LADDRS]


def test_laddr_listing() -> None:
    laddrs = [Laddr(addr=IP("192.0.2.100"), port_conflict=3, conn_counts=7)]
    out = listing.format_laddrs([(FNAT, laddrs)], N)
    assert out == (
        "Prot LocalAddress:Port            Laddrs\n"
        "  -> LocalAddress                 Conflicts  Conns     \n"
        "TCP  198.51.100.10:80             1\n"
        "  -> 192.0.2.100                  3          7         \n")


# ---- parsing -------------------------------------------------------------------------------


def test_service_and_real_server_options_become_model_values() -> None:
    cmd = cmdline.parse(["-A", "-t", "198.51.100.10:443", "-s", "sh", "-b", "sh-port,sh-fallback",
                     "-p", "600", "-M", "255.255.255.0"])
    assert cmd.command == "add-service"
    assert cmd.service == Service(addr=V4, port=443, scheduler="sh", flags=0x18,
                                  persistent=600, netmask=24)
    cmd = cmdline.parse(["-a", "-t", "[2001:db8:1::10]:80", "-r", "[2001:db8:2::12]:8080", "-m",
                     "-w", "5", "-x", "7", "-y", "2"])
    assert cmd.dest == Dest(addr=R62, port=8080, fwd=MASQ, weight=5, u_thresh=7, l_thresh=2)
    assert cmd.service is not None and cmd.service.af == Family.INET6


def test_defaults_are_ipvsadms() -> None:
    svc = cmdline.parse(["-A", "-t", "198.51.100.10:0", "-p"]).service
    assert svc is not None and (svc.scheduler, svc.persistent) == ("wlc", 360)
    # -g and weight 1 by default; DR and tunnel real servers take the service port
    dest = cmdline.parse(["-a", "-t", "198.51.100.10:80", "-r", "192.0.2.11:8080"]).dest
    assert dest == Dest(addr=R1, port=80, fwd=ROUTE, weight=1)
    # a masquerading real server without a port takes the service's
    dest = cmdline.parse(["-a", "-t", "198.51.100.10:80", "-r", "192.0.2.11", "-m"]).dest
    assert dest is not None and dest.port == 80


@pytest.mark.parametrize("argv", [
    ["-Ln"], ["-l", "-n"], ["--list", "--numeric"], ["-L", "-n", "--sort"],
])
def test_list_spellings(argv: list[str]) -> None:
    cmd = cmdline.parse(argv)
    assert (cmd.command, cmd.fmt) == ("list", N)


def test_clustered_and_attached_arguments() -> None:
    a = cmdline.parse(["-At198.51.100.10:80", "-srr", "-p600"]).service
    b = cmdline.parse(["--add-service", "--tcp-service=198.51.100.10:80", "--scheduler", "rr",
                   "--persistent=600"]).service
    assert a == b == Service(addr=V4, port=80, scheduler="rr", persistent=600)


def test_fwmark_ipv6_udp_sctp_and_ops() -> None:
    svc = cmdline.parse(["-A", "-f", "10", "-6", "-s", "mh", "-b", "mh-port"]).service
    assert svc == Service(fwmark=10, fwmark_af=Family.INET6, scheduler="mh", flags=0x10)
    svc = cmdline.parse(["-A", "-u", "198.51.100.10:53", "-o"]).service
    assert svc == Service(protocol=Protocol.UDP, addr=V4, port=53, flags=0x4)
    svc = cmdline.parse(["-A", "--sctp-service", "198.51.100.10:3868", "-s", "nq"]).service
    assert svc == Service(protocol=Protocol.SCTP, addr=V4, port=3868, scheduler="nq")


def test_tunnel_options() -> None:
    dest = cmdline.parse(["-a", "-t", "198.51.100.10:8080", "-r", "192.0.2.11", "-i",
                      "--tun-type", "gue", "--tun-port", "6080", "--tun-csum"]).dest
    assert dest == Dest(addr=R1, port=8080, fwd=TUN, tun_type=TunnelType.GUE,
                        tun_port=6080, tun_flags=1)


def test_set_zero_flush_and_list_variants() -> None:
    assert cmdline.parse(["--set", "901", "61", "0"]).timeouts == Timeouts(901, 61, 0)
    assert cmdline.parse(["-Z"]).service is None
    assert cmdline.parse(["-Z", "-t", "198.51.100.10:80"]).service == Service(addr=V4, port=80)
    assert cmdline.parse(["-C"]).command == "flush"
    assert cmdline.parse([]).command == "list"
    cmd = cmdline.parse(["-L", "-c", "-n", "--persistent-conn"])
    assert "connection" in cmd.options and cmd.fmt.persistent_conn
    assert "timeout" in cmdline.parse(["-L", "--timeout"]).options
    assert cmdline.parse(["-S", "-n"]).command == "save"
    assert cmdline.parse(["-R"]).command == "restore"


def test_extension_options() -> None:
    dest = cmdline.parse(["-a", "-t", "198.51.100.10:80", "-r", "192.0.2.11:80",
                      "--fullnat"]).dest
    assert dest is not None and dest.fwd is FwdMethod.FULLNAT
    svc = cmdline.parse(["-A", "-t", "198.51.100.10:80", "--synproxy"]).service
    assert svc is not None and svc.synproxy
    svc = cmdline.parse(["-E", "-t", "198.51.100.10:80", "--no-synproxy"]).service
    assert svc is not None and not svc.synproxy
    cmd = cmdline.parse(["--laddr-add", "192.0.2.100", "-t", "198.51.100.10:80"])
    assert (cmd.command, cmd.laddr, cmd.service) == (
        "laddr-add", IP("192.0.2.100"), Service(addr=V4, port=80))
    cmd = cmdline.parse(["--laddr-del", "2001:db8:2::100", "-t", "[2001:db8:1::10]:80"])
    assert (cmd.command, cmd.laddr) == ("laddr-del", IP("2001:db8:2::100"))
    assert cmdline.parse(["--laddr-list", "-n"]).command == "laddr-list"


# Error cases whose message and status ipvsadm 1.31 showed (data file); ours
# is the same message, and status 2 where ipvsadm says 2. Kernel refusals
# (255) are tested in the guest.
REAL_USAGE_ERRORS = sorted(k for k, v in REAL.items()
                           if k.startswith("e_") and v["rc"] == 2)


@pytest.mark.parametrize("capture", REAL_USAGE_ERRORS)
def test_usage_errors_match_ipvsadm(capture: str) -> None:
    argv = REAL[capture]["argv"]
    with pytest.raises(adm_command.AdmUsageError) as info:
        cmdline.parse(argv)
    assert f"{info.value.message}\n" == REAL[capture]["stderr"]


# ipvsadm exits 255 on these (popt errors); we say the same with status 2.
@pytest.mark.parametrize("capture", ["e_missing_arg", "e_unknown", "e_unknown_short"])
def test_popt_errors_name_the_option(capture: str) -> None:
    with pytest.raises(adm_command.AdmUsageError) as info:
        cmdline.parse(REAL[capture]["argv"])
    assert f"{info.value.message}\n" == REAL[capture]["stderr"]


@pytest.mark.parametrize(("argv", "needle"), [
    (["-a", "-t", "198.51.100.10:80", "-r", "192.0.2.11", "-w", "2147483648"],
     "illegal weight"),
    (["-A", "-t", "198.51.100.10:80", "--synproxy", "--no-synproxy"],
     "multiple 'synproxy'"),
    (["-A", "-u", "198.51.100.10:53", "--synproxy"], "--synproxy"),
    (["-a", "-t", "198.51.100.10:80", "-r", "192.0.2.11", "--synproxy"],
     "Illegal 'synproxy' option with the 'add-server' command"),
    (["-a", "-t", "198.51.100.10:80", "-r", "192.0.2.11", "-m", "--fullnat"],
     "multiple 'forwarding-method'"),
    (["-A", "-t", "198.51.100.10:80", "--fullnat"],
     "Illegal 'forwarding-method' option with the 'add-service' command"),
    (["--laddr-add", "192.0.2.100"],
     "You need to supply the 'service-address' option for the 'laddr-add' command"),
    (["--laddr-add", "nonsense", "-t", "198.51.100.10:80"], "--laddr-add: not an IP"),
    (["--laddr-add", "2001:db8:2::100", "-t", "198.51.100.10:80"], "address family"),
    (["--laddr-del"], "--laddr-del: missing argument"),
    (["-A", "-t", "198.51.100.10:80", "-p", "-M", "255.0.255.0"], "-M: only contiguous"),
    (["-t", "198.51.100.10:80"], "the first option must be a command"),
    (["-L", "--stats=3"], "--stats: option does not take an argument"),
])
def test_our_errors_name_the_flag(argv: list[str], needle: str) -> None:
    with pytest.raises(adm_command.AdmUsageError) as info:
        cmdline.parse(argv)
    assert needle in info.value.message


def test_run_reports_usage_errors_with_status_2_before_touching_the_kernel() -> None:
    out, err = io.StringIO(), io.StringIO()

    def no_kernel() -> str:
        raise AssertionError("must not be called")

    rc = adm.run(["-a", "-t", "198.51.100.10:80", "-r", "192.0.2.11", "-w", "x"],
                 netns="no-such-netns", stdout=out, stderr=err, read_conn=no_kernel)
    assert (rc, out.getvalue(), err.getvalue()) == (2, "", "illegal weight specified\n")
    rc = adm.run(["-t", "1.2.3.4:80"], prog="ipvsadm-sp", stdout=out, stderr=err)
    assert rc == 2
    assert err.getvalue().endswith(
        "Try `ipvsadm-sp -h' or 'ipvsadm-sp --help' for more information.\n")


def test_restore_checks_every_line_before_applying_any() -> None:
    err = io.StringIO()
    rc = adm.run(["-R"], netns="no-such-netns", stdin=io.StringIO(
        "-A -t 198.51.100.10:7002 -s rr\n-A -t 198.51.100.10:7003 -w 2\n"),
        stdout=io.StringIO(), stderr=err)
    # no netns was entered (it does not exist): nothing ran
    assert rc == 2
    assert err.getvalue() == ("-R: line 2: Illegal 'weight' option with the 'add-service' "
                              "command\n")


def test_help_and_version_go_to_stdout() -> None:
    out = io.StringIO()
    assert adm.run(["-h"], prog="ipvsadm-sp", stdout=out) == 0
    assert "--laddr-add" in out.getvalue() and "ipvsadm-sp -A|E" in out.getvalue()
    out = io.StringIO()
    assert adm.run(["--version"], stdout=out) == 0
    assert "ipvsadm v1.31 compatible" in out.getvalue()


def test_cli_hands_adm_its_raw_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    from ipvs_synproxy.cli import main as cli

    assert cli.main(["adm", "-A", "-t", "198.51.100.10:0"]) == 2
    assert capsys.readouterr().err == "Zero port specified for non-persistent service\n"
    assert cli.main(["adm", "-h"]) == 0
    assert "Usage:" in capsys.readouterr().out


def test_sync_daemon_lines() -> None:
    # no unit capture (the guest test compares a running daemon with ipvsadm's
    # listing); the format is list_daemon()'s
    from ipvs_synproxy.kernel.model import SyncDaemon

    out = listing.format_daemons([
        SyncDaemon("master", "eth1", 7, sync_maxlen=1472, mcast_group=IP("224.0.0.81"),
                   mcast_port=8848, mcast_ttl=1),
        SyncDaemon("backup", "eth0", 255)])
    assert out == ("master sync daemon (mcast=eth1, syncid=7, maxlen=1472, "
                   "group=224.0.0.81, port=8848, ttl=1)\n"
                   "backup sync daemon (mcast=eth0, syncid=255)\n")


def test_start_daemon_options_become_a_sync_daemon() -> None:
    cmd = cmdline.parse(["--start-daemon", "backup", "--mcast-interface", "eth1", "--syncid",
                     "9", "--sync-maxlen", "1200", "--mcast-group", "ff02::81",
                     "--mcast-port", "8849", "--mcast-ttl", "3"])
    assert cmd.daemon == SyncDaemon("backup", "eth1", 9, 1200,
                                    ipaddress.ip_address("ff02::81"), 8849, 3)
    # ipvsadm's defaults: interface eth0 and sync id 0
    assert cmdline.parse(["--stop-daemon", "master"]).daemon == SyncDaemon("master", "eth0", 0)


@pytest.mark.parametrize(("argv", "message"), [
    (["--syncid", "256"], "illegal syncid specified"),
    (["--sync-maxlen", "65508"], "illegal sync-maxlen specified"),
    (["--mcast-port", "0"], "illegal mcast-port specified"),
    (["--mcast-ttl", "256"], "illegal mcast-ttl specified"),
    (["--mcast-group", "192.0.2.1"], "invalid IPv4 mcast-group `192.0.2.1'"),
    (["--mcast-group", "2001:db8::1"], "invalid IPv6 mcast-group `2001:db8::1'"),
])
def test_bad_daemon_options_are_named(argv: list[str], message: str) -> None:
    with pytest.raises(adm_command.AdmUsageError) as exc:
        cmdline.parse(["--start-daemon", "master", *argv])
    assert exc.value.message == message


def test_daemon_request_round_trips_through_the_wire_format() -> None:
    d = SyncDaemon("master", "eth1", 7, 1200, ipaddress.ip_address("239.1.2.3"), 9000, 4)
    msg = netlink.build_request(netlink.IPVS_CMD_NEW_DAEMON,
                                [("IPVS_CMD_ATTR_DAEMON", netlink.daemon_attrs(d))])
    msg.encode()
    back = netlink.decode_reply(bytes(msg.data))
    assert netlink.daemon_from(back.get_attr("IPVS_CMD_ATTR_DAEMON")) == d


# ---- --proxy-protocol and --proxy-info (issue 21) ---------------------------------------

FN = FwdMethod.FULLNAT
PP_SVC = Service(addr=V4, port=80, scheduler="rr")
PP_DESTS = [_dest(R1, 80, fwd=FN, proxy_protocol=ProxyProtocol.V2),
            _dest(R2, 80, fwd=FN, weight=2, proxy_protocol=ProxyProtocol.V1,
                  active_conns=3),
            _dest(IP("192.0.2.13"), 80, fwd=FN), _dest(IP("192.0.2.14"), 80, fwd=MASQ)]


@pytest.mark.parametrize(("argv", "want"), [
    (["-a", "-t", "198.51.100.10:80", "-r", "192.0.2.11", "--fullnat", "--proxy-protocol",
      "v2"], ProxyProtocol.V2),
    (["-e", "-t", "198.51.100.10:80", "-r", "192.0.2.11", "--fullnat",
      "--proxy-protocol=V1"], ProxyProtocol.V1),
    (["-a", "-f", "7", "-r", "192.0.2.11", "--fullnat", "--proxy-protocol", "v2"],
     ProxyProtocol.V2),
    (["-a", "-t", "198.51.100.10:80", "-r", "192.0.2.11", "-m", "--proxy-protocol", "off"],
     ProxyProtocol.OFF),
    (["-a", "-u", "198.51.100.10:53", "-r", "192.0.2.11", "--fullnat", "--proxy-protocol",
      "off"], ProxyProtocol.OFF),
    (["-a", "-t", "198.51.100.10:80", "-r", "192.0.2.11", "--fullnat"], ProxyProtocol.OFF),
])
def test_proxy_protocol_option_sets_the_real_servers_header(argv: list[str],
                                                            want: ProxyProtocol) -> None:
    cmd = cmdline.parse(argv)
    assert cmd.dest is not None and cmd.dest.proxy_protocol is want
    assert ("proxy-protocol" in cmd.options) == ("--proxy-protocol" in " ".join(argv))


@pytest.mark.parametrize(("argv", "needle"), [
    (["-a", "-t", "198.51.100.10:80", "-r", "192.0.2.11", "--fullnat", "--proxy-protocol",
      "v3"], "--proxy-protocol: not a PROXY protocol setting: 'v3' (off, v1 or v2)"),
    (["-a", "-t", "198.51.100.10:80", "-r", "192.0.2.11", "--fullnat", "--proxy-protocol"],
     "--proxy-protocol: missing argument"),
    (["-a", "-t", "198.51.100.10:80", "-r", "192.0.2.11", "--fullnat", "--proxy-protocol",
      "v1", "--proxy-protocol", "v2"], "multiple 'proxy-protocol' options"),
    (["-a", "-t", "198.51.100.10:80", "-r", "192.0.2.11", "-m", "--proxy-protocol", "v2"],
     "--proxy-protocol v2: the PROXY protocol header needs FULLNAT forwarding (--fullnat), "
     "not -m"),
    (["-e", "-t", "198.51.100.10:80", "-r", "192.0.2.11", "--proxy-protocol", "v1"],
     "not -g"),  # ipvsadm's default method is -g
    (["-a", "-t", "198.51.100.10:80", "-r", "192.0.2.11", "-i", "--proxy-protocol", "v1"],
     "not -i"),
    (["-a", "-u", "198.51.100.10:53", "-r", "192.0.2.11", "--fullnat", "--proxy-protocol",
      "v2"], "--proxy-protocol v2: the PROXY protocol header is for TCP services only, "
             "not UDP"),
    (["--sctp-service", "198.51.100.10:38", "-a", "-r", "192.0.2.11", "--fullnat",
      "--proxy-protocol", "v1"], "the first option must be a command"),
    (["-a", "--sctp-service", "198.51.100.10:38", "-r", "192.0.2.11", "--fullnat",
      "--proxy-protocol", "v1"], "for TCP services only, not SCTP"),
    (["-A", "-t", "198.51.100.10:80", "--proxy-protocol", "v2"],
     "Illegal 'proxy-protocol' option with the 'add-service' command"),
    (["-d", "-t", "198.51.100.10:80", "-r", "192.0.2.11", "--proxy-protocol", "v2"],
     "Illegal 'proxy-protocol' option with the 'delete-server' command"),
    (["-L", "--proxy-protocol", "v2"], "Illegal 'proxy-protocol' option with the 'list'"),
    (["-a", "-t", "198.51.100.10:80", "-r", "192.0.2.11", "--proxy-info"],
     "Illegal 'proxy-info' option with the 'add-server' command"),
    (["-S", "--proxy-info"], "Illegal 'proxy-info' option with the 'save' command"),
])
def test_proxy_protocol_usage_errors_are_clear(argv: list[str], needle: str) -> None:
    with pytest.raises(adm_command.AdmUsageError) as info:
        cmdline.parse(argv)
    assert needle in info.value.message


def test_plain_listing_keeps_ipvsadms_columns_and_proxy_info_adds_one() -> None:
    plain = listing.format_table(INFO, [(PP_SVC, PP_DESTS, [])], N)
    assert "Proxy" not in plain and "v2" not in plain
    assert plain.splitlines()[4] == ("  -> 192.0.2.11:80                FullNat 1      "
                                     "0          0         ")
    out = listing.format_table(INFO, [(PP_SVC, PP_DESTS, [])],
                               adm_command.Format(numeric=True, proxy_info=True))
    assert out.splitlines()[1:] == [
        "Prot LocalAddress:Port Scheduler Flags",
        "  -> RemoteAddress:Port           Forward Proxy Weight ActiveConn InActConn",
        "TCP  198.51.100.10:80 rr",
        "  -> 192.0.2.11:80                FullNat v2    1      0          0         ",
        "  -> 192.0.2.12:80                FullNat v1    2      3          0         ",
        "  -> 192.0.2.13:80                FullNat off   1      0          0         ",
        "  -> 192.0.2.14:80                Masq    n/a   1      0          0         ",
    ]
    both = listing.format_table(None, [(PP_SVC, PP_DESTS[:1], [])], adm_command.Format(
        numeric=True, proxy_info=True, tun_info=True))
    assert both.splitlines()[1].endswith("Forward TunnelInfo    Proxy Weight ActiveConn "
                                         "InActConn")
    assert both.splitlines()[3].startswith("  -> 192.0.2.11:80                FullNat n/a"
                                           "           v2    1 ")
    assert cmdline.parse(["-L", "-n", "--proxy-info"]).fmt.proxy_info


def _runner(kernel: FakeKernel, stdin: str = "") -> tuple[Any, io.StringIO, io.StringIO]:
    out, err = io.StringIO(), io.StringIO()
    io_ = adm.Io(io.StringIO(stdin), out, err, lambda: "")
    return adm._Runner(io_, lambda: kernel, "ipvsadm-sp"), out, err  # type: ignore[arg-type]


def test_save_prints_proxy_protocol_and_restore_reads_it_back() -> None:
    src = FakeKernel()
    src.services_[PP_SVC.key()] = PP_SVC
    src.dests_[PP_SVC.key()] = list(PP_DESTS)
    src.laddrs_[PP_SVC.key()] = [Laddr(IP("192.0.2.100"))]
    runner, out, _ = _runner(src)
    assert runner.run(cmdline.parse(["-S", "-n"])) == 0
    saved = out.getvalue()
    assert "-a -t 198.51.100.10:80 -r 192.0.2.11:80 --fullnat -w 1 --proxy-protocol v2\n" \
        in saved
    assert "-r 192.0.2.13:80 --fullnat -w 1\n" in saved  # off: nothing, as ipvsadm
    assert "-r 192.0.2.14:80 -m -w 1\n" in saved
    dst = FakeKernel()
    runner, _, err = _runner(dst, saved)
    assert runner.run(cmdline.parse(["-R"])) == 0, err.getvalue()
    assert [(d.addr, d.fwd, d.proxy_protocol) for d in dst.dests_[PP_SVC.key()]] == \
        [(d.addr, d.fwd, d.proxy_protocol) for d in PP_DESTS]


def test_edit_without_the_option_keeps_the_header_and_with_it_changes_it() -> None:
    k = FakeKernel()
    k.services_[PP_SVC.key()] = PP_SVC
    k.dests_[PP_SVC.key()] = list(PP_DESTS)
    k.laddrs_[PP_SVC.key()] = []
    runner, _, err = _runner(k)
    rs1 = ["-e", "-t", "198.51.100.10:80", "-r", "192.0.2.11", "--fullnat"]
    assert runner.run(cmdline.parse([*rs1, "-w", "0"])) == 0, err.getvalue()
    d = k.dests_[PP_SVC.key()][0]
    assert (d.weight, d.proxy_protocol) == (0, ProxyProtocol.V2)  # drained, header kept
    assert runner.run(cmdline.parse([*rs1, "--proxy-protocol", "off"])) == 0
    assert k.dests_[PP_SVC.key()][0].proxy_protocol is ProxyProtocol.OFF
    # leaving FULLNAT drops it (a NAT real server cannot have it)
    assert runner.run(cmdline.parse(["-e", "-t", "198.51.100.10:80", "-r", "192.0.2.12",
                                     "-m"])) == 0
    assert k.dests_[PP_SVC.key()][1].proxy_protocol is ProxyProtocol.OFF
    # a missing service is the kernel's refusal, as for any -e
    before = k.state()
    assert runner.run(cmdline.parse(["-e", "-t", "198.51.100.10:81", "-r", "192.0.2.11",
                                     "--fullnat"])) == 255
    assert k.state() == before


def test_help_documents_the_proxy_options() -> None:
    text = adm.usage_text("ipvsadm-sp")
    assert "--proxy-protocol off|v1|v2" in text and "--proxy-info" in text
