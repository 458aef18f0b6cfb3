// SPDX-License-Identifier: GPL-2.0
/*
 * toa - show the client address carried in a TCP option to real servers
 *
 * A FULLNAT load balancer rewrites client->VIP into laddr->RIP, so a real
 * server only sees the balancer's local address as its peer.  The balancer
 * puts the client's address and port into a TCP option (TOA):
 *
 *   kind 254, length 8:  port (2 bytes, network order) + IPv4 address (4)
 *   kind 253, length 20: port (2 bytes, network order) + IPv6 address (16)
 *
 * on the handshake-completing ACK (and on the first data packet when that
 * ACK had no room).  This module reads it and makes getpeername() and
 * accept() report the client, so unmodified servers see their real clients.
 * It needs no kernel patch: it works through kprobes on the stock kernel.
 *
 *   tcp_v4_syn_recv_sock/tcp_v6_syn_recv_sock (kretprobe): the ACK skb is an
 *     argument, the new child socket the return value; the option is parsed
 *     and remembered for the child.
 *   tcp_rcv_established (kprobe): a child whose handshake ACK had no option
 *     gets a last chance on the segment with its first byte of data (the
 *     balancer's "first data packet" case).
 *   inet_getname/inet6_getname (kretprobe): when the peer address of a
 *     socket with a remembered option is asked for, it is rewritten.
 *   inet_sock_destruct (kprobe): the final destructor of every inet socket
 *     (inet6_sock_destruct ends in it); the remembered option is forgotten.
 *
 * Where the per-socket data lives.  Nothing is stored in the socket itself:
 * sk_user_data belongs to the socket's owner (sockmap, kTLS, RPC, BPF...) and
 * a value of ours there would be taken for their pointer; and no field of a
 * stock struct sock is free.  Instead a hash table keyed by the socket
 * pointer holds small entries, freed (after an RCU grace period) when the
 * socket is destroyed and all at once when the module is unloaded, so no
 * socket ever points into this module's memory.  A kprobe can be missed
 * (nested probes), so a destructor call can be lost: entries therefore also
 * record the connection's peer (address, port) at creation, and an entry is
 * believed only while the socket still has that peer; a child created at
 * the same address replaces the old entry; and the table is bounded
 * (max_entries).  A lost destructor thus costs a slot until reuse, never a
 * wrong answer.
 *
 * Whom to believe.  Anybody can put a TOA option on a packet, so one is
 * believed only from the balancers' own source addresses (trusted_sources,
 * empty by default: nothing is believed until it is set), only on the
 * handshake-completing segment or the first data segment, and only once
 * per connection.  A client that reaches the server directly (NAT, DR) or
 * sends the option later in the connection changes nothing.
 */

#define pr_fmt(fmt) KBUILD_MODNAME ": " fmt

#include <linux/delay.h>
#include <linux/hash.h>
#include <linux/in.h>
#include <linux/in6.h>
#include <linux/inet.h>
#include <linux/kprobes.h>
#include <linux/module.h>
#include <linux/mutex.h>
#include <linux/percpu.h>
#include <linux/proc_fs.h>
#include <linux/seq_file.h>
#include <linux/skbuff.h>
#include <linux/slab.h>
#include <linux/spinlock.h>
#include <linux/tcp.h>
#include <net/inet_sock.h>
#include <net/ipv6.h>
#include <net/net_namespace.h>
#include <net/sock.h>
#include <net/tcp.h>

#define TCPOPT_TOA_V4		254
#define TCPOLEN_TOA_V4		8
#define TCPOPT_TOA_V6		253
#define TCPOLEN_TOA_V6		20

#define TOA_HASH_BITS		12
#define TOA_GETNAME_MAXACTIVE	1024
#define TOA_TRUST_MAX		64

static unsigned int max_entries = 262144;
module_param(max_entries, uint, 0444);
MODULE_PARM_DESC(max_entries, "Most sockets with a remembered client address (262144)");

