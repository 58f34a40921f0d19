// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * nsredirect: rewrite connect() to a loopback address:port inside selected
 * network namespaces, at connect time, with no per-packet work.
 *
 * The programs are attached once at the cgroup2 root, so they see every
 * connect() on the host. A connect that no rule can match (not TCP, or not to
 * a loopback or unspecified address) is decided from the destination alone;
 * the rest pay one hash miss, keyed by netns cookie, unless their namespace
 * has a rule for what they dialled.
 *
 * The original destination is kept, keyed by socket cookie, in a
 * preallocated hash (nsr_peers) so getpeername() reports what the
 * application dialled; the socket's release deletes it. When that hash is
 * full the record goes in the socket's own storage (nsr_sockets) instead,
 * which is unbounded but costs two allocations per socket. A socket that
 * was not redirected has no record, and one whose record no longer matches
 * its peer (it connected again, elsewhere), is reported as the kernel sees
 * it.
 */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

/* Rule entries and per-spec counters. A spec expands to at most 6 entries
 * and a netns has at most 16 specs; the enrollment store (userspace only,
 * see internal/loader) holds 8,192 netns, so every enrolled netns fits with
 * 8 entries on average and a counter never runs out before its rule. */
#define NSR_MAX_RULES 65536

/* Redirected TCP sockets open at once whose records fit the fast store
 * (nsr_peers); the rest keep theirs in socket storage. The hash is
 * preallocated: a record costs no allocation, and the smaller it is the more
 * of its buckets stay in the CPU's caches (16,384 entries: 1.5 MiB). */
#define NSR_MAX_PEERS 16384

#define SYS_PROCEED 1
#define NSR_IPPROTO_TCP 6 /* linux/in.h, without its libc dependencies */
#define NSR_IPPROTO_UDP 17
#define NSR_AF_INET 2 /* linux/socket.h */
#define NSR_AF_INET6 10

/* Indexes of nsr_stats, the per-CPU event counters. */
enum nsr_stat {
	NSR_STAT_PEER_STORAGE_FAIL = 0, /* redirected, but the dialled address not kept */
	NSR_STAT_UDP_PEER_STORAGE_FAIL, /* a UDP datagram redirected, its replies' source not rewritten */
	NSR_STAT_MAX,
};

/* One expanded rule: (netns, protocol, family, address, port) as dialled.
 * Addresses and ports are in network byte order; IPv4 lives in addr[0]. */
struct rule_key {
	__u64 netns_cookie;
	__u32 addr[4];
	__u16 port;
	__u8 family; /* 4 or 6 */
	__u8 proto;  /* NSR_IPPROTO_TCP or NSR_IPPROTO_UDP */
	__u32 _pad1;
};

struct rule_val {
	__u32 addr[4]; /* new destination, ignored when keep_addr */
	__u16 port;
	__u8 keep_addr;
	__u8 _pad0;
	__u32 index; /* the spec's index within its enrollment, for counters */
};

struct counter_key {
	__u64 netns_cookie;
	__u32 index;
	__u32 _pad0;
};

/* The record a redirected socket keeps: what it dialled, and where the
 * redirect sent it, so getpeername can tell a live record from one a socket
 * keeps after connecting again (a failed connect, or AF_UNSPEC, lets a TCP
 * socket connect a second time). Same size as before (the pinned map's value
 * did not change): the words an address of a rule never uses hold where it
 * went, and the family carries NSR_REC_CHECKED, which the programs of older
 * builds do not know, so they leave such a record alone.
 *
 *	family 4|CHECKED: addr[0] dialled IPv4, addr[1] new port, addr[2] new IPv4
 *	family 6|CHECKED: addr[2..3] dialled IPv6 (its first 64 bits are 0 for
 *	                  every address a rule matches), addr[0] last word of the
 *	                  new address, addr[1] new port
 *	family 4 or 6:    written by an older build: addr as dialled, trusted
 *
 * A new address of 0 is an unspecified one kept as dialled: the kernel
 * connects that to loopback, so any loopback peer matches. */
#define NSR_REC_CHECKED 0x80

struct orig_dst {
	__u32 addr[4];
	__u16 port;
	__u8 family;
	__u8 _pad0;
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, NSR_MAX_RULES);
	__type(key, struct rule_key);
	__type(value, struct rule_val);
} nsr_rules SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__uint(max_entries, NSR_MAX_RULES);
	__type(key, struct counter_key);
	__type(value, __u64);
} nsr_counters SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_SK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct orig_dst);
} nsr_sockets SEC(".maps");

