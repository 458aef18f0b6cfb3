// SPDX-License-Identifier: GPL-2.0-or-later
/* XDP_PASS for the root-namespace peer of lb's eth0: a veth takes the frames
 * its peer sends with native XDP_TX only when it runs XDP itself
 * (tests/vm/test_xdp.py).
 */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
SEC("xdp")
int xdp_pass(struct xdp_md *ctx)
{
	return XDP_PASS;
}
char _license[] SEC("license") = "GPL";
