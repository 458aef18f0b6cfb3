// SPDX-License-Identifier: GPL-2.0-or-later
/*
 * ipvs-synproxy XDP fast path (issue 22; docs/xdp.md). Loaded, filled and
 * attached by `ipvs-synproxy xdp attach` (ipvs_synproxy/kernel/xdp.py).
 *
 * Answers a TCP SYN to a SYN-proxy VIP:port with the cookie SYN/ACK the
 * IPVS module would send (ip_vs_synproxy.c: same SipHash-2-4 inputs, same
 * per-epoch key derivation, same options byte and TSval bits), rewritten
 * in place and sent back with XDP_TX, before an skb exists. The client's
 * ACK and everything after it go up the stack to IPVS, which checks the
 * cookie as if it had sent it. Anything that is not a SYN to a VIP in
 * sp_services goes up untouched (XDP_PASS); a malformed SYN to one is
 * dropped and counted.
 *
 * A SYN on a tuple the program has seen other segments on (sp_flows) goes
 * up to the module too: the tuple has, or had, a connection in IPVS, and
 * only the module knows what to do with a SYN for it (session reuse, which
 * needs the SYN's ISN; a live connection, whose real server must see it).
 *
 * What the program needs from the control plane (maps):
 *	sp_services	VIP:port of every SYN-proxy service (addr, port, family)
 *	sp_config	the module's secret (IPVS_CMD_SET_SYNPROXY_SECRET), its
 *			sysctls (secret_period, wscale, mss, sack, timestamp),
 *			the TTL to answer with, and CLOCK_TAI - CLOCK_REALTIME
 *			so that the epoch follows the module's wall clock
 * The key of an epoch is derived here, once per epoch and CPU, as the
 * module derives it: SipHash(secret, epoch | (i | wscale << 8)).
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/tcp.h>
#include <linux/in.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#define WSCALE_NONE	15
#define OPT_SACK	0x40
#define OPT_ECN		0x80
#define TS_BITS		0xffU
#define IP_DF		0x4000
#define TCP_MAX_WSCALE	14

/* TCP options parsed per byte: the verifier needs a bound */
#define TCP_OPTS_MAX	40

struct sp_service_key {
	__u8	family;		/* 4 or 6 */
	__u8	pad;
	__be16	port;
	__u8	addr[16];	/* IPv4 in the first 4 bytes */
};

struct sp_config {
	__u64	secret[2];	/* the module's siphash_key_t */
	__s64	tai_offset_ns;	/* CLOCK_TAI - CLOCK_REALTIME */
	__u32	period;		/* synproxy_secret_period, seconds */
	__u16	mss;		/* synproxy_mss (IPv6: 32 less) */
	__u8	wscale;		/* synproxy_wscale */
	__u8	sack;		/* synproxy_sack */
	__u8	timestamp;	/* synproxy_timestamp */
	__u8	ttl;		/* hop limit of the answers */
	__u8	ready;		/* the control plane filled it in */
	__u8	pad;
	__u64	generation;	/* bumped on every change: keys derived anew */
};

struct sp_key_cache {
	__u64	epoch;
	__u64	generation;
	__u64	key[2];
	__u8	wscale;
	__u8	valid;
};

enum sp_xdp_stat {
	SP_XDP_SYN_ANSWERED,	/* cookie SYN/ACKs sent back */
	SP_XDP_SYN_MALFORMED,	/* dropped: SYN to a VIP, bad header */
	SP_XDP_PASSED,		/* up the stack: not ours to answer */
	SP_XDP_NOT_READY,	/* up the stack: no secret yet */
	SP_XDP_NO_ROOM,		/* up the stack: the frame cannot take the answer */
	SP_XDP_SYN_KNOWN,	/* up the stack: a SYN on a tuple with a past */
	SP_XDP_STAT_MAX
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, struct sp_service_key);
	__type(value, __u8);
} sp_services SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct sp_config);
} sp_config SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct sp_key_cache);
} sp_keys SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, SP_XDP_STAT_MAX);
	__type(key, __u32);
	__type(value, __u64);
} sp_stats SEC(".maps");