static bool data_fallback = true;
module_param(data_fallback, bool, 0444);
MODULE_PARM_DESC(data_fallback,
		 "Also look for the option on a child's first data segment (Y)");

enum toa_counter {
	TOA_ACK_V4,
	TOA_ACK_V6,
	TOA_DATA_V4,
	TOA_DATA_V6,
	TOA_NONE,
	TOA_MALFORMED,
	TOA_GETNAME_V4,
	TOA_GETNAME_V6,
	TOA_GETNAME_MISMATCH,
	TOA_STALE,
	TOA_TABLE_FULL,
	TOA_NOMEM,
	TOA_UNTRUSTED,
	TOA_COUNTERS
};

static const char *const toa_counter_names[TOA_COUNTERS] = {
	[TOA_ACK_V4]		= "ack_toa_v4",
	[TOA_ACK_V6]		= "ack_toa_v6",
	[TOA_DATA_V4]		= "data_toa_v4",
	[TOA_DATA_V6]		= "data_toa_v6",
	[TOA_NONE]		= "no_toa",
	[TOA_MALFORMED]		= "malformed",
	[TOA_GETNAME_V4]	= "getname_v4",
	[TOA_GETNAME_V6]	= "getname_v6",
	[TOA_GETNAME_MISMATCH]	= "getname_family_mismatch",
	[TOA_STALE]		= "stale_entries",
	[TOA_TABLE_FULL]	= "table_full",
	[TOA_NOMEM]		= "nomem",
	[TOA_UNTRUSTED]		= "untrusted",
};

struct toa_stats {
	unsigned long cnt[TOA_COUNTERS];
};

static DEFINE_PER_CPU(struct toa_stats, toa_stats);

static void toa_inc(enum toa_counter c)
{
	this_cpu_inc(toa_stats.cnt[c]);
}

/* ---- trusted_sources: the balancers whose TOA options are believed ---- */

/* One prefix; IPv4 ones are kept v4-mapped, their length plus 96. */
struct toa_prefix {
	struct in6_addr addr;
	unsigned int len;
};

struct toa_trust {
	struct rcu_head rcu;
	unsigned int n;
	struct toa_prefix p[];
};

static struct toa_trust __rcu *toa_trust;
static DEFINE_MUTEX(toa_trust_lock);

/* "192.0.2.1", "192.0.2.0/24", "2001:db8::/32": one prefix, host bits zeroed */
static int toa_prefix_parse(const char *s, size_t n, struct toa_prefix *p)
{
	char buf[INET6_ADDRSTRLEN + 5];
	const char *slash, *end;
	unsigned int len, max;
	struct in6_addr addr;
	__be32 v4;

	if (!n || n >= sizeof(buf))
		return -EINVAL;
	memcpy(buf, s, n);
	buf[n] = '\0';
	slash = strchr(buf, '/');
	if (in4_pton(buf, -1, (u8 *)&v4, '/', &end) && *end == (slash ? '/' : '\0')) {
		ipv6_addr_set_v4mapped(v4, &p->addr);
		max = 32;
	} else if (in6_pton(buf, -1, p->addr.s6_addr, '/', &end) &&
		   *end == (slash ? '/' : '\0')) {
		max = 128;
	} else {
		return -EINVAL;
	}
	len = max;
	if (slash && (kstrtouint(slash + 1, 10, &len) || len > max))
		return -EINVAL;
	p->len = len + 128 - max;
	addr = p->addr;
	ipv6_addr_prefix(&p->addr, &addr, p->len);
	return 0;
}

/* A list of prefixes separated by commas or blanks; empty trusts nobody. */
static struct toa_trust *toa_trust_parse(const char *val)
{
	struct toa_trust *t;
	const char *s = val;
	size_t n;
	int err;

