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
 * no storage and is reported as the kernel sees it.
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
 * return the rule. On a miss forget any earlier redirect of this socket, so a
 * re-connected socket never reports a stale peer: a socket that was
 * redirected once may connect again elsewhere, so the delete stays even on
 * the fast path (it is one pointer test when the socket holds no storage).
 * UDP and other protocols never get storage, so they skip it. */
static __always_inline const struct rule_val *lookup(struct bpf_sock_addr *ctx, struct rule_key *key, int candidate)
{
	const struct rule_val *val;
	struct orig_dst *orig;

	if (!candidate) {
		bpf_sk_storage_delete(&nsr_sockets, ctx->sk);
		return 0;
	}
	key->netns_cookie = bpf_get_netns_cookie(ctx);
	val = bpf_map_lookup_elem(&nsr_rules, key);
	if (!val) {
		bpf_sk_storage_delete(&nsr_sockets, ctx->sk);
		return 0;
	}

	orig = bpf_sk_storage_get(&nsr_sockets, ctx->sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
	if (orig) {
		__builtin_memcpy(orig->addr, key->addr, sizeof(orig->addr));
		orig->port = key->port;
		orig->family = key->family;
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
	key.port = (__u16)ctx->user_port;
	val = lookup(ctx, &key, maybe_ours4(key.addr[0]));
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
	key.port = (__u16)ctx->user_port;
	val = lookup(ctx, &key, maybe_ours6(&key));
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

SEC("cgroup/getpeername4")
int nsr_getpeername4(struct bpf_sock_addr *ctx)
{
	struct orig_dst *orig = bpf_sk_storage_get(&nsr_sockets, ctx->sk, 0, 0);

	if (!orig || orig->family != 4)
		return SYS_PROCEED;
	ctx->user_ip4 = orig->addr[0];
	ctx->user_port = (__u32)orig->port;
	return SYS_PROCEED;
}

SEC("cgroup/getpeername6")
int nsr_getpeername6(struct bpf_sock_addr *ctx)
{
	struct orig_dst *orig = bpf_sk_storage_get(&nsr_sockets, ctx->sk, 0, 0);

	if (!orig || orig->family != 6)
		return SYS_PROCEED;
	ctx->user_ip6[0] = orig->addr[0];
	ctx->user_ip6[1] = orig->addr[1];
	ctx->user_ip6[2] = orig->addr[2];
	ctx->user_ip6[3] = orig->addr[3];
	ctx->user_port = (__u32)orig->port;
	return SYS_PROCEED;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