/* Tuples of the services' connections, as a 64-bit hash: recorded from any
 * segment but a SYN, forgotten least recently used first. A collision, or a
 * tuple forgotten, costs one SYN the module's answer instead of ours: both
 * are cookies, so neither opens anything the other would not. Spoofed
 * segments can fill it, and then SYNs of real reconnecting clients get the
 * program's answer, as they would without it.
 */
#define SP_FLOWS	(1 << 17)

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, SP_FLOWS);
	__type(key, __u64);
	__type(value, __u8);
} sp_flows SEC(".maps");

static __always_inline int count(__u32 item, int verdict)
{
	__u64 *v = bpf_map_lookup_elem(&sp_stats, &item);

	if (v)
		*v += 1;
	return verdict;
}

/* -- SipHash-2-4, as lib/siphash.c ---------------------------------- */

#define ROL64(x, b)	(((x) << (b)) | ((x) >> (64 - (b))))
#define SIPROUND(v0, v1, v2, v3) do {					\
	v0 += v1; v1 = ROL64(v1, 13); v1 ^= v0; v0 = ROL64(v0, 32);	\
	v2 += v3; v3 = ROL64(v3, 16); v3 ^= v2;				\
	v0 += v3; v3 = ROL64(v3, 21); v3 ^= v0;				\
	v2 += v1; v1 = ROL64(v1, 17); v1 ^= v2; v2 = ROL64(v2, 32);	\
} while (0)

struct sip {
	__u64 v0, v1, v2, v3;
};

static __always_inline void sip_init(struct sip *s, const __u64 *key)
{
	s->v0 = 0x736f6d6570736575ULL ^ key[0];
	s->v1 = 0x646f72616e646f6dULL ^ key[1];
	s->v2 = 0x6c7967656e657261ULL ^ key[0];
	s->v3 = 0x7465646279746573ULL ^ key[1];
}

static __always_inline void sip_word(struct sip *s, __u64 m)
{
	s->v3 ^= m;
	SIPROUND(s->v0, s->v1, s->v2, s->v3);
	SIPROUND(s->v0, s->v1, s->v2, s->v3);
	s->v0 ^= m;
}

/* The message is whole words: the last block is its length alone */
static __always_inline __u64 sip_final(struct sip *s, __u32 len)
{
	sip_word(s, (__u64)len << 56);
	s->v2 ^= 0xff;
	SIPROUND(s->v0, s->v1, s->v2, s->v3);
	SIPROUND(s->v0, s->v1, s->v2, s->v3);
	SIPROUND(s->v0, s->v1, s->v2, s->v3);
	SIPROUND(s->v0, s->v1, s->v2, s->v3);
	return (s->v0 ^ s->v1) ^ (s->v2 ^ s->v3);
}

/* siphash_2u64(a, b, key) */
static __always_inline __u64 sip_2u64(__u64 a, __u64 b, const __u64 *key)
{
	struct sip s;

	sip_init(&s, key);
	sip_word(&s, a);
	sip_word(&s, b);
	return sip_final(&s, 16);
}

/* Little-endian word of 8 message bytes, as the kernel loads them */
static __always_inline __u64 le64(const __u8 *p)
{
	__u64 v;

	__builtin_memcpy(&v, p, 8);
	return v;	/* BPF programs here run on little-endian hosts */
}

/* -- connections seen ----------------------------------------------- */

/* A tuple's key: the addresses and ports mixed into 64 bits. Nothing
 * cryptographic is needed: a collision, even a crafted one, only sends a
 * SYN to the module.
 */
static __always_inline __u64 sp_mix(__u64 h, __u64 v)
{
	h ^= v;
	h *= 0x9e3779b97f4a7c15ULL;
	return h ^ h >> 29;
}

static __always_inline __u64 sp_flow_hash(const __u8 *addrs, __u32 addrlen,
					  __be16 sport, __be16 dport)
{
	__u64 h = sp_mix(addrlen, le64(addrs));

	if (addrlen == 32) {
		h = sp_mix(h, le64(addrs + 8));
		h = sp_mix(h, le64(addrs + 16));
		h = sp_mix(h, le64(addrs + 24));
	}
	return sp_mix(h, (__u64)sport << 16 | dport);
}

/* -- the module's cookie -------------------------------------------- */

static const __u16 mss_table[4] = { 536, 1300, 1440, 1460 };