	t = kzalloc(struct_size(t, p, TOA_TRUST_MAX), GFP_KERNEL);
	if (!t)
		return ERR_PTR(-ENOMEM);
	for (;;) {
		s += strspn(s, ", \t\n");
		n = strcspn(s, ", \t\n");
		if (!n)
			return t;
		err = t->n < TOA_TRUST_MAX ? toa_prefix_parse(s, n, &t->p[t->n]) : -E2BIG;
		if (err) {
			pr_err("trusted_sources: cannot use \"%.*s\"%s\n",
			       (int)min_t(size_t, n, 64), s,
			       err == -E2BIG ? " (more than 64 prefixes)" : "");
			kfree(t);
			return ERR_PTR(err);
		}
		t->n++;
		s += n;
	}
}

static int toa_trust_set(const char *val, const struct kernel_param *kp)
{
	struct toa_trust *t = toa_trust_parse(val), *old;

	if (IS_ERR(t))
		return PTR_ERR(t);
	mutex_lock(&toa_trust_lock);
	old = rcu_replace_pointer(toa_trust, t, lockdep_is_held(&toa_trust_lock));
	mutex_unlock(&toa_trust_lock);
	if (old)
		kfree_rcu(old, rcu);
	return 0;
}

static int toa_trust_get(char *buf, const struct kernel_param *kp)
{
	const struct toa_trust *t;
	int len = 0;
	unsigned int i;

	mutex_lock(&toa_trust_lock);
	t = rcu_dereference_protected(toa_trust, lockdep_is_held(&toa_trust_lock));
	for (i = 0; t && i < t->n; i++) {
		const struct toa_prefix *p = &t->p[i];

		if (ipv6_addr_v4mapped(&p->addr))
			len += scnprintf(buf + len, PAGE_SIZE - len, "%s%pI4/%u", i ? "," : "",
					 &p->addr.s6_addr32[3], p->len - 96);
		else
			len += scnprintf(buf + len, PAGE_SIZE - len, "%s%pI6c/%u", i ? "," : "",
					 &p->addr, p->len);
	}
	mutex_unlock(&toa_trust_lock);
	len += scnprintf(buf + len, PAGE_SIZE - len, "\n");
	return len;
}

static const struct kernel_param_ops toa_trust_ops = {
	.set = toa_trust_set,
	.get = toa_trust_get,
};

module_param_cb(trusted_sources, &toa_trust_ops, NULL, 0644);
MODULE_PARM_DESC(trusted_sources,
		 "Balancer source prefixes whose TOA options are believed, comma-separated (none)");

static void toa_trust_warn(void)
{
	const struct toa_trust *t;

	mutex_lock(&toa_trust_lock);
	t = rcu_dereference_protected(toa_trust, lockdep_is_held(&toa_trust_lock));
	if (!t || !t->n)
		pr_warn("trusted_sources is empty: no TOA option is believed until it is set\n");
	mutex_unlock(&toa_trust_lock);
}

/* Did @skb come from a trusted balancer?  Caller holds the RCU read lock. */
static bool toa_skb_trusted(const struct sk_buff *skb)
{
	const struct toa_trust *t = rcu_dereference(toa_trust);
	struct in6_addr saddr;
	unsigned int i;

	if (!t || !t->n)
		return false;
	if (skb->protocol == htons(ETH_P_IP))
		ipv6_addr_set_v4mapped(ip_hdr(skb)->saddr, &saddr);
	else if (skb->protocol == htons(ETH_P_IPV6))
		saddr = ipv6_hdr(skb)->saddr;
	else
		return false;
	for (i = 0; i < t->n; i++)
		if (ipv6_prefix_equal(&saddr, &t->p[i].addr, t->p[i].len))
			return true;
	return false;
}

/* What the option said; family 0 means "none seen yet" (a pending child). */
struct toa_addr {
	sa_family_t family;
	__be16 port;
	struct in6_addr addr;	/* IPv4: in the first 4 bytes */
};

struct toa_entry {
	struct hlist_node node;
	struct rcu_head rcu;
	const struct sock *sk;
	/* the socket's own peer when the entry was made (see the top comment) */
	struct in6_addr peer_addr;
	__be16 peer_port;
	struct toa_addr toa;
};

struct toa_bucket {
	struct hlist_head head;
	spinlock_t lock;	/* writers; readers use RCU */
};

