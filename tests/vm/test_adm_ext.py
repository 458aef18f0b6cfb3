"""``ipvs-synproxy adm``'s extensions on the patched kernel: ``--fullnat`` real
servers, ``--synproxy`` services and ``--laddr-add/--laddr-del/--laddr-list``,
listed, saved and restored (``-S`` output round-trips through ``-R``).

Needs the patched modules (the default of ``vm exec``).
"""

from __future__ import annotations

from ipvs_synproxy_testbed import topology
from tests.vm.conftest import ipvsadm
from tests.vm.helpers import sp

V4, V6 = topology.VIP4, topology.VIP6
S4, S6 = f"{V4}:80", f"[{V6}]:80"
R1, R2 = topology.RS4["rs1"], topology.RS4["rs2"]
R61 = topology.RS6["rs1"]
L4, L6 = topology.LADDRS4, topology.LADDRS6

SETUP = [
    ["-A", "-t", S4, "-s", "rr", "--synproxy"],
    ["-a", "-t", S4, "-r", f"{R1}:80", "--fullnat", "-w", "2"],
    ["-a", "-t", S4, "-r", f"{R2}:80", "--fullnat"],
    ["--laddr-add", L4[0], "-t", S4],
    ["--laddr-add", L4[1], "-t", S4],
    ["-A", "-t", S6, "-s", "wlc"],
    ["-a", "-t", S6, "-r", f"[{R61}]:8080", "--fullnat", "-w", "3"],
    ["--laddr-add", L6[0], "-t", S6],
    ["-A", "-u", f"{V4}:53", "-s", "rr"],
    ["-a", "-u", f"{V4}:53", "-r", f"{R1}:53", "--fullnat"],
    ["--laddr-add", L4[2], "-u", f"{V4}:53"],
]

SAVED = (
    f"-A -t {S4} -s rr --synproxy\n"
    f"-a -t {S4} -r {R1}:80 --fullnat -w 2\n"
    f"-a -t {S4} -r {R2}:80 --fullnat -w 1\n"
    f"--laddr-add {L4[0]} -t {S4}\n"
    f"--laddr-add {L4[1]} -t {S4}\n"
    f"-A -u {V4}:53 -s rr\n"
    f"-a -u {V4}:53 -r {R1}:53 --fullnat -w 1\n"
    f"--laddr-add {L4[2]} -u {V4}:53\n"
    f"-A -t {S6} -s wlc\n"
    f"-a -t {S6} -r [{R61}]:8080 --fullnat -w 3\n"
    f"--laddr-add {L6[0]} -t {S6}\n"
)


def _setup() -> None:
    for argv in SETUP:
        assert sp(*argv) == (0, "", ""), argv


def test_extensions_are_saved(lb: None) -> None:
    _setup()
    assert sp("-S", "-n") == (0, SAVED, "")


def test_save_round_trips_through_restore_extensions_included(lb: None) -> None:
    _setup()
    _, saved, _ = sp("-S", "-n")
    ipvsadm("-C")
    assert sp("-S", "-n") == (0, "", "")
    assert sp("-R", stdin=saved) == (0, "", "")
    assert sp("-S", "-n") == (0, saved, "")
    assert saved == SAVED


def test_listing_shows_fullnat_and_synproxy(lb: None) -> None:
    _setup()
    rc, out, _ = sp("-L", "-n")
    assert rc == 0
    lines = out.splitlines()
    assert f"TCP  {S4} rr synproxy" in lines
    # (connection counters may be non-zero: IPVS revives a deleted real server
    # with its old connections when it is added again)
    assert any(ln.startswith(f"  -> {R1}:80                FullNat 2      ")
               for ln in lines), lines
    assert f"TCP  {S6} wlc" in lines
    # the stock parts of the listing are ipvsadm's own
    their = ipvsadm("-L", "-n").splitlines()
    assert lines[:3] == their[:3]


def test_laddr_list_and_delete(lb: None) -> None:
    _setup()
    assert sp("--laddr-list", "-n", "-t", S4) == (0, (
        "Prot LocalAddress:Port            Laddrs\n"
        "  -> LocalAddress                 Conflicts  Conns     \n"
        f"TCP  {S4:<28s} 2\n"
        f"  -> {L4[0]:<28s} 0          0         \n"
        f"  -> {L4[1]:<28s} 0          0         \n"), "")
    assert sp("--laddr-del", L4[0], "-t", S4) == (0, "", "")
    _, out, _ = sp("--laddr-list", "-n")
    assert f"  -> {L4[0]:<28s}" not in out
    assert f"  -> {L4[1]:<28s}" in out and f"  -> {L6[0]:<28s}" in out


