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
 * The original destination is kept in per-socket storage so getpeername()
 * reports what the application dialled; a socket that was not redirected has
 * no storage, and one whose record no longer matches its peer (it connected
 * again, elsewhere), is reported as the kernel sees it.
 */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

/* Rule entries and per-spec counters. A spec expands to at most 6 entries
 * and a netns has at most 16 specs; the enrollment store (userspace only,
 * see internal/loader) holds 8,192 netns, so every enrolled netns fits with
 * 8 entries on average and a counter never runs out before its rule. */
#define NSR_MAX_RULES 65536

#define SYS_PROCEED 1
#define NSR_IPPROTO_TCP 6 /* linux/in.h, without its libc dependencies */

/* Indexes of nsr_stats, the per-CPU event counters. */
enum nsr_stat {
	NSR_STAT_PEER_STORAGE_FAIL = 0, /* redirected, but the dialled address not kept */
	NSR_STAT_MAX,
};

/* One expanded rule: (netns, family, address, port) as dialled. Addresses
 * and ports are in network byte order; IPv4 lives in addr[0]. */
struct rule_key {
	__u64 netns_cookie;
	__u32 addr[4];
	__u16 port;
	__u8 family; /* 4 or 6 */
	__u8 _pad0;
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

static __always_inline int maybe_ours6(const struct rule_key *key)
{
	if (key->addr[0] != 0 || key->addr[1] != 0)
		return 0;
	if (key->addr[2] == 0) /* :: and ::1 */
		return key->addr[3] == 0 || key->addr[3] == bpf_htonl(1);
	if (key->addr[2] == bpf_htonl(0xffff)) /* ::ffff:a.b.c.d */
		return maybe_ours4(key->addr[3]);
	return 0;
}

/* Look the dialled destination up; on a hit remember it on the socket and
 * return the rule. A miss calls no helper beyond the lookup: a record the
 * socket may keep from an earlier connect is stale, and the getpeername
 * programs see that from the peer (record_matches*), so there is nothing to
 * delete on the path every loopback connect of the host takes. */
static __always_inline const struct rule_val *lookup(struct bpf_sock_addr *ctx, struct rule_key *key)
{
	const struct rule_val *val;
	struct orig_dst *orig;

	key->netns_cookie = bpf_get_netns_cookie(ctx);
	val = bpf_map_lookup_elem(&nsr_rules, key);
	if (!val)
		return 0;

	orig = bpf_sk_storage_get(&nsr_sockets, ctx->sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
	if (orig) {
		orig->port = key->port;
		orig->family = key->family | NSR_REC_CHECKED;
		orig->addr[1] = (__u32)val->port;
		if (key->family == 4) {
			orig->addr[0] = key->addr[0];
			orig->addr[2] = val->keep_addr ? key->addr[0] : val->addr[0];
			orig->addr[3] = 0;
		} else {
			orig->addr[0] = val->keep_addr ? key->addr[3] : val->addr[3];
			orig->addr[2] = key->addr[2];
			orig->addr[3] = key->addr[3];
		}
	} else {
		/* Out of memory for socket storage: the connect is still
		 * redirected, but getpeername will show the new port. */
		count_stat(NSR_STAT_PEER_STORAGE_FAIL);
	}
	count(key->netns_cookie, val->index);
	return val;
}

SEC("cgroup/connect4")
int nsr_connect4(struct bpf_sock_addr *ctx)
{
	struct rule_key key = {.family = 4};
	const struct rule_val *val;

	if (ctx->protocol != NSR_IPPROTO_TCP)
		return SYS_PROCEED;
	key.addr[0] = ctx->user_ip4;
	if (!maybe_ours4(key.addr[0]))
		return SYS_PROCEED;
	key.port = (__u16)ctx->user_port;
	val = lookup(ctx, &key);
	if (!val)
		return SYS_PROCEED;

	if (!val->keep_addr)
		ctx->user_ip4 = val->addr[0];
	ctx->user_port = (__u32)val->port;
	return SYS_PROCEED;
}

SEC("cgroup/connect6")
int nsr_connect6(struct bpf_sock_addr *ctx)
{
	struct rule_key key = {.family = 6};
	const struct rule_val *val;

	/* Covers ::1 and v4-mapped ::ffff:127.0.0.1 on dual-stack sockets: a
	 * v4-mapped connect() runs this hook only, never connect4. */
	if (ctx->protocol != NSR_IPPROTO_TCP)
		return SYS_PROCEED;
	key.addr[0] = ctx->user_ip6[0];
	key.addr[1] = ctx->user_ip6[1];
	key.addr[2] = ctx->user_ip6[2];
	key.addr[3] = ctx->user_ip6[3];
	if (!maybe_ours6(&key))
		return SYS_PROCEED;
	key.port = (__u16)ctx->user_port;
	val = lookup(ctx, &key);
	if (!val)
		return SYS_PROCEED;

	if (!val->keep_addr) {
		ctx->user_ip6[0] = val->addr[0];
		ctx->user_ip6[1] = val->addr[1];
		ctx->user_ip6[2] = val->addr[2];
		ctx->user_ip6[3] = val->addr[3];
	}
	ctx->user_port = (__u32)val->port;
	return SYS_PROCEED;
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

/* Whether the socket's record describes the connection it has now: its peer
 * is where the recorded redirect went. */
static __always_inline int record_matches4(const struct orig_dst *orig, __u32 ip4, __u32 port)
{
	if (!peer_is_loopback4(ip4))
		return 0;
	if (orig->family == 4) /* an older build's record */
		return 1;
	return (__u16)orig->addr[1] == (__u16)port && (orig->addr[2] == 0 || orig->addr[2] == ip4);
}

static __always_inline int record_matches6(const struct orig_dst *orig, const __u32 *ip6, __u32 port)
{
	if (!peer_is_loopback6(ip6))
		return 0;
	if (orig->family == 6) /* an older build's record */
		return 1;
	return (__u16)orig->addr[1] == (__u16)port && (orig->addr[0] == 0 || orig->addr[0] == ip6[3]);
}

SEC("cgroup/getpeername4")
int nsr_getpeername4(struct bpf_sock_addr *ctx)
{
	struct orig_dst *orig = bpf_sk_storage_get(&nsr_sockets, ctx->sk, 0, 0);

	if (!orig || (orig->family & ~NSR_REC_CHECKED) != 4)
		return SYS_PROCEED;
	if (!record_matches4(orig, ctx->user_ip4, ctx->user_port)) {
		/* Stale: the socket connected again, elsewhere. */
		bpf_sk_storage_delete(&nsr_sockets, ctx->sk);
		return SYS_PROCEED;
	}
	ctx->user_ip4 = orig->addr[0];
	ctx->user_port = (__u32)orig->port;
	return SYS_PROCEED;
}

SEC("cgroup/getpeername6")
int nsr_getpeername6(struct bpf_sock_addr *ctx)
{
	struct orig_dst *orig = bpf_sk_storage_get(&nsr_sockets, ctx->sk, 0, 0);
	__u32 peer[4];

	if (!orig || (orig->family & ~NSR_REC_CHECKED) != 6)
		return SYS_PROCEED;
	peer[0] = ctx->user_ip6[0];
	peer[1] = ctx->user_ip6[1];
	peer[2] = ctx->user_ip6[2];
	peer[3] = ctx->user_ip6[3];
	if (!record_matches6(orig, peer, ctx->user_port)) {
		bpf_sk_storage_delete(&nsr_sockets, ctx->sk);
		return SYS_PROCEED;
	}
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

char LICENSE[] SEC("license") = "Dual BSD/GPL";