static struct toa_bucket toa_table[1 << TOA_HASH_BITS];
static atomic_t toa_entries = ATOMIC_INIT(0);

/*
 * kretprobe instances between their entry and return handlers.  inet_getname
 * sleeps (lock_sock), so calls can be in flight for a while; unloading waits
 * for them with the probes disabled rather than unregistering under them.
 */
static atomic_t toa_inflight = ATOMIC_INIT(0);

static struct toa_bucket *toa_bucket(const struct sock *sk)
{
	return &toa_table[hash_ptr(sk, TOA_HASH_BITS)];
}

/* The socket's peer address, as a v6 (or v4-mapped) address. */
static void toa_sk_peer(const struct sock *sk, struct in6_addr *addr, __be16 *port)
{
	*port = inet_sk(sk)->inet_dport;
#if IS_ENABLED(CONFIG_IPV6)
	if (sk->sk_family == AF_INET6) {
		*addr = sk->sk_v6_daddr;
		return;
	}
#endif
	ipv6_addr_set_v4mapped(inet_sk(sk)->inet_daddr, addr);
}

/* Caller holds the RCU read lock. */
static struct toa_entry *toa_find(const struct sock *sk)
{
	struct toa_entry *e;

	hlist_for_each_entry_rcu(e, &toa_bucket(sk)->head, node)
		if (e->sk == sk)
			return e;
	return NULL;
}

/* Remember @toa (or a pending marker) for @sk, replacing any older entry. */
static void toa_store(const struct sock *sk, const struct toa_addr *toa, bool replace_only)
{
	struct toa_bucket *b = toa_bucket(sk);
	struct toa_entry *e, *old = NULL;
	unsigned long flags;

	e = kmalloc(sizeof(*e), GFP_ATOMIC);
	if (!e) {
		toa_inc(TOA_NOMEM);
		return;
	}
	e->sk = sk;
	e->toa = *toa;
	toa_sk_peer(sk, &e->peer_addr, &e->peer_port);

	spin_lock_irqsave(&b->lock, flags);
	hlist_for_each_entry(old, &b->head, node)
		if (old->sk == sk)
			break;
	if (old) {
		hlist_replace_rcu(&old->node, &e->node);
		spin_unlock_irqrestore(&b->lock, flags);
		kfree_rcu(old, rcu);
		return;
	}
	if (!replace_only && atomic_inc_return(&toa_entries) <= max_entries) {
		hlist_add_head_rcu(&e->node, &b->head);
		spin_unlock_irqrestore(&b->lock, flags);
		return;
	}
	if (!replace_only) {
		atomic_dec(&toa_entries);
		toa_inc(TOA_TABLE_FULL);
	}
	spin_unlock_irqrestore(&b->lock, flags);
	kfree(e);
}

static void toa_forget(const struct sock *sk)
{
	struct toa_bucket *b = toa_bucket(sk);
	struct toa_entry *e;
	unsigned long flags;

	spin_lock_irqsave(&b->lock, flags);
	hlist_for_each_entry(e, &b->head, node) {
		if (e->sk == sk) {
			hlist_del_rcu(&e->node);
			atomic_dec(&toa_entries);
			spin_unlock_irqrestore(&b->lock, flags);
			kfree_rcu(e, rcu);
			return;
		}
	}
	spin_unlock_irqrestore(&b->lock, flags);
}

/*
 * Parse the TCP options of @skb (transport header set, header linear, as
 * TCP's receive path guarantees) for a TOA option.  Returns true and fills
 * @toa for the first well-formed one; malformed options are counted and
 * ignored, and a broken option list ends the walk.
 */