struct sp_opts {
	__u16	mss;
	__u8	wscale;
	__u8	sack;
	__u8	ts;
	__u8	ecn;
	__u32	tsval;
};

/* The signing key of now: derived from the secret once per epoch */
static __always_inline const struct sp_key_cache *
sp_key(const struct sp_config *cfg)
{
	__u32 zero = 0;
	struct sp_key_cache *k = bpf_map_lookup_elem(&sp_keys, &zero);
	__u64 now, epoch;
	__u32 period = cfg->period ? cfg->period : 1;

	if (!k)
		return 0;
	now = bpf_ktime_get_tai_ns() - cfg->tai_offset_ns;
	epoch = now / 1000000000ULL / period;
	if (k->valid && k->epoch == epoch && k->generation == cfg->generation &&
	    k->wscale == cfg->wscale)
		return k;
	k->key[0] = sip_2u64(epoch, 0 | (__u64)cfg->wscale << 8, cfg->secret);
	k->key[1] = sip_2u64(epoch, 1 | (__u64)cfg->wscale << 8, cfg->secret);
	k->epoch = epoch;
	k->generation = cfg->generation;
	k->wscale = cfg->wscale;
	k->valid = 1;
	return k;
}

static __always_inline __u8 sp_encode(const struct sp_opts *o)
{
	__u8 idx = 0;

	if (o->mss >= mss_table[1])
		idx = 1;
	if (o->mss >= mss_table[2])
		idx = 2;
	if (o->mss >= mss_table[3])
		idx = 3;
	return idx | o->wscale << 2 | (o->sack ? OPT_SACK : 0) |
	       (o->ecn ? OPT_ECN : 0);
}

/* -- parsing ---------------------------------------------------------- */

/* The SYN's options, copied to a per-CPU scratch map value (the option
 * space is whole words) and walked one option per bpf_loop() step: the
 * verifier checks the step once instead of every path through 40 bytes of
 * options. The walk's state lives in the map, not on the stack: with it on
 * the stack, 6.1 answered every SYN without SACK, as if its verifier took
 * the zeroed fields for constants after the loop (6.12 did not).
 */
struct sp_parse {
	__u8		ob[64];
	__u32		i;
	__u32		len;
	int		bad;
	struct sp_opts	o;
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct sp_parse);
} sp_scratch SEC(".maps");

/* The mask stays in the code (clang would drop it after a bounds check
 * the verifier does not connect to the register it indexes with).
 */
#define OB(p, x) ({ __u32 _j = (x); asm volatile("" : "+r"(_j)); (p)->ob[_j & 63]; })

/* One option (the module's ip_vs_synproxy_parse); bad when its length is
 * impossible (the module's ip_vs_synproxy_opts_ok). 1 ends the walk.
 */
static long sp_parse_step(__u32 n, void *unused)
{
	__u32 zero = 0, i, olen;
	struct sp_parse *p = bpf_map_lookup_elem(&sp_scratch, &zero);
	__u8 kind;

	if (!p)
		return 1;
	i = p->i;
	if (i >= p->len || i >= TCP_OPTS_MAX)
		return 1;
	kind = OB(p, i);
	if (kind == 0)			/* EOL */
		return 1;
	if (kind == 1) {		/* NOP */
		p->i = i + 1;
		return 0;
	}
	if (i + 1 >= p->len) {
		p->bad = 1;
		return 1;
	}
	olen = OB(p, i + 1);
	if (olen < 2 || i + olen > p->len) {
		p->bad = 1;
		return 1;
	}
	if (kind == 2 && olen == 4) {
		p->o.mss = (__u16)OB(p, i + 2) << 8 | OB(p, i + 3);
	} else if (kind == 3 && olen == 3) {
		p->o.wscale = OB(p, i + 2);
		if (p->o.wscale > TCP_MAX_WSCALE)
			p->o.wscale = TCP_MAX_WSCALE;
	} else if (kind == 4 && olen == 2) {
		p->o.sack = 1;
	} else if (kind == 8 && olen == 10) {
		p->o.ts = 1;
		p->o.tsval = (__u32)OB(p, i + 2) << 24 | (__u32)OB(p, i + 3) << 16 |
			     (__u32)OB(p, i + 4) << 8 | OB(p, i + 5);
	}
	p->i = i + olen;
	return 0;
}

