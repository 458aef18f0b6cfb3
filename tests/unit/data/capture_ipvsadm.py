"""Record the distribution's ipvsadm 1.31 (argv, status, stdout, stderr) for test_adm.py.

Run in the testbed guest; writes the JSON file named on the command line:

    ipvs-synproxy vm exec --topology -- \\
        python tests/unit/data/capture_ipvsadm.py tests/unit/data/ipvsadm-1.31.json

(``vm exec`` makes only build/ writable: write there and copy the file here.)
"""

import json
import subprocess
import sys
import time

from ipvs_synproxy_testbed import peers, topology

OUT = sys.argv[1]
res = {}


def run(name, *args, stdin=None):
    p = subprocess.run(
        ["ip", "netns", "exec", "lb", "ipvsadm", *args], capture_output=True, text=True, input=stdin
    )
    res[name] = {"argv": list(args), "rc": p.returncode, "stdout": p.stdout, "stderr": p.stderr}
    return p


V4, V6 = topology.VIP4, topology.VIP6
R1, R2 = topology.RS4["rs1"], topology.RS4["rs2"]
R61, R62 = topology.RS6["rs1"], topology.RS6["rs2"]

run("clear0", "-C")
setup = [
    ["-A", "-t", f"{V4}:80", "-s", "rr"],
    ["-a", "-t", f"{V4}:80", "-r", f"{R2}:80", "-m", "-w", "2"],
    ["-a", "-t", f"{V4}:80", "-r", f"{R1}:80", "-m", "-w", "3"],
    [
        "-A",
        "-t",
        f"{V4}:443",
        "-s",
        "sh",
        "-b",
        "sh-port,sh-fallback",
        "-p",
        "600",
        "-M",
        "255.255.255.0",
    ],
    ["-a", "-t", f"{V4}:443", "-r", R1, "-g", "-w", "0"],
    ["-a", "-t", f"{V4}:443", "-r", R2, "-i", "-x", "100", "-y", "10"],
    ["-A", "-u", f"{V4}:53", "-s", "wrr", "-o"],
    ["-a", "-u", f"{V4}:53", "-r", f"{R1}:5353", "-m"],
    ["-A", "-t", f"{V4}:0", "-p"],
    ["-A", "-t", f"[{V6}]:80", "-s", "wlc", "-p", "120", "-M", "64"],
    ["-a", "-t", f"[{V6}]:80", "-r", f"[{R62}]:8080", "-m", "-w", "5", "-x", "7", "-y", "2"],
    ["-a", "-t", f"[{V6}]:80", "-r", f"[{R61}]:80", "-m"],
    ["-A", "-f", "9", "-s", "lc"],
    ["-a", "-f", "9", "-r", R1, "-g"],
    ["-A", "-f", "10", "-6", "-s", "mh", "-b", "mh-port"],
    ["-a", "-f", "10", "-r", f"[{R61}]", "-g", "-w", "4"],
    ["-A", "--sctp-service", f"{V4}:3868", "-s", "nq"],
    ["-A", "-u", f"{V4}:5060", "-p", "60", "--pe", "sip"],
    ["-A", "-t", f"{V4}:8080", "-s", "dh", "-b", "flag-1,flag-3"],
    [
        "-a",
        "-t",
        f"{V4}:8080",
        "-r",
        R1,
        "-i",
        "--tun-type",
        "gue",
        "--tun-port",
        "6080",
        "--tun-csum",
    ],
]
for i, a in enumerate(setup):
    run(f"setup{i}", *a)
for name, args in {
    "list": ["-L", "-n"],
    "list_l": ["-l", "-n"],
    "list_combined": ["-Ln"],
    "stats": ["-L", "-n", "--stats"],
    "stats_exact": ["-L", "-n", "--stats", "--exact"],
    "rate": ["-L", "-n", "--rate"],
    "rate_exact": ["-L", "-n", "--rate", "--exact"],
    "thresholds": ["-L", "-n", "--thresholds"],
    "persistent_conn": ["-L", "-n", "--persistent-conn"],
    "nosort": ["-L", "-n", "--nosort"],
    "sort": ["-L", "-n", "--sort"],
    "save": ["-S", "-n"],
    "save_names": ["-S"],
    "list_names": ["-L"],
    "list_one": ["-L", "-n", "-t", f"{V4}:80"],
    "list_one6": ["-L", "-n", "-t", f"[{V6}]:80"],
    "list_one_fwm": ["-L", "-n", "-f", "10", "-6"],
    "list_one_stats": ["-L", "-n", "--stats", "-t", f"{V4}:80"],
    "list_missing": ["-L", "-n", "-t", f"{V4}:81"],
    "timeout": ["-L", "--timeout"],
    "daemon": ["-L", "--daemon"],
    "conn_empty": ["-L", "-n", "-c"],
    "tun_info": ["-L", "-n", "--tun-info"],
    "noargs": [],
}.items():
    run(name, *args)