static bool toa_parse(const struct sk_buff *skb, struct toa_addr *toa)
{
	const struct tcphdr *th = tcp_hdr(skb);
	const unsigned char *ptr, *end;
	unsigned int doff;

	if (!skb_transport_header_was_set(skb) ||
	    (unsigned char *)th + sizeof(*th) > skb_tail_pointer(skb))
		return false;
	doff = th->doff * 4;
	if (doff <= sizeof(*th) || (unsigned char *)th + doff > skb_tail_pointer(skb))
		return false;
	ptr = (const unsigned char *)(th + 1);
	end = (const unsigned char *)th + doff;

	while (ptr < end) {
		unsigned int kind = ptr[0], len;

		if (kind == TCPOPT_EOL)
			break;
		if (kind == TCPOPT_NOP) {
			ptr++;
			continue;
		}
		if (end - ptr < 2) {
			if (kind == TCPOPT_TOA_V4 || kind == TCPOPT_TOA_V6)
				toa_inc(TOA_MALFORMED);
			break;
		}
		len = ptr[1];
		if (len < 2 || len > end - ptr) {
			if (kind == TCPOPT_TOA_V4 || kind == TCPOPT_TOA_V6)
				toa_inc(TOA_MALFORMED);
			break;
		}
		if (kind == TCPOPT_TOA_V4 || kind == TCPOPT_TOA_V6) {
			bool v4 = kind == TCPOPT_TOA_V4;

			if (len != (v4 ? TCPOLEN_TOA_V4 : TCPOLEN_TOA_V6)) {
				toa_inc(TOA_MALFORMED);
			} else {
				memset(toa, 0, sizeof(*toa));
				toa->family = v4 ? AF_INET : AF_INET6;
				memcpy(&toa->port, ptr + 2, sizeof(toa->port));
				memcpy(&toa->addr, ptr + 4, v4 ? 4 : 16);
				return true;
			}
		}
		ptr += len;
	}
	return false;
}

/* A TOA option on @skb from a trusted balancer; an untrusted one is counted. */
static bool toa_parse_trusted(const struct sk_buff *skb, struct toa_addr *toa)
{
	bool trusted;

	if (!toa_parse(skb, toa))
		return false;
	rcu_read_lock();
	trusted = toa_skb_trusted(skb);
	rcu_read_unlock();
	if (!trusted)
		toa_inc(TOA_UNTRUSTED);
	return trusted;
}

/* ---- tcp_v{4,6}_syn_recv_sock: the handshake-completing packet ---- */

struct toa_syn_recv_data {
	struct sk_buff *skb;
};

static int toa_syn_recv_entry(struct kretprobe_instance *ri, struct pt_regs *regs)
{
	struct toa_syn_recv_data *d = (struct toa_syn_recv_data *)ri->data;

	d->skb = (struct sk_buff *)regs_get_kernel_argument(regs, 1);
	atomic_inc(&toa_inflight);
	return 0;
}

static void toa_syn_recv(struct kretprobe_instance *ri, struct pt_regs *regs,
			 unsigned short family)
{
	struct toa_syn_recv_data *d = (struct toa_syn_recv_data *)ri->data;
	struct sock *newsk = (struct sock *)regs_return_value(regs);
	struct toa_addr toa;

	/*
	 * A v4-mapped child of an IPv6 listener is made by tcp_v4_syn_recv_sock
	 * called from tcp_v6_syn_recv_sock: handle it once, in the latter.
	 */
	if (IS_ERR_OR_NULL(newsk) || !d->skb || newsk->sk_family != family)
		return;
	if (toa_parse_trusted(d->skb, &toa)) {
		toa_inc(toa.family == AF_INET ? TOA_ACK_V4 : TOA_ACK_V6);
		toa_store(newsk, &toa, false);
	} else if (data_fallback) {
		memset(&toa, 0, sizeof(toa));
		toa_store(newsk, &toa, false);	/* pending: look at later packets */
	} else {
		toa_inc(TOA_NONE);
	}
}

static int toa_syn_recv4_ret(struct kretprobe_instance *ri, struct pt_regs *regs)
{
	toa_syn_recv(ri, regs, AF_INET);
	atomic_dec(&toa_inflight);
	return 0;
}

static int toa_syn_recv6_ret(struct kretprobe_instance *ri, struct pt_regs *regs)
{
	toa_syn_recv(ri, regs, AF_INET6);
	atomic_dec(&toa_inflight);
	return 0;
}