/* Records of redirected TCP sockets by socket cookie (never reused while
 * the host runs); nsr_sock_release deletes a socket's when it is closed. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, NSR_MAX_PEERS);
	__type(key, __u64);
	__type(value, struct orig_dst);
} nsr_peers SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, NSR_STAT_MAX);
	__type(key, enum nsr_stat); /* 4 bytes; also puts the enum in BTF for bpf2go */
	__type(value, __u64);
} nsr_stats SEC(".maps");

static __always_inline void count_stat(enum nsr_stat stat)
{
	__u64 *n = bpf_map_lookup_elem(&nsr_stats, &stat);

	if (n)
		*n += 1;
}

static __always_inline void count(__u64 cookie, __u32 index)
{
	struct counter_key ck = {.netns_cookie = cookie, .index = index};
	__u64 *n = bpf_map_lookup_elem(&nsr_counters, &ck);

	if (n)
		*n += 1; /* per-CPU value: no atomics needed */
}

/* The fast path: every connect() of the host runs these programs, and a rule
 * only ever matches a loopback or unspecified destination (127.0.0.0/8, ::1,
 * 0.0.0.0, ::, and their v4-mapped forms; internal/rule refuses any other).
 * Anything else is decided from the destination alone, before any helper or
 * map call. */
#define NSR_LOOPBACK_NET 0x7f000000 /* 127.0.0.0/8 */
#define NSR_NET8_MASK 0xff000000

static __always_inline int maybe_ours4(__u32 ip4)
{
	return (ip4 & bpf_htonl(NSR_NET8_MASK)) == bpf_htonl(NSR_LOOPBACK_NET) || ip4 == 0;
}

static __always_inline int maybe_ours6_addr(const __u32 *addr)
{
	if (addr[0] != 0 || addr[1] != 0)
		return 0;
	if (addr[2] == 0) /* :: and ::1 */
		return addr[3] == 0 || addr[3] == bpf_htonl(1);
	if (addr[2] == bpf_htonl(0xffff)) /* ::ffff:a.b.c.d */
		return maybe_ours4(addr[3]);
	return 0;
}

static __always_inline int maybe_ours6(const struct rule_key *key)
{
	return maybe_ours6_addr(key->addr);
}

/* The v4 and v6 programs share one body, given the family as a constant:
 * the bodies are inlined and the compiler keeps only that family's code, so
 * each program reads only its own context fields (user_ip4 or user_ip6, as
 * the verifier requires). Addresses are in the key's words: user_ip4 in
 * word 0 for family 4, user_ip6 in all four for 6. */
static __always_inline int maybe_ours(__u8 family, const __u32 *addr)
{
	return family == 4 ? maybe_ours4(addr[0]) : maybe_ours6_addr(addr);
}

static __always_inline void get_addr(const struct bpf_sock_addr *ctx, __u8 family, __u32 *addr)
{
	if (family == 4) {
		addr[0] = ctx->user_ip4;
		return;
	}
	addr[0] = ctx->user_ip6[0];
	addr[1] = ctx->user_ip6[1];
	addr[2] = ctx->user_ip6[2];
	addr[3] = ctx->user_ip6[3];
}

static __always_inline void set_addr(struct bpf_sock_addr *ctx, __u8 family, const __u32 *addr)
{
	if (family == 4) {
		ctx->user_ip4 = addr[0];
		return;
	}
	ctx->user_ip6[0] = addr[0];
	ctx->user_ip6[1] = addr[1];
	ctx->user_ip6[2] = addr[2];
	ctx->user_ip6[3] = addr[3];
}

/* The record of a redirect, in the NSR_REC_CHECKED form. */
static __always_inline void fill_record(struct orig_dst *rec, const struct rule_key *key, const struct rule_val *val)
{
	rec->port = key->port;
	rec->family = key->family | NSR_REC_CHECKED;
	rec->addr[1] = (__u32)val->port;
	if (key->family == 4) {
		rec->addr[0] = key->addr[0];
		rec->addr[2] = val->keep_addr ? key->addr[0] : val->addr[0];
		rec->addr[3] = 0;
	} else {
		rec->addr[0] = val->keep_addr ? key->addr[3] : val->addr[3];
		rec->addr[2] = key->addr[2];
		rec->addr[3] = key->addr[3];
	}
}