# edits
run("edit_svc", "-E", "-t", f"{V4}:80", "-s", "wrr")
run("edit_dest", "-e", "-t", f"{V4}:80", "-r", f"{R1}:80", "-w", "7")
run("after_edits", "-S", "-n")
run("edit_svc_plain", "-E", "-t", f"{V4}:443")
run("after_edit_plain", "-S", "-n")
run("del_dest", "-d", "-t", f"{V4}:80", "-r", f"{R2}:80")
run("del_svc", "-D", "-u", f"{V4}:53")
run("after_dels", "-S", "-n")
# errors
errs = {
    "e_nocmd": ["-t", f"{V4}:80"],
    "e_unknown": ["-L", "--bogus"],
    "e_unknown_short": ["-L", "-q"],
    "e_multi_cmd": ["-A", "-D", "-t", f"{V4}:80"],
    "e_add_nosvc": ["-A", "-s", "rr"],
    "e_add_exists": ["-A", "-t", f"{V4}:80"],
    "e_del_missing": ["-D", "-t", f"{V4}:9999"],
    "e_edit_missing": ["-E", "-t", f"{V4}:9999"],
    "e_adddest_nosvc": ["-a", "-t", f"{V4}:9999", "-r", R1],
    "e_adddest_exists": ["-a", "-t", f"{V4}:80", "-r", f"{R1}:80", "-m"],
    "e_editdest_missing": ["-e", "-t", f"{V4}:80", "-r", f"{R1}:81", "-m"],
    "e_deldest_missing": ["-d", "-t", f"{V4}:80", "-r", f"{R1}:81"],
    "e_adddest_nor": ["-a", "-t", f"{V4}:80", "-m"],
    "e_bad_weight": ["-a", "-t", f"{V4}:80", "-r", R1, "-w", "70000"],
    "e_bad_weight2": ["-a", "-t", f"{V4}:80", "-r", R1, "-w", "x"],
    "e_bad_uthresh": ["-a", "-t", f"{V4}:80", "-r", R1, "-x", "-1"],
    "e_bad_lthresh": ["-a", "-t", f"{V4}:80", "-r", R1, "-y", "abc"],
    "e_bad_svc": ["-A", "-t", "999.1.1.1:80"],
    "e_bad_svc_port": ["-A", "-t", f"{V4}:99999"],
    "e_bad_svc_digits": ["-A", "-t", "80"],
    "e_bad_rs": ["-a", "-t", f"{V4}:80", "-r", "1.2.3:x:y"],
    "e_bad_fwmark": ["-A", "-f", "0"],
    "e_bad_fwmark2": ["-A", "-f", "abc"],
    "e_six_before_f": ["-A", "-6", "-f", "5"],
    "e_ops_tcp": ["-A", "-t", f"{V4}:81", "-o"],
    "e_zero_port": ["-A", "-t", f"{V4}:0"],
    "e_bad_timeout": ["-A", "-t", f"{V4}:82", "-p", "0"],
    "e_bad_timeout2": ["-A", "-t", f"{V4}:82", "-p", "abc"],
    "e_bad_mask": ["-A", "-t", f"{V4}:82", "-p", "-M", "nosuch.invalid"],
    "e_bad_mask6": ["-A", "-t", f"[{V6}]:82", "-p", "-M", "129"],
    "e_bad_sched_flag": ["-A", "-t", f"{V4}:82", "-b", "nope"],
    "e_incompat_flag": ["-A", "-t", f"{V4}:82", "-s", "rr", "-b", "sh-port"],
    "e_bad_sched": ["-A", "-t", f"{V4}:82", "-s", "nosuch"],
    "e_list_conflict": ["-L", "-c", "--stats"],
    "e_list_conflict2": ["-L", "--timeout", "--stats"],
    "e_list_conflict3": ["-L", "-c", "--timeout"],
    "e_list_conflict4": ["-L", "--timeout", "--persistent-conn"],
    "e_illegal_opt": ["-C", "-n"],
    "e_illegal_opt2": ["-A", "-t", f"{V4}:82", "-w", "3"],
    "e_dup_opt": ["-A", "-t", f"{V4}:82", "-s", "rr", "-s", "wrr"],
    "e_set_two": ["--set", "1", "2"],
    "e_set_bad": ["--set", "1", "2", "x"],
    "e_unexpected": ["-L", "-n", "extra"],
    "e_family": ["-a", "-t", f"{V4}:80", "-r", f"[{R61}]:80", "-m"],
    "e_tun_conflict": ["-a", "-t", f"{V4}:80", "-r", R2, "-m", "--tun-type", "gre"],
    "e_missing_arg": ["-A", "-t"],
    "e_save_svc": ["-S", "-t", f"{V4}:80"],
    "e_zero_missing": ["-Z", "-t", f"{V4}:9999"],
    "e_v6_mask_v4": ["-A", "-t", f"{V4}:83", "-p", "-M", "24"],
    "e_invalid_operation": ["-a", "-t", f"{V4}:80", "-r", "224.0.0.1:80", "-m"],
    "e_sched_flags_none": ["-A", "-t", f"{V4}:84", "-b", ""],
    "help": ["-h"],
    "version": ["-v"],
    "e_start_daemon_bad": ["--start-daemon", "foo"],
}
for name, args in errs.items():
    run(name, *args)