static struct kretprobe toa_syn_recv4 = {
	.kp.symbol_name	= "tcp_v4_syn_recv_sock",
	.entry_handler	= toa_syn_recv_entry,
	.handler	= toa_syn_recv4_ret,
	.data_size	= sizeof(struct toa_syn_recv_data),
};

static struct kretprobe toa_syn_recv6 = {
	.kp.symbol_name	= "tcp_v6_syn_recv_sock",
	.entry_handler	= toa_syn_recv_entry,
	.handler	= toa_syn_recv6_ret,
	.data_size	= sizeof(struct toa_syn_recv_data),
};

/* ---- tcp_rcv_established: the first data segment of a pending child ---- */

/* The segment that carries a connection's first byte: the only one after
 * the handshake where a balancer puts the option.
 */
static bool toa_first_data(const struct sock *sk, const struct sk_buff *skb)
{
	if (!skb_transport_header_was_set(skb) ||
	    skb->len <= skb_transport_offset(skb) + tcp_hdr(skb)->doff * 4)
		return false;
	return TCP_SKB_CB(skb)->seq == tcp_sk(sk)->rcv_nxt;
}

static int toa_rcv_established(struct kprobe *p, struct pt_regs *regs)
{
	struct sock *sk = (struct sock *)regs_get_kernel_argument(regs, 0);
	struct sk_buff *skb = (struct sk_buff *)regs_get_kernel_argument(regs, 1);
	struct toa_entry *e;
	struct toa_addr toa;
	bool pending;

	if (!atomic_read(&toa_entries) || tcp_sk(sk)->bytes_received ||
	    !toa_first_data(sk, skb))
		return 0;
	rcu_read_lock();
	e = toa_find(sk);
	pending = e && !e->toa.family;
	rcu_read_unlock();
	if (!pending)
		return 0;
	/* found or not, this was the last chance: once per connection */
	if (toa_parse_trusted(skb, &toa)) {
		toa_inc(toa.family == AF_INET ? TOA_DATA_V4 : TOA_DATA_V6);
		toa_store(sk, &toa, true);
	} else {
		toa_inc(TOA_NONE);
		toa_forget(sk);
	}
	return 0;
}

static struct kprobe toa_established = {
	.symbol_name	= "tcp_rcv_established",
	.pre_handler	= toa_rcv_established,
};

/* ---- inet_sock_destruct: the socket is going away ---- */

static int toa_destruct(struct kprobe *p, struct pt_regs *regs)
{
	struct sock *sk = (struct sock *)regs_get_kernel_argument(regs, 0);
	bool found;

	if (!atomic_read(&toa_entries))
		return 0;
	rcu_read_lock();
	found = toa_find(sk);
	rcu_read_unlock();
	if (found)
		toa_forget(sk);
	return 0;
}

static struct kprobe toa_sock_destruct = {
	.symbol_name	= "inet_sock_destruct",
	.pre_handler	= toa_destruct,
};

/* ---- inet_getname/inet6_getname: report the client ---- */

struct toa_getname_data {
	struct socket *sock;
	struct sockaddr *uaddr;
	int peer;
};

static int toa_getname_entry(struct kretprobe_instance *ri, struct pt_regs *regs)
{
	struct toa_getname_data *d = (struct toa_getname_data *)ri->data;

	d->sock = (struct socket *)regs_get_kernel_argument(regs, 0);
	d->uaddr = (struct sockaddr *)regs_get_kernel_argument(regs, 1);
	d->peer = (int)regs_get_kernel_argument(regs, 2);
	atomic_inc(&toa_inflight);
	return 0;
}

/* The remembered client of @sk, if any and still believable. */
static bool toa_lookup(const struct sock *sk, struct toa_addr *toa)
{
	struct in6_addr peer_addr;
	struct toa_entry *e;
	__be16 peer_port;
	bool ok = false;

	if (!atomic_read(&toa_entries))
		return false;
	toa_sk_peer(sk, &peer_addr, &peer_port);
	rcu_read_lock();
	e = toa_find(sk);
	if (e && e->toa.family) {
		if (e->peer_port == peer_port && ipv6_addr_equal(&e->peer_addr, &peer_addr)) {
			*toa = e->toa;
			ok = true;
		} else {
			toa_inc(TOA_STALE);
		}
	}
	rcu_read_unlock();
	return ok;
}

