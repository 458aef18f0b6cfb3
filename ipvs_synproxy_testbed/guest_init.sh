#!/bin/bash
# PID 1 of the testbed guest, on the host's root (overlay). Loads the IPVS
# modules, optionally builds the standard topology, runs the job's command and
# records its exit status and the kernel log in the job directory (on the
# read-write build share), then powers off.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devpts devpts /dev/pts 2>/dev/null || { mkdir -p /dev/pts; mount -t devpts devpts /dev/pts; }
mkdir -p /dev/shm && mount -t tmpfs tmpfs /dev/shm
# What udev gives a real system: bash's <(...) needs /dev/fd, and without it
# DKMS skips its module version check (which once hid a DKMS install that
# installed nothing).
[ -e /dev/fd ] || ln -s /proc/self/fd /dev/fd
[ -e /dev/stdin ] || ln -s /proc/self/fd/0 /dev/stdin
[ -e /dev/stdout ] || ln -s /proc/self/fd/1 /dev/stdout
[ -e /dev/stderr ] || ln -s /proc/self/fd/2 /dev/stderr
# No fresh tmpfs on /tmp: the checkout and the build share may live below it.
# /tmp is writable anyway (the overlay's upper layer is tmpfs).
mount -t tmpfs tmpfs /run
mkdir -p /run/netns
mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null
echo 1 >/proc/sys/kernel/sysrq

job=
for kv in $(cat /proc/cmdline); do
	case "$kv" in sp_job=*) job="${kv#sp_job=}" ;; esac
done

halt() {
	sync
	echo o >/proc/sysrq-trigger
	# Power-off may take the root file system away before sleep is loaded: PID 1
	# must not exit then (a "Kernel panic - not syncing: Attempted to kill init"
	# would fail the run), so it waits with a builtin instead.
	sleep 30 2>/dev/null || while :; do :; done
}

step() {
	echo "guest: $*" >>"$job/progress"
	echo "guest: $*" >/dev/console
}

fail() {
	echo "guest: $*" >>"$job/stderr"
	echo "guest: $*" >/dev/console
	echo 125 >"$job/rc"
	dmesg >"$job/dmesg"
	halt
}

[ -n "$job" ] && [ -d "$job" ] || { echo "guest: no job directory" >/dev/console; halt; }
# shellcheck source=/dev/null
. "$job/env"
hostname testbed
ip link set lo up

step "loading modules ($SP_MODULES)"
modprobe -a nf_conntrack nf_defrag_ipv4 nf_defrag_ipv6 libcrc32c veth bridge ||
	fail "modprobe of base modules failed"
if [ "$SP_MODULES" = patched ]; then
	kdir=/lib/modules/$(uname -r)
	mkdir -p "$kdir/updates/ipvs-synproxy"
	cp "$SP_MODDIR"/modules/*.ko "$kdir/updates/ipvs-synproxy/" || fail "copy modules failed"
	cp "$SP_MODDIR"/depmod/modules.* "$kdir/" || fail "copy depmod output failed"
fi
# Hold every IPv4/IPv6 netfilter hook point from the start, in the root
# namespace (empty chains, no packet of the topology passes there). The first
# hook of a kind registered anywhere, or the last one removed, flips a jump
# label in the running kernel's text; under QEMU's software emulation a vCPU
# that runs that site at a flood's rate while it is patched can be left
# re-executing a stale int3 there for good (both vCPUs stuck in
# ip_local_deliver, seen twice with rmmod ip_vs under a flood). Held, IPVS
# coming and going never changes those labels.
nft -f - <<'EOF' || fail "nft: holding the netfilter hook points failed"
table inet testbed_hooks {
	chain hold_prerouting { type filter hook prerouting priority 0; policy accept; }
	chain hold_input { type filter hook input priority 0; policy accept; }
	chain hold_forward { type filter hook forward priority 0; policy accept; }
	chain hold_output { type filter hook output priority 0; policy accept; }
	chain hold_postrouting { type filter hook postrouting priority 0; policy accept; }
}
EOF
modprobe ip_vs || fail "modprobe ip_vs failed"
if [ "$SP_MODULES" = patched ]; then
	# Our build is out of tree: the kernel marks it with taint flag O; the
	# distribution's signed module carries none.
	grep -q O /sys/module/ip_vs/taint ||
		fail "loaded ip_vs is not the patched build (taint '$(cat /sys/module/ip_vs/taint)')"
	case "$(modinfo -n ip_vs)" in
	*/updates/ipvs-synproxy/*) ;;
	*) fail "modprobe resolves ip_vs to $(modinfo -n ip_vs), not the patched build" ;;
	esac
fi

if [ "$SP_TOPOLOGY" = 1 ]; then
	step "building topology"
	python3 -m ipvs_synproxy_testbed.topology up >>"$job/stderr" 2>&1 ||
		fail "topology set-up failed"
fi

step "running command"
cd "$SP_CWD" || fail "cannot cd to $SP_CWD"
bash "$job/cmd" </dev/null >"$job/stdout" 2>>"$job/stderr"
rc=$?
dmesg >"$job/dmesg"
echo "$rc" >"$job/rc"
step "done ($rc)"
halt