def test_laddr_errors_are_reported_like_ipvsadm_reports_kernel_errors(lb: None) -> None:
    _setup()
    assert sp("--laddr-add", L4[0], "-t", S4) == (255, "", "Local address already exists\n")
    assert sp("--laddr-del", L4[3], "-t", S4) == (255, "", "No such Local address\n")
    assert sp("--laddr-add", L4[3], "-t", f"{V4}:9999") == (255, "", "Service not defined\n")
    rc, _, err = sp("--laddr-add", L6[1], "-t", S4)
    assert rc == 2 and "address family" in err
    assert sp("-S", "-n") == (0, SAVED, "")


def test_edit_turns_synproxy_off_unless_repeated(lb: None) -> None:
    _setup()
    assert sp("-E", "-t", S4, "-s", "rr", "--synproxy") == (0, "", "")
    assert f"-A -t {S4} -s rr --synproxy\n" in sp("-S", "-n")[1]
    assert sp("-E", "-t", S4, "-s", "rr") == (0, "", "")  # ipvsadm -E sets every field
    assert f"-A -t {S4} -s rr\n" in sp("-S", "-n")[1]


# A SYN-proxy service translates both directions: the kernel refuses real
# servers whose replies would not come back through it (EINVAL, nothing
# changed), and adm says why.
SYNPROXY_REFUSED = [
    (["-a", "-t", S4, "-r", f"{R1}:80", "-g"], "uses direct routing (-g)"),
    (["-a", "-t", S4, "-r", f"{R1}:80", "-i"], "uses tunneling (-i)"),
    (["-a", "-t", S4, "-r", f"{topology.LB_SERVER4}:80", "-m"],
     "is one of this host's own addresses"),
    (["-a", "-t", S6, "-r", f"[{R61}]:80", "-g"], "uses direct routing (-g)"),
    (["-a", "-t", S6, "-r", f"[{topology.LB_SERVER6}]:80", "--fullnat"],
     "is one of this host's own addresses"),
]


def test_synproxy_refuses_real_servers_whose_replies_bypass_it(lb: None) -> None:
    assert sp("-A", "-t", S4, "-s", "rr", "--synproxy") == (0, "", "")
    assert sp("-A", "-t", S6, "-s", "rr", "--synproxy") == (0, "", "")
    before = sp("-S", "-n")
    for argv, why in SYNPROXY_REFUSED:
        rc, out, err = sp(*argv)
        assert (rc, out) == (255, ""), (argv, rc, out, err)
        assert why in err and "SYN-proxy service needs" in err, (argv, err)
    assert sp("-S", "-n") == before                     # nothing changed
    assert sp("-a", "-t", S4, "-r", f"{R1}:80", "-m") == (0, "", "")
    assert sp("-a", "-t", S6, "-r", f"[{R61}]:80", "--fullnat") == (0, "", "")
    # an existing DR real server cannot be edited into one either way
    assert sp("-e", "-t", S4, "-r", f"{R1}:80", "-g")[0] == 255
    assert f"-a -t {S4} -r {R1}:80 -m -w 1\n" in sp("-S", "-n")[1]


def test_the_synproxy_flag_is_refused_for_a_service_with_dr_servers(lb: None) -> None:
    assert sp("-A", "-t", S4, "-s", "rr") == (0, "", "")
    assert sp("-a", "-t", S4, "-r", f"{R1}:80", "-m") == (0, "", "")
    assert sp("-a", "-t", S4, "-r", f"{R2}:80", "-g") == (0, "", "")
    before = sp("-S", "-n")
    rc, out, err = sp("-E", "-t", S4, "-s", "rr", "--synproxy")
    assert (rc, out) == (255, ""), err
    assert f"real server {R2}:80 uses direct routing (-g)" in err, err
    assert sp("-S", "-n") == before
    assert sp("-d", "-t", S4, "-r", f"{R2}:80") == (0, "", "")
    assert sp("-E", "-t", S4, "-s", "rr", "--synproxy") == (0, "", "")