static void toa_getname(struct toa_getname_data *d, int len)
{
	struct toa_addr toa;
	struct sock *sk;

	if (!d->peer || len <= 0 || !d->sock)
		return;
	sk = d->sock->sk;
	if (!sk || sk->sk_protocol != IPPROTO_TCP || !toa_lookup(sk, &toa))
		return;

	if (d->uaddr->sa_family == AF_INET && len >= (int)sizeof(struct sockaddr_in)) {
		struct sockaddr_in *sin = (struct sockaddr_in *)d->uaddr;

		if (toa.family != AF_INET) {
			toa_inc(TOA_GETNAME_MISMATCH);
			return;
		}
		sin->sin_port = toa.port;
		memcpy(&sin->sin_addr.s_addr, &toa.addr, 4);
		toa_inc(TOA_GETNAME_V4);
	} else if (d->uaddr->sa_family == AF_INET6 && len >= (int)sizeof(struct sockaddr_in6)) {
		struct sockaddr_in6 *sin6 = (struct sockaddr_in6 *)d->uaddr;

		sin6->sin6_port = toa.port;
		if (toa.family == AF_INET) {
			__be32 v4;

			/* a v4 client of a dual-stack socket: v4-mapped */
			memcpy(&v4, &toa.addr, sizeof(v4));
			ipv6_addr_set_v4mapped(v4, &sin6->sin6_addr);
		} else {
			sin6->sin6_addr = toa.addr;
		}
		sin6->sin6_flowinfo = 0;
		sin6->sin6_scope_id = 0;
		toa_inc(TOA_GETNAME_V6);
	}
}

static int toa_getname_ret(struct kretprobe_instance *ri, struct pt_regs *regs)
{
	toa_getname((struct toa_getname_data *)ri->data, (int)regs_return_value(regs));
	atomic_dec(&toa_inflight);
	return 0;
}

static struct kretprobe toa_getname4 = {
	.kp.symbol_name	= "inet_getname",
	.entry_handler	= toa_getname_entry,
	.handler	= toa_getname_ret,
	.data_size	= sizeof(struct toa_getname_data),
};

static struct kretprobe toa_getname6 = {
	.kp.symbol_name	= "inet6_getname",
	.entry_handler	= toa_getname_entry,
	.handler	= toa_getname_ret,
	.data_size	= sizeof(struct toa_getname_data),
};

static struct kretprobe *toa_kretprobes[] = {
	&toa_getname4, &toa_getname6, &toa_syn_recv4, &toa_syn_recv6,
};

static struct kprobe *toa_kprobes[] = {
	&toa_sock_destruct, &toa_established,
};

/* ---- /proc/net/toa_stats ---- */

static int toa_stats_show(struct seq_file *seq, void *v)
{
	unsigned long sum[TOA_COUNTERS] = {};
	int cpu, i;

	for_each_possible_cpu(cpu)
		for (i = 0; i < TOA_COUNTERS; i++)
			sum[i] += per_cpu(toa_stats, cpu).cnt[i];
	for (i = 0; i < TOA_COUNTERS; i++)
		seq_printf(seq, "%-24s %lu\n", toa_counter_names[i], sum[i]);
	seq_printf(seq, "%-24s %d\n", "entries", atomic_read(&toa_entries));
	seq_printf(seq, "%-24s %d\n", "getname_missed",
		   toa_getname4.nmissed + toa_getname6.nmissed);
	seq_printf(seq, "%-24s %d\n", "syn_recv_missed",
		   toa_syn_recv4.nmissed + toa_syn_recv6.nmissed);
	seq_printf(seq, "%-24s %lu\n", "established_missed", toa_established.nmissed);
	seq_printf(seq, "%-24s %lu\n", "destruct_missed", toa_sock_destruct.nmissed);
	return 0;
}