run("after_errors", "-S", "-n")
# set / zero
old = run("timeout_before", "-L", "--timeout")
run("set", "--set", "901", "61", "0")
run("timeout_after", "-L", "--timeout")
run("set_restore", "--set", "900", "120", "300")
run("zero_one", "-Z", "-t", f"{V4}:80")
run("zero_all", "-Z")
# restore
run("clear1", "-C")
saved = res["save"]["stdout"]
run("restore", "-R", stdin=saved)
run("after_restore", "-S", "-n")
run(
    "restore_bad",
    "-R",
    stdin=f"-A -t {V4}:7000 -s rr\n-A -t {V4}:7000 -s rr\n-A -t {V4}:7001 -s rr\n",
)
run("after_restore_bad", "-S", "-n")
run(
    "restore_badline", "-R", stdin=f"-A -t {V4}:7002 -s rr\n-A -t {V4}:7003 -w 2\n-A -t {V4}:7004\n"
)
run("after_restore_badline", "-S", "-n")
# traffic
run("clear2", "-C")
run("t1", "-A", "-t", f"{V4}:80", "-s", "rr")
run("t2", "-a", "-t", f"{V4}:80", "-r", f"{R1}:80", "-m")
run("t3", "-a", "-t", f"{V4}:80", "-r", f"{R2}:80", "-m")
run("t4", "-A", "-t", f"[{V6}]:80", "-s", "rr", "-p", "30")
run("t5", "-a", "-t", f"[{V6}]:80", "-r", f"[{R61}]:80", "-m")
srv = [
    peers.start_http_server(rs, a, 80)
    for rs in ("rs1", "rs2")
    for a in (topology.RS4[rs], topology.RS6[rs])
]
for _ in range(4):
    peers.http_get(V4)
for _ in range(2):
    peers.http_get(V6)
time.sleep(0.5)
for name, args in {
    "tr_list": ["-L", "-n"],
    "tr_conn": ["-L", "-n", "-c"],
    "tr_conn_pc": ["-L", "-n", "-c", "--persistent-conn"],
    "tr_pc": ["-L", "-n", "--persistent-conn"],
    "tr_thr": ["-L", "-n", "--thresholds"],
}.items():
    run(name, *args)
res["proc_conn"] = {
    "argv": [],
    "rc": 0,
    "stdout": subprocess.run(
        ["ip", "netns", "exec", "lb", "cat", "/proc/net/ip_vs_conn"], capture_output=True, text=True
    ).stdout,
    "stderr": "",
}
time.sleep(4.5)
for name, args in {
    "tr_stats": ["-L", "-n", "--stats"],
    "tr_stats_exact": ["-L", "-n", "--stats", "--exact"],
    "tr_rate": ["-L", "-n", "--rate"],
    "tr_rate_exact": ["-L", "-n", "--rate", "--exact"],
}.items():
    run(name, *args)
run("clear3", "-C")
for s in srv:
    s.close()
with open(OUT, "w") as f:
    json.dump(res, f, indent=1, sort_keys=True)
print("captured", len(res))