/* False when an option is malformed (or the scratch space is missing) */
static __always_inline int sp_parse_opts(const __u8 *opt, const void *end,
					 __u32 len, struct sp_opts *o)
{
	__u32 zero = 0;
	struct sp_parse *p = bpf_map_lookup_elem(&sp_scratch, &zero);

	if (!p)
		return 0;
	__builtin_memset(p, 0, sizeof(*p));
#pragma unroll
	for (int w = 0; w < TCP_OPTS_MAX / 4; w++) {
		if (w * 4 >= len)
			break;
		if ((const void *)(opt + w * 4 + 4) > end)
			return 0;
		__builtin_memcpy(p->ob + w * 4, opt + w * 4, 4);
	}
	p->len = len;
	p->o.mss = 536;
	p->o.wscale = WSCALE_NONE;
	bpf_loop(TCP_OPTS_MAX, sp_parse_step, NULL, 0);
	/* the lookup again: the values are the map's, whatever the loop did */
	p = bpf_map_lookup_elem(&sp_scratch, &zero);
	if (!p || p->bad)
		return 0;
	o->mss = p->o.mss;
	o->wscale = p->o.wscale;
	o->sack = p->o.sack;
	o->ts = p->o.ts;
	o->tsval = p->o.tsval;
	return 1;
}

/* -- the answer ----------------------------------------------------- */

static __always_inline __u16 csum_fold(__u64 sum)
{
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	return ~sum;
}

static __always_inline void put_be32(__u8 *p, __u32 v)
{
	p[0] = v >> 24;
	p[1] = v >> 16;
	p[2] = v >> 8;
	p[3] = v;
}

/* The module's ip_vs_synproxy_put_opts: options in Linux's order */
static __always_inline __u32 sp_put_opts(__u8 *p, __u16 mss, int sack, int ts,
					 __u32 tsval, __u32 tsecr, __u8 wscale)
{
	__u32 n = 4;

	p[0] = 2;
	p[1] = 4;
	p[2] = mss >> 8;
	p[3] = mss;
	if (ts) {
		p[4] = sack ? 4 : 1;
		p[5] = sack ? 2 : 1;
		p[6] = 8;
		p[7] = 10;
		put_be32(p + 8, tsval);
		put_be32(p + 12, tsecr);
		n = 16;
	} else if (sack) {
		p[4] = 1;
		p[5] = 1;
		p[6] = 4;
		p[7] = 2;
		n = 8;
	}
	if (wscale != WSCALE_NONE) {
		if (n == 4) {
			p[4] = 1; p[5] = 3; p[6] = 3; p[7] = wscale;
		} else if (n == 8) {
			p[8] = 1; p[9] = 3; p[10] = 3; p[11] = wscale;
		} else {
			p[16] = 1; p[17] = 3; p[18] = 3; p[19] = wscale;
		}
		n += 4;
	}
	return n;
}

/* Everything the answer needs, gathered before the packet is rewritten */
struct sp_answer {
	__u8	msg[40];	/* saddr | daddr | sport | dport | ISN */
	__u32	msglen;
	__u32	isn;
	__be16	sport, dport;
	struct sp_opts o;
};

static __always_inline __u64 sp_hash(const struct sp_answer *a,
				     const __u64 *key)
{
	struct sip s;

	sip_init(&s, key);
	sip_word(&s, le64(a->msg));
	sip_word(&s, le64(a->msg + 8));
	if (a->msglen == 40) {
		sip_word(&s, le64(a->msg + 16));
		sip_word(&s, le64(a->msg + 24));
		sip_word(&s, le64(a->msg + 32));
	}
	return sip_final(&s, a->msglen);
}

/* The SYN/ACK's TCP header and options, built on the stack: the frame is
 * then brought to its exact length once, and the header copied in.
 */
struct sp_synack {
	struct tcphdr	th;
	__u8		opts[20];	/* zeros past the options: the sum is the same */
};