static int __net_init toa_net_init(struct net *net)
{
	if (!proc_create_net_single("toa_stats", 0444, net->proc_net, toa_stats_show, NULL))
		return -ENOMEM;
	return 0;
}

static void __net_exit toa_net_exit(struct net *net)
{
	remove_proc_entry("toa_stats", net->proc_net);
}

static struct pernet_operations toa_net_ops = {
	.init = toa_net_init,
	.exit = toa_net_exit,
};

/* ---- module ---- */

static void toa_free_all(void)
{
	struct toa_entry *e;
	struct hlist_node *tmp;
	int i;

	/* the probes are gone: wait out readers that were still running */
	synchronize_rcu();
	for (i = 0; i < ARRAY_SIZE(toa_table); i++) {
		hlist_for_each_entry_safe(e, tmp, &toa_table[i].head, node) {
			hlist_del(&e->node);
			kfree(e);
		}
	}
	atomic_set(&toa_entries, 0);
	/* entries replaced or forgotten earlier may still wait for kfree_rcu */
	rcu_barrier();
}

static int __init toa_init(void)
{
	int i, err;

	for (i = 0; i < ARRAY_SIZE(toa_table); i++) {
		INIT_HLIST_HEAD(&toa_table[i].head);
		spin_lock_init(&toa_table[i].lock);
	}
	toa_getname4.maxactive = TOA_GETNAME_MAXACTIVE + 8 * num_possible_cpus();
	toa_getname6.maxactive = toa_getname4.maxactive;

	err = register_pernet_subsys(&toa_net_ops);
	if (err)
		return err;
	/* destructor first, so that nothing stored can outlive its socket */
	err = register_kprobes(toa_kprobes, ARRAY_SIZE(toa_kprobes));
	if (err) {
		pr_err("cannot probe inet_sock_destruct/tcp_rcv_established: %d\n", err);
		goto err_pernet;
	}
	err = register_kretprobes(toa_kretprobes, ARRAY_SIZE(toa_kretprobes));
	if (err) {
		pr_err("cannot probe inet{,6}_getname/tcp_v{4,6}_syn_recv_sock: %d\n", err);
		goto err_kprobes;
	}
	pr_info("loaded: TCP option %d (IPv4) and %d (IPv6) give the peer address\n",
		TCPOPT_TOA_V4, TCPOPT_TOA_V6);
	toa_trust_warn();
	return 0;

err_kprobes:
	unregister_kprobes(toa_kprobes, ARRAY_SIZE(toa_kprobes));
	toa_free_all();
err_pernet:
	unregister_pernet_subsys(&toa_net_ops);
	return err;
}

/*
 * Unregistering a kretprobe while calls are inside the probed function
 * leaves their return to the kprobes core after this module is gone; with
 * the entries disabled, let those calls return first.
 */
static void toa_drain_kretprobes(void)
{
	unsigned long waited = 0;
	int i;

	for (i = 0; i < ARRAY_SIZE(toa_kretprobes); i++)
		disable_kretprobe(toa_kretprobes[i]);
	while (atomic_read(&toa_inflight)) {
		msleep(20);
		if (++waited % 250 == 0)
			pr_info("unload waits for %d probed calls to return\n",
				atomic_read(&toa_inflight));
	}
}

static void __exit toa_exit(void)
{
	/* stop making entries, then stop reading them, then free them */
	toa_drain_kretprobes();
	unregister_kretprobes(toa_kretprobes, ARRAY_SIZE(toa_kretprobes));
	unregister_kprobes(toa_kprobes, ARRAY_SIZE(toa_kprobes));
	toa_free_all();
	unregister_pernet_subsys(&toa_net_ops);
	kfree(rcu_dereference_protected(toa_trust, true));
	pr_info("unloaded\n");
}

module_init(toa_init);
module_exit(toa_exit);

MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("Client address from a TCP option (TOA) for FULLNAT real servers");