/* Look the dialled destination up; on a hit remember it for the socket and
 * return the rule. A miss calls no helper beyond the lookup: a record the
 * socket may keep from an earlier connect is stale, and the getpeername
 * programs see that from the peer (record_matches*), so there is nothing to
 * delete on the path every loopback connect of the host takes.
 *
 * The record goes in nsr_peers: a preallocated element, no allocation. An
 * update of a socket's existing entry (a second redirected connect) cannot
 * fail; a new one fails only when the hash is full, and the record goes in
 * the socket's storage then. */
static __always_inline const struct rule_val *lookup(struct bpf_sock_addr *ctx, struct rule_key *key)
{
	const struct rule_val *val;
	struct orig_dst rec = {}, *orig;
	__u64 sock;

	key->netns_cookie = bpf_get_netns_cookie(ctx);
	val = bpf_map_lookup_elem(&nsr_rules, key);
	if (!val)
		return 0;

	fill_record(&rec, key, val);
	sock = bpf_get_socket_cookie(ctx);
	if (bpf_map_update_elem(&nsr_peers, &sock, &rec, BPF_ANY) != 0) {
		orig = bpf_sk_storage_get(&nsr_sockets, ctx->sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
		if (orig)
			*orig = rec;
		else
			/* Out of memory for socket storage: the connect is
			 * still redirected, but getpeername will show the new
			 * port. */
			count_stat(NSR_STAT_PEER_STORAGE_FAIL);
	}
	count(key->netns_cookie, val->index);
	return val;
}

/* connect() of a TCP socket. */
static __always_inline int tcp_connect(struct bpf_sock_addr *ctx, __u8 family)
{
	struct rule_key key = {.family = family, .proto = NSR_IPPROTO_TCP};
	const struct rule_val *val;

	if (ctx->protocol != NSR_IPPROTO_TCP)
		return SYS_PROCEED;
	get_addr(ctx, family, key.addr);
	if (!maybe_ours(family, key.addr))
		return SYS_PROCEED;
	key.port = (__u16)ctx->user_port;
	val = lookup(ctx, &key);
	if (!val)
		return SYS_PROCEED;

	if (!val->keep_addr)
		set_addr(ctx, family, val->addr);
	ctx->user_port = (__u32)val->port;
	return SYS_PROCEED;
}

SEC("cgroup/connect4")
int nsr_connect4(struct bpf_sock_addr *ctx)
{
	return tcp_connect(ctx, 4);
}

/* Covers ::1 and v4-mapped ::ffff:127.0.0.1 on dual-stack sockets: a
 * v4-mapped connect() runs this hook only, never connect4. */
SEC("cgroup/connect6")
int nsr_connect6(struct bpf_sock_addr *ctx)
{
	return tcp_connect(ctx, 6);
}

/* Every rule redirects to loopback (internal/rule refuses any other target,
 * and an unspecified one reaches loopback), so a socket whose peer is not
 * loopback was not connected by our redirect. */
static __always_inline int peer_is_loopback4(__u32 ip4)
{
	return (ip4 & bpf_htonl(NSR_NET8_MASK)) == bpf_htonl(NSR_LOOPBACK_NET);
}

/* ::1 or ::ffff:127.0.0.0/104; among these the last word tells them apart. */
static __always_inline int peer_is_loopback6(const __u32 *ip6)
{
	if (ip6[0] != 0 || ip6[1] != 0)
		return 0;
	if (ip6[2] == 0)
		return ip6[3] == bpf_htonl(1);
	if (ip6[2] == bpf_htonl(0xffff))
		return peer_is_loopback4(ip6[3]);
	return 0;
}

static __always_inline int peer_is_loopback(__u8 family, const __u32 *peer)
{
	return family == 4 ? peer_is_loopback4(peer[0]) : peer_is_loopback6(peer);
}

/* Whether the socket's record describes the connection it has now: its peer
 * is where the recorded redirect went. */
static __always_inline int record_matches(const struct orig_dst *orig, __u8 family, const __u32 *peer, __u32 port)
{
	if (!peer_is_loopback(family, peer))
		return 0;
	if (orig->family == family) /* an older build's record */
		return 1;
	if ((__u16)orig->addr[1] != (__u16)port)
		return 0;
	if (family == 4)
		return orig->addr[2] == 0 || orig->addr[2] == peer[0];
	return orig->addr[0] == 0 || orig->addr[0] == peer[3];
}

/* The socket's record of the given family that describes its connection
 * now: its nsr_peers entry, else its socket storage (the hash was full, or
 * an older build made it). A stale one (the socket connected again,
 * elsewhere) is dropped. Only a socket with a loopback peer can have a live
 * record (every rule redirects to loopback), so the rest of the host's
 * getpeername calls return before any helper. */
static __always_inline struct orig_dst *live_record(struct bpf_sock_addr *ctx, __u8 family, const __u32 *peer, __u32 port)
{
	struct orig_dst *orig;
	__u64 sock;

	if (!peer_is_loopback(family, peer))
		return 0;
	sock = bpf_get_socket_cookie(ctx);
	orig = bpf_map_lookup_elem(&nsr_peers, &sock);
	if (orig) {
		if (orig->family == (family | NSR_REC_CHECKED) && record_matches(orig, family, peer, port))
			return orig;
		bpf_map_delete_elem(&nsr_peers, &sock);
	}
	orig = bpf_sk_storage_get(&nsr_sockets, ctx->sk, 0, 0);
	if (!orig || (orig->family & ~NSR_REC_CHECKED) != family)
		return 0;
	if (!record_matches(orig, family, peer, port)) {
		bpf_sk_storage_delete(&nsr_sockets, ctx->sk);
		return 0;
	}
	return orig;
}

SEC("cgroup/getpeername4")
int nsr_getpeername4(struct bpf_sock_addr *ctx)
{
	__u32 peer[4] = {};
	struct orig_dst *orig;

	get_addr(ctx, 4, peer);
	orig = live_record(ctx, 4, peer, ctx->user_port);

	if (!orig)
		return SYS_PROCEED;
	ctx->user_ip4 = orig->addr[0];
	ctx->user_port = (__u32)orig->port;
	return SYS_PROCEED;
}

SEC("cgroup/getpeername6")
int nsr_getpeername6(struct bpf_sock_addr *ctx)
{
	struct orig_dst *orig;
	__u32 peer[4];

	get_addr(ctx, 6, peer);
	orig = live_record(ctx, 6, peer, ctx->user_port);
	if (!orig)
		return SYS_PROCEED;
	if (orig->family == 6) { /* an older build's record: addr as dialled */
		ctx->user_ip6[0] = orig->addr[0];
		ctx->user_ip6[1] = orig->addr[1];
	} else {
		ctx->user_ip6[0] = 0;
		ctx->user_ip6[1] = 0;
	}
	ctx->user_ip6[2] = orig->addr[2];
	ctx->user_ip6[3] = orig->addr[3];
	ctx->user_port = (__u32)orig->port;
	return SYS_PROCEED;
}

/* close() of a TCP socket (its last reference from userspace): its
 * nsr_peers entry, if any, goes; nothing can ask its peer any more. Every
 * inet socket of the host is released through here, so anything whose peer
 * is not loopback or unspecified (a failed or undone connect leaves 0)
 * returns on the fields alone. An entry is left behind only by a socket
 * released while this program was not attached, or after its netns was
 * unenrolled, or by one whose redirected connect failed and that then
 * connected to a non-loopback address: it only
 * takes room (cookies are never reused, so no socket ever reads it), and a
 * full hash sends new records to socket storage. */
SEC("cgroup/sock_release")
int nsr_sock_release(struct bpf_sock *sk)
{
	struct counter_key ck = {.index = 0};
	__u32 ip6[4];
	__u64 sock;

	if (sk->protocol != NSR_IPPROTO_TCP)
		return SYS_PROCEED;
	if (sk->family == NSR_AF_INET) {
		if (!maybe_ours4(sk->dst_ip4))
			return SYS_PROCEED;
	} else if (sk->family == NSR_AF_INET6) {
		ip6[0] = sk->dst_ip6[0];
		ip6[1] = sk->dst_ip6[1];
		ip6[2] = sk->dst_ip6[2];
		ip6[3] = sk->dst_ip6[3];
		if (!maybe_ours6_addr(ip6))
			return SYS_PROCEED;
	} else {
		return SYS_PROCEED;
	}
	/* Only a netns with rules makes records, and every enrolled netns has
	 * the counter of its first spec: a loopback socket of any other netns
	 * (most of them) pays one lookup, not a socket cookie and a delete. */
	ck.netns_cookie = bpf_get_netns_cookie(sk);
	if (!bpf_map_lookup_elem(&nsr_counters, &ck))
		return SYS_PROCEED;
	sock = bpf_get_socket_cookie(sk);
	bpf_map_delete_elem(&nsr_peers, &sock);
	return SYS_PROCEED;
}

/*
 * UDP. These programs are attached only while some netns of the host has a
 * UDP rule (internal/loader): sendmsg and recvmsg run per datagram, so a host
 * without UDP rules does not run them at all.
 *
 * A redirected UDP socket remembers, in nsr_udp_peers, what it sent to and
 * where that went; recvmsg reports a datagram from the new destination as
 * coming from the dialled one, since resolvers drop answers whose source is
 * not the server they asked. One entry per socket: the last redirected
 * destination. Connected UDP also fills nsr_sockets, for getpeername.
 */
struct udp_peer {
	__u32 orig_addr[4]; /* dialled, as recvfrom() should report it */
	__u32 new_addr[4];  /* where the datagrams went, as replies come from it */
	__u16 orig_port;
	__u16 new_port;
	__u8 family; /* 4 or 6: the hook that wrote it */
	__u8 _pad0[3];
};

struct {
	__uint(type, BPF_MAP_TYPE_SK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct udp_peer);
} nsr_udp_peers SEC(".maps");

#define NSR_LOOPBACK4 0x7f000001 /* 127.0.0.1 */

/* Replies to 0.0.0.0, :: and ::ffff:0.0.0.0 come from loopback. */
static __always_inline void reply_addr4(__u32 *a)
{
	if (*a == 0)
		*a = bpf_htonl(NSR_LOOPBACK4);
}

static __always_inline void reply_addr6(__u32 *a)
{
	if (a[0] == 0 && a[1] == 0 && a[3] == 0) {
		if (a[2] == 0)
			a[3] = bpf_htonl(1);
		else if (a[2] == bpf_htonl(0xffff))
			a[3] = bpf_htonl(NSR_LOOPBACK4);
	}
}

/* Looks a UDP destination up, counts a hit and remembers it on the socket.
 * The key's address words are the dialled ones; new holds them rewritten. */
static __always_inline const struct rule_val *udp_lookup(struct bpf_sock_addr *ctx, struct rule_key *key, __u32 *new_addr)
{
	const struct rule_val *val;
	struct udp_peer *peer;
	int words = key->family == 4 ? 1 : 4;

	key->netns_cookie = bpf_get_netns_cookie(ctx);
	val = bpf_map_lookup_elem(&nsr_rules, key);
	if (!val)
		return 0;
	for (int i = 0; i < 4; i++)
		new_addr[i] = val->keep_addr ? key->addr[i] : val->addr[i];
	peer = bpf_sk_storage_get(&nsr_udp_peers, ctx->sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
	if (peer) {
		__builtin_memcpy(peer->orig_addr, key->addr, sizeof(peer->orig_addr));
		__builtin_memcpy(peer->new_addr, new_addr, sizeof(peer->new_addr));
		if (words == 1) {
			reply_addr4(&peer->orig_addr[0]);
			reply_addr4(&peer->new_addr[0]);
		} else {
			reply_addr6(peer->orig_addr);
			reply_addr6(peer->new_addr);
		}
		peer->orig_port = key->port;
		peer->new_port = val->port;
		peer->family = key->family;
	} else {
		count_stat(NSR_STAT_UDP_PEER_STORAGE_FAIL);
	}
	count(key->netns_cookie, val->index);
	return val;
}

/* connect() of a UDP socket: like TCP's, plus the reply mapping. */
static __always_inline const struct rule_val *udp_connect(struct bpf_sock_addr *ctx, struct rule_key *key, __u32 *new_addr, int candidate)
{
	const struct rule_val *val = 0;
	struct orig_dst *orig;

	if (candidate)
		val = udp_lookup(ctx, key, new_addr);
	if (!val) {
		/* Re-connected elsewhere: no stale peer, no stale reply mapping. */
		bpf_sk_storage_delete(&nsr_sockets, ctx->sk);
		bpf_sk_storage_delete(&nsr_udp_peers, ctx->sk);
		return 0;
	}
	orig = bpf_sk_storage_get(&nsr_sockets, ctx->sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
	if (orig) {
		__builtin_memcpy(orig->addr, key->addr, sizeof(orig->addr));
		orig->port = key->port;
		orig->family = key->family;
	} else {
		count_stat(NSR_STAT_PEER_STORAGE_FAIL);
	}
	return val;
}

/* connect() of a UDP socket (connect), like TCP's plus the reply mapping,
 * or sendto()/sendmsg() with a destination on an unconnected one, once per
 * datagram; for either family. A v4-mapped destination on a dual-stack
 * socket runs sendmsg4 with the IPv4 address (udpv6_sendmsg hands it to
 * udp_sendmsg). */
static __always_inline int udp_redirect(struct bpf_sock_addr *ctx, __u8 family, int connect)
{
	struct rule_key key = {.family = family, .proto = NSR_IPPROTO_UDP};
	__u32 new_addr[4] = {};
	const struct rule_val *val = 0;

	if (ctx->protocol != NSR_IPPROTO_UDP)
		return SYS_PROCEED;
	get_addr(ctx, family, key.addr);
	key.port = (__u16)ctx->user_port;
	if (connect)
		val = udp_connect(ctx, &key, new_addr, maybe_ours(family, key.addr));
	else if (maybe_ours(family, key.addr))
		val = udp_lookup(ctx, &key, new_addr);
	if (!val)
		return SYS_PROCEED;
	set_addr(ctx, family, new_addr);
	ctx->user_port = (__u32)val->port;
	return SYS_PROCEED;
}

SEC("cgroup/connect4")
int nsr_udp_connect4(struct bpf_sock_addr *ctx)
{
	return udp_redirect(ctx, 4, 1);
}

SEC("cgroup/connect6")
int nsr_udp_connect6(struct bpf_sock_addr *ctx)
{
	return udp_redirect(ctx, 6, 1);
}

SEC("cgroup/sendmsg4")
int nsr_sendmsg4(struct bpf_sock_addr *ctx)
{
	return udp_redirect(ctx, 4, 0);
}

SEC("cgroup/sendmsg6")
int nsr_sendmsg6(struct bpf_sock_addr *ctx)
{
	return udp_redirect(ctx, 6, 0);
}

/* recvfrom()/recvmsg() asking for the source, once per datagram: a datagram
 * from where this socket's redirected datagrams went is reported as coming
 * from where the application sent them. recvmsg programs must return 1. */
SEC("cgroup/recvmsg4")
int nsr_recvmsg4(struct bpf_sock_addr *ctx)
{
	struct udp_peer *peer;

	if (!maybe_ours4(ctx->user_ip4))
		return SYS_PROCEED;
	peer = bpf_sk_storage_get(&nsr_udp_peers, ctx->sk, 0, 0);
	if (!peer || peer->family != 4 || peer->new_addr[0] != ctx->user_ip4 || peer->new_port != (__u16)ctx->user_port)
		return SYS_PROCEED;
	ctx->user_ip4 = peer->orig_addr[0];
	ctx->user_port = (__u32)peer->orig_port;
	return SYS_PROCEED;
}

SEC("cgroup/recvmsg6")
int nsr_recvmsg6(struct bpf_sock_addr *ctx)
{
	struct rule_key src = {};
	struct udp_peer *peer;

	src.addr[0] = ctx->user_ip6[0];
	src.addr[1] = ctx->user_ip6[1];
	src.addr[2] = ctx->user_ip6[2];
	src.addr[3] = ctx->user_ip6[3];
	if (!maybe_ours6(&src))
		return SYS_PROCEED;
	peer = bpf_sk_storage_get(&nsr_udp_peers, ctx->sk, 0, 0);
	if (!peer || peer->new_port != (__u16)ctx->user_port)
		return SYS_PROCEED;
	if (peer->family == 4) {
		/* Sent v4-mapped on a dual-stack socket (through sendmsg4),
		 * answered from ::ffff:a.b.c.d. */
		if (src.addr[2] != bpf_htonl(0xffff) || peer->new_addr[0] != src.addr[3])
			return SYS_PROCEED;
		ctx->user_ip6[3] = peer->orig_addr[0];
	} else {
		if (peer->new_addr[0] != src.addr[0] || peer->new_addr[1] != src.addr[1] ||
		    peer->new_addr[2] != src.addr[2] || peer->new_addr[3] != src.addr[3])
			return SYS_PROCEED;
		ctx->user_ip6[0] = peer->orig_addr[0];
		ctx->user_ip6[1] = peer->orig_addr[1];
		ctx->user_ip6[2] = peer->orig_addr[2];
		ctx->user_ip6[3] = peer->orig_addr[3];
	}
	ctx->user_port = (__u32)peer->orig_port;
	return SYS_PROCEED;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