static __always_inline __u32 sp_synack(struct sp_synack *out,
				       const struct sp_answer *a,
				       const struct sp_config *cfg,
				       const struct sp_key_cache *k, int v6)
{
	struct tcphdr *th = &out->th;
	__u64 h = sp_hash(a, k->key);
	__u32 cookie, optlen, tsval;
	__u16 mss = cfg->mss;
	int sack = a->o.sack && cfg->sack, ts = a->o.ts && cfg->timestamp;

	cookie = (__u32)((h >> 40) & 0xffffff) << 8 |
		 ((sp_encode(&a->o) ^ h) & 0xff);
	tsval = (__u32)(bpf_ktime_get_ns() / 1000000) & ~TS_BITS;
	tsval |= (h >> 32) & TS_BITS;
	if (v6)
		mss -= 32;
	if (mss < 88)	/* TCP_MIN_MSS, the module's floor */
		mss = 88;
	__builtin_memset(out, 0, sizeof(*out));
	optlen = sp_put_opts(out->opts, mss, sack, ts, tsval, a->o.tsval,
			     a->o.wscale == WSCALE_NONE ? WSCALE_NONE :
			     k->wscale);
	th->source = a->dport;
	th->dest = a->sport;
	th->seq = bpf_htonl(cookie);
	th->ack_seq = bpf_htonl(a->isn + 1);
	th->doff = (sizeof(*th) + optlen) / 4;
	th->syn = 1;
	th->ack = 1;
	th->ece = a->o.ecn;
	th->window = 0xffff;
	return sizeof(*th) + optlen;
}

/* Copy the header in: its length is one of five, each copied whole */
static __always_inline int sp_put_tcp(void *th, void *end,
				      const struct sp_synack *sa, __u32 len)
{
#define SP_PUT(n) case n:						\
	if (th + n > end)						\
		return -1;						\
	__builtin_memcpy(th, sa, n);					\
	return 0
	switch (len) {
	SP_PUT(24);
	SP_PUT(28);
	SP_PUT(32);
	SP_PUT(36);
	SP_PUT(40);
	}
	return -1;
#undef SP_PUT
}

enum sp_kind {
	SP_NOT_OURS,	/* not to a SYN-proxy VIP:port */
	SP_SEGMENT,	/* to one, not a SYN: its tuple recorded */
	SP_MALFORMED,	/* a SYN to one with a bad header */
	SP_KNOWN,	/* a SYN on a tuple recorded: the module's */
	SP_ANSWER,	/* a SYN to answer: a holds what the answer needs */
};

/* Has the tuple (a->msg's addresses, the segment's ports) carried segments
 * other than SYNs? With record, it now has.
 */
static __always_inline int sp_seen(const struct sp_answer *a, __u32 addrlen,
				   const struct tcphdr *th, int record)
{
	__u64 key = sp_flow_hash(a->msg, addrlen, th->source, th->dest);
	__u8 one = 1;

	if (bpf_map_lookup_elem(&sp_flows, &key))
		return 1;
	if (record)
		bpf_map_update_elem(&sp_flows, &key, &one, BPF_ANY);
	return 0;
}

/* What is the segment to us? a->msg holds the addresses (addrlen bytes). */
static __always_inline enum sp_kind sp_classify(struct tcphdr *th, void *end,
						struct sp_service_key *svc,
						struct sp_answer *a,
						__u32 addrlen)
{
	__u32 thlen;

	if ((void *)(th + 1) > end)
		return SP_NOT_OURS;
	svc->port = th->dest;
	if (!bpf_map_lookup_elem(&sp_services, svc))
		return SP_NOT_OURS;
	if (!th->syn || th->ack || th->rst || th->fin) {
		sp_seen(a, addrlen, th, 1);
		return SP_SEGMENT;
	}
	thlen = th->doff * 4;
	if (thlen < sizeof(*th) || (void *)th + thlen > end)
		return SP_MALFORMED;
	if (!sp_parse_opts((__u8 *)(th + 1), end, thlen - sizeof(*th), &a->o))
		return SP_MALFORMED;
	if (sp_seen(a, addrlen, th, 0))
		return SP_KNOWN;
	a->o.ecn = th->ece && th->cwr;
	a->sport = th->source;
	a->dport = th->dest;
	a->isn = bpf_ntohl(th->seq);
	return SP_ANSWER;
}

/* The verdict for a segment that is not answered */
static __always_inline int sp_not_answered(enum sp_kind kind)
{
	if (kind == SP_MALFORMED)
		return count(SP_XDP_SYN_MALFORMED, XDP_DROP);
	if (kind == SP_KNOWN)
		return count(SP_XDP_SYN_KNOWN, XDP_PASS);
	return count(SP_XDP_PASSED, XDP_PASS);
}

static __always_inline void sp_msg_tail(struct sp_answer *a, __u32 off)
{
	__builtin_memcpy(a->msg + off, &a->sport, 2);
	__builtin_memcpy(a->msg + off + 2, &a->dport, 2);
	put_be32(a->msg + off + 4, a->isn);
	a->msglen = off + 8;
}

static __always_inline void swap_mac(struct ethhdr *eth)
{
	__u8 tmp[ETH_ALEN];

	__builtin_memcpy(tmp, eth->h_source, ETH_ALEN);
	__builtin_memcpy(eth->h_source, eth->h_dest, ETH_ALEN);
	__builtin_memcpy(eth->h_dest, tmp, ETH_ALEN);
}

/* Bring the frame to len bytes; the pointers must be read again after */
static __always_inline int sp_resize(struct xdp_md *ctx, __u32 len)
{
	__u32 have = bpf_xdp_get_buff_len(ctx);

	return bpf_xdp_adjust_tail(ctx, (int)len - (int)have);
}

static __always_inline int sp_ipv4(struct xdp_md *ctx,
				   const struct sp_config *cfg)
{
	void *data = (void *)(long)ctx->data, *end = (void *)(long)ctx->data_end;
	struct sp_service_key svc = { .family = 4 };
	const struct sp_key_cache *k;
	struct sp_synack sa;
	struct sp_answer a = {};
	struct ethhdr *eth = data;
	struct iphdr *iph = (void *)(eth + 1);
	struct tcphdr *th;
	__u32 tcplen, saddr, daddr;
	__u64 sum;
	enum sp_kind kind;

	if ((void *)(iph + 1) > end || iph->protocol != IPPROTO_TCP)
		return count(SP_XDP_PASSED, XDP_PASS);
	/* options and fragments: the module deals with those */
	if (iph->ihl != 5 || (iph->frag_off & bpf_htons(0x3fff)))
		return count(SP_XDP_PASSED, XDP_PASS);
	__builtin_memcpy(svc.addr, &iph->daddr, 4);
	saddr = iph->saddr;
	daddr = iph->daddr;
	__builtin_memcpy(a.msg, &saddr, 4);
	__builtin_memcpy(a.msg + 4, &daddr, 4);
	th = (void *)(iph + 1);
	kind = sp_classify(th, end, &svc, &a, 8);
	if (kind == SP_ANSWER &&
	    bpf_ntohs(iph->tot_len) < sizeof(*iph) + th->doff * 4)
		kind = SP_MALFORMED;
	if (kind != SP_ANSWER)
		return sp_not_answered(kind);
	sp_msg_tail(&a, 8);
	k = sp_key(cfg);
	if (!k)
		return count(SP_XDP_NOT_READY, XDP_PASS);
	tcplen = sp_synack(&sa, &a, cfg, k, 0);
	/* the reply's pseudo header: addresses swapped */
	sum = bpf_csum_diff(0, 0, &daddr, 4, 0);
	sum = bpf_csum_diff(0, 0, &saddr, 4, sum);
	sum += bpf_htonl(IPPROTO_TCP + tcplen);
	sum = bpf_csum_diff(0, 0, (__be32 *)&sa, sizeof(sa), sum);
	sa.th.check = csum_fold(sum);

	if (sp_resize(ctx, sizeof(*eth) + sizeof(*iph) + tcplen))
		return count(SP_XDP_NO_ROOM, XDP_PASS);
	data = (void *)(long)ctx->data;
	end = (void *)(long)ctx->data_end;
	eth = data;
	iph = (void *)(eth + 1);
	th = (void *)(iph + 1);
	if ((void *)(th + 1) > end || sp_put_tcp(th, end, &sa, tcplen))
		return count(SP_XDP_NO_ROOM, XDP_PASS);

	swap_mac(eth);
	iph->version = 4;
	iph->ihl = 5;
	iph->tos = 0;
	iph->tot_len = bpf_htons(sizeof(*iph) + tcplen);
	iph->id = 0;
	iph->frag_off = bpf_htons(IP_DF);
	iph->ttl = cfg->ttl;
	iph->saddr = daddr;
	iph->daddr = saddr;
	iph->check = 0;
	iph->check = csum_fold(bpf_csum_diff(0, 0, (__be32 *)iph, sizeof(*iph), 0));
	return count(SP_XDP_SYN_ANSWERED, XDP_TX);
}

static __always_inline int sp_ipv6(struct xdp_md *ctx,
				   const struct sp_config *cfg)
{
	void *data = (void *)(long)ctx->data, *end = (void *)(long)ctx->data_end;
	struct sp_service_key svc = { .family = 6 };
	const struct sp_key_cache *k;
	struct in6_addr saddr, daddr;
	struct sp_synack sa;
	struct sp_answer a = {};
	struct ethhdr *eth = data;
	struct ipv6hdr *ip6 = (void *)(eth + 1);
	struct tcphdr *th;
	__u32 tcplen;
	__u64 sum;
	enum sp_kind kind;

	/* extension headers: the module deals with those */
	if ((void *)(ip6 + 1) > end || ip6->nexthdr != IPPROTO_TCP)
		return count(SP_XDP_PASSED, XDP_PASS);
	__builtin_memcpy(svc.addr, &ip6->daddr, 16);
	saddr = ip6->saddr;
	daddr = ip6->daddr;
	__builtin_memcpy(a.msg, &saddr, 16);
	__builtin_memcpy(a.msg + 16, &daddr, 16);
	th = (void *)(ip6 + 1);
	kind = sp_classify(th, end, &svc, &a, 32);
	if (kind == SP_ANSWER && bpf_ntohs(ip6->payload_len) < th->doff * 4)
		kind = SP_MALFORMED;
	if (kind != SP_ANSWER)
		return sp_not_answered(kind);
	sp_msg_tail(&a, 32);
	k = sp_key(cfg);
	if (!k)
		return count(SP_XDP_NOT_READY, XDP_PASS);
	tcplen = sp_synack(&sa, &a, cfg, k, 1);
	sum = bpf_csum_diff(0, 0, (__be32 *)&daddr, 16, 0);
	sum = bpf_csum_diff(0, 0, (__be32 *)&saddr, 16, sum);
	sum += bpf_htonl(tcplen);
	sum += bpf_htonl(IPPROTO_TCP);
	sum = bpf_csum_diff(0, 0, (__be32 *)&sa, sizeof(sa), sum);
	sa.th.check = csum_fold(sum);

	if (sp_resize(ctx, sizeof(*eth) + sizeof(*ip6) + tcplen))
		return count(SP_XDP_NO_ROOM, XDP_PASS);
	data = (void *)(long)ctx->data;
	end = (void *)(long)ctx->data_end;
	eth = data;
	ip6 = (void *)(eth + 1);
	th = (void *)(ip6 + 1);
	if ((void *)(th + 1) > end || sp_put_tcp(th, end, &sa, tcplen))
		return count(SP_XDP_NO_ROOM, XDP_PASS);

	swap_mac(eth);
	*(__be32 *)ip6 = bpf_htonl(0x60000000);
	ip6->payload_len = bpf_htons(tcplen);
	ip6->nexthdr = IPPROTO_TCP;
	ip6->hop_limit = cfg->ttl;
	ip6->saddr = daddr;
	ip6->daddr = saddr;
	return count(SP_XDP_SYN_ANSWERED, XDP_TX);
}

SEC("xdp")
int ipvs_synproxy_xdp(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data, *end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	const struct sp_config *cfg;
	__u32 zero = 0;

	if ((void *)(eth + 1) > end)
		return count(SP_XDP_PASSED, XDP_PASS);
	cfg = bpf_map_lookup_elem(&sp_config, &zero);
	if (!cfg || !cfg->ready)
		return count(SP_XDP_NOT_READY, XDP_PASS);
	if (eth->h_proto == bpf_htons(ETH_P_IP))
		return sp_ipv4(ctx, cfg);
	if (eth->h_proto == bpf_htons(ETH_P_IPV6))
		return sp_ipv6(ctx, cfg);
	return count(SP_XDP_PASSED, XDP_PASS);
}

char _license[] SEC("license") = "GPL";
