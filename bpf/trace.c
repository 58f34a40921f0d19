// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * `nsredirect trace`: what the kernel decided for a connect, a datagram or a
 * getpeername in an enrolled netns.
 *
 * These programs are loaded by the tracer alone and attached at the cgroup2
 * root through bpf_links it never pins, beside redirect.c's: the kernel
 * detaches them when the tracer's last file descriptor closes, however it
 * ends (SIGKILL included). Nothing of redirect.c changes while someone
 * traces, and nothing at all runs for tracing while no one does.
 *
 * They read redirect.c's maps (the tracer hands the pinned ones over) and
 * change nothing in them. Programs of one cgroup hook run in the order they
 * were attached, so a trace program may run after ours (it sees the address
 * rewritten, and the record ours left on the socket) or before it (a daemon
 * attached after the tracer started: it sees the address as dialled, and
 * the rule that will apply); each is reported as the redirect it is.
 *
 * Events go to a ring buffer the tracer owns; when it is full an event is
 * counted as dropped, never waited for.
 */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#define SYS_PROCEED 1
#define NSR_IPPROTO_TCP 6
#define NSR_IPPROTO_UDP 17
#define NSR_NET8_MASK 0xff000000
#define NSR_LOOPBACK_NET 0x7f000000
#define NSR_REC_CHECKED 0x80

/* redirect.c's map value and key types, redeclared identically: the tracer
 * hands redirect.c's pinned maps over (ebpf MapReplacements checks their
 * sizes), and internal/bpfobj's tests check these types against redirect.c's
 * field by field. */
#define NSR_MAX_RULES 65536
#define NSR_MAX_PEERS 16384

struct rule_key {
	__u64 netns_cookie;
	__u32 addr[4];
	__u16 port;
	__u8 family;
	__u8 proto;
	__u32 _pad1;
};

struct rule_val {
	__u32 addr[4];
	__u16 port;
	__u8 keep_addr;
	__u8 _pad0;
	__u32 index;
};

struct orig_dst {
	__u32 addr[4];
	__u16 port;
	__u8 family;
	__u8 _pad0;
};

struct udp_peer {
	__u32 orig_addr[4];
	__u32 new_addr[4];
	__u16 orig_port;
	__u16 new_port;
	__u8 family;
	__u8 _pad0[3];
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, NSR_MAX_RULES);
	__type(key, struct rule_key);
	__type(value, struct rule_val);
} nsr_rules SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_SK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct orig_dst);
} nsr_sockets SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, NSR_MAX_PEERS);
	__type(key, __u64);
	__type(value, struct orig_dst);
} nsr_peers SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_SK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct udp_peer);
} nsr_udp_peers SEC(".maps");

/* The tracer's own maps. */

/* The netns to trace, by cookie: the enrolled ones that pass the tracer's
 * filters, kept current by the tracer. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 8192);
	__type(key, __u64);
	__type(value, __u8);
} trace_netns SEC(".maps");

/* Events lost because the ring buffer was full, per CPU. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} trace_drops SEC(".maps");

/* The ring buffer; its size is set by the tracer. */
struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
} trace_events SEC(".maps");

/* Whether bpf_get_current_pid_tgid and bpf_get_current_comm may be called
 * from cgroup sock_addr programs on this kernel: the tracer probes and sets
 * it before loading. While 0 the verifier never reaches those calls. */
volatile const __u8 with_task = 0;

enum trace_hook {
	TRACE_CONNECT = 1,
	TRACE_SENDMSG,
	TRACE_RECVMSG,
	TRACE_GETPEERNAME,
};

enum trace_verdict {
	/* The destination was rewritten: dialled → target. */
	TRACE_REDIRECTED = 1,
	/* connect() to loopback in an enrolled netns, no rule for this
	 * address, port and protocol: left as dialled. */
	TRACE_NO_RULE,
	/* recvmsg: a reply's source reported as the address dialled (target is
	 * where it came from). */
	TRACE_SOURCE_REWRITTEN,
	/* getpeername: the peer reported as the address dialled (target is
	 * where the socket is connected). */
	TRACE_PEER_REWRITTEN,
};

struct trace_event {
	__u64 ktime_ns;
	__u64 netns_cookie;
	__u64 sock_cookie;
	__u64 pid_tgid; /* 0 when with_task is 0 */
	__u32 uid;
	__u32 dialled[4]; /* network byte order; IPv4 in [0] */
	__u32 target[4];
	__u16 dialled_port; /* network byte order */
	__u16 target_port;
	__u8 hook;
	__u8 family; /* 4 or 6 */
	__u8 proto;
	__u8 verdict;
	char comm[16]; /* zero when with_task is 0 */
	__u32 _pad0;
};

/* Keep the enums and the event in BTF for bpf2go's -type (in .rodata, which
 * with_task needs anyway: no .bss map). */
const volatile enum trace_hook unused_trace_hook = TRACE_CONNECT;
const volatile enum trace_verdict unused_trace_verdict = TRACE_REDIRECTED;
const volatile struct trace_event unused_trace_event = {.hook = TRACE_CONNECT};

static __always_inline int loopback(__u8 family, const __u32 *a)
{
	if (family == 4)
		return (a[0] & bpf_htonl(NSR_NET8_MASK)) == bpf_htonl(NSR_LOOPBACK_NET) || a[0] == 0;
	if (a[0] != 0 || a[1] != 0)
		return 0;
	if (a[2] == 0)
		return a[3] == 0 || a[3] == bpf_htonl(1);
	if (a[2] == bpf_htonl(0xffff))
		return (a[3] & bpf_htonl(NSR_NET8_MASK)) == bpf_htonl(NSR_LOOPBACK_NET) || a[3] == 0;
	return 0;
}

static __always_inline void get_addr(const struct bpf_sock_addr *ctx, __u8 family, __u32 *a)
{
	if (family == 4) {
		a[0] = ctx->user_ip4;
		return;
	}
	a[0] = ctx->user_ip6[0];
	a[1] = ctx->user_ip6[1];
	a[2] = ctx->user_ip6[2];
	a[3] = ctx->user_ip6[3];
}

static __always_inline int same(__u8 family, const __u32 *a, const __u32 *b)
{
	if (family == 4)
		return a[0] == b[0];
	return a[0] == b[0] && a[1] == b[1] && a[2] == b[2] && a[3] == b[3];
}

static __always_inline void emit(struct bpf_sock_addr *ctx, __u64 netns, __u8 hook, __u8 family, __u8 verdict,
				 const __u32 *dialled, __u16 dialled_port, const __u32 *target, __u16 target_port)
{
	struct trace_event *e;
	__u32 zero = 0;
	__u64 *drops;

	e = bpf_ringbuf_reserve(&trace_events, sizeof(*e), 0);
	if (!e) {
		drops = bpf_map_lookup_elem(&trace_drops, &zero);
		if (drops)
			*drops += 1;
		return;
	}
	e->ktime_ns = bpf_ktime_get_ns();
	e->netns_cookie = netns;
	e->sock_cookie = bpf_get_socket_cookie(ctx);
	e->uid = (__u32)bpf_get_current_uid_gid();
	if (with_task) {
		e->pid_tgid = bpf_get_current_pid_tgid();
		bpf_get_current_comm(e->comm, sizeof(e->comm));
	} else {
		e->pid_tgid = 0;
		__builtin_memset(e->comm, 0, sizeof(e->comm));
	}
	for (int i = 0; i < 4; i++) {
		e->dialled[i] = dialled[i];
		e->target[i] = target[i];
	}
	e->dialled_port = dialled_port;
	e->target_port = target_port;
	e->hook = hook;
	e->family = family;
	e->proto = (__u8)ctx->protocol;
	e->verdict = verdict;
	e->_pad0 = 0;
	/* A wakeup per event costs microseconds per connect; the tracer polls
	 * every 100 ms instead, and is woken only once the ring is a quarter
	 * full. */
	if (bpf_ringbuf_query(&trace_events, BPF_RB_AVAIL_DATA) > bpf_ringbuf_query(&trace_events, BPF_RB_RING_SIZE) / 4)
		bpf_ringbuf_submit(e, BPF_RB_FORCE_WAKEUP);
	else
		bpf_ringbuf_submit(e, BPF_RB_NO_WAKEUP);
}

/* The netns cookie of ctx when it is traced, else 0. */
static __always_inline __u64 traced(struct bpf_sock_addr *ctx)
{
	__u64 netns = bpf_get_netns_cookie(ctx);

	return bpf_map_lookup_elem(&trace_netns, &netns) ? netns : 0;
}

/* connect() (TCP or UDP) and sendmsg() with a destination. */
static __always_inline int trace_dest(struct bpf_sock_addr *ctx, __u8 family, __u8 hook)
{
	struct rule_key key = {.family = family};
	__u32 cur[4] = {}, orig[4] = {};
	const struct rule_val *val;
	__u16 port = (__u16)ctx->user_port;
	__u64 netns, sock;

	if (ctx->protocol != NSR_IPPROTO_TCP && ctx->protocol != NSR_IPPROTO_UDP)
		return SYS_PROCEED;
	netns = traced(ctx);
	if (!netns)
		return SYS_PROCEED;
	get_addr(ctx, family, cur);

	/* Before ours: the rule that applies to what is dialled. */
	key.netns_cookie = netns;
	key.proto = (__u8)ctx->protocol;
	key.port = port;
	__builtin_memcpy(key.addr, cur, sizeof(cur));
	val = bpf_map_lookup_elem(&nsr_rules, &key);
	if (val) {
		__u32 to[4];
		for (int i = 0; i < 4; i++)
			to[i] = val->keep_addr ? cur[i] : val->addr[i];
		emit(ctx, netns, hook, family, TRACE_REDIRECTED, cur, port, to, val->port);
		return SYS_PROCEED;
	}

	/* After ours: the record it left on the socket says where from. */
	if (ctx->protocol == NSR_IPPROTO_UDP) {
		struct udp_peer *peer = bpf_sk_storage_get(&nsr_udp_peers, ctx->sk, 0, 0);

		if (peer && peer->new_port == port && same(family, peer->new_addr, cur)) {
			emit(ctx, netns, hook, family, TRACE_REDIRECTED, peer->orig_addr, peer->orig_port, cur, port);
			return SYS_PROCEED;
		}
	} else {
		struct orig_dst *rec;

		sock = bpf_get_socket_cookie(ctx);
		rec = bpf_map_lookup_elem(&nsr_peers, &sock);
		if (!rec)
			rec = bpf_sk_storage_get(&nsr_sockets, ctx->sk, 0, 0);
		if (rec && (rec->family & NSR_REC_CHECKED) && (__u16)rec->addr[1] == port) {
			int hit;

			if (family == 4) {
				hit = rec->addr[2] == cur[0] || rec->addr[2] == 0;
				orig[0] = rec->addr[0];
			} else {
				hit = rec->addr[0] == cur[3] || rec->addr[0] == 0;
				orig[2] = rec->addr[2];
				orig[3] = rec->addr[3];
			}
			if (hit) {
				emit(ctx, netns, hook, family, TRACE_REDIRECTED, orig, rec->port, cur, port);
				return SYS_PROCEED;
			}
		}
	}
	/* Not for sendmsg: every datagram a server answers to a client's
	 * loopback port would be one. */
	if (hook == TRACE_CONNECT && loopback(family, cur))
		emit(ctx, netns, hook, family, TRACE_NO_RULE, cur, port, cur, port);
	return SYS_PROCEED;
}

/* recvmsg(): a datagram from where this socket's redirected datagrams went,
 * its source reported as where they were sent. Seen before ours (the source
 * as it came) or after (as reported). */
static __always_inline int trace_recvmsg(struct bpf_sock_addr *ctx, __u8 family)
{
	struct udp_peer *peer;
	__u32 cur[4] = {}, from[4] = {}, shown[4] = {};
	__u16 port = (__u16)ctx->user_port;
	__u8 pf;
	__u64 netns;

	get_addr(ctx, family, cur);
	peer = bpf_sk_storage_get(&nsr_udp_peers, ctx->sk, 0, 0);
	if (!peer)
		return SYS_PROCEED;
	pf = peer->family;
	if (family == 6 && pf == 4) {
		/* v4-mapped on a dual-stack socket */
		if (cur[0] != 0 || cur[1] != 0 || cur[2] != bpf_htonl(0xffff))
			return SYS_PROCEED;
		from[2] = shown[2] = bpf_htonl(0xffff);
		from[3] = peer->new_addr[0];
		shown[3] = peer->orig_addr[0];
	} else if (family == pf) {
		for (int i = 0; i < 4; i++) {
			from[i] = peer->new_addr[i];
			shown[i] = peer->orig_addr[i];
		}
	} else {
		return SYS_PROCEED;
	}
	if (!(port == peer->new_port && same(family, cur, from)) && !(port == peer->orig_port && same(family, cur, shown)))
		return SYS_PROCEED;
	netns = traced(ctx);
	if (netns)
		emit(ctx, netns, TRACE_RECVMSG, family, TRACE_SOURCE_REWRITTEN, shown, peer->orig_port, from, peer->new_port);
	return SYS_PROCEED;
}

/* getpeername() of a redirected socket: the peer reported as dialled. */
static __always_inline int trace_getpeername(struct bpf_sock_addr *ctx, __u8 family)
{
	struct orig_dst *rec;
	__u32 cur[4] = {}, dialled[4] = {}, to[4] = {};
	__u16 port = (__u16)ctx->user_port, to_port;
	__u64 netns, sock;

	get_addr(ctx, family, cur);
	if (!loopback(family, cur))
		return SYS_PROCEED;
	sock = bpf_get_socket_cookie(ctx);
	rec = bpf_map_lookup_elem(&nsr_peers, &sock);
	if (!rec)
		rec = bpf_sk_storage_get(&nsr_sockets, ctx->sk, 0, 0);
	if (!rec || !(rec->family & NSR_REC_CHECKED) || (rec->family & 0x7f) != family)
		return SYS_PROCEED;
	to_port = (__u16)rec->addr[1];
	if (family == 4) {
		dialled[0] = rec->addr[0];
		to[0] = rec->addr[2];
	} else {
		dialled[2] = rec->addr[2];
		dialled[3] = rec->addr[3];
		to[3] = rec->addr[0];
		to[2] = rec->addr[2];
	}
	/* After ours the peer shows as dialled; before, as connected. */
	if (!(port == rec->port && same(family, cur, dialled)) && !(port == to_port && cur[family == 4 ? 0 : 3] == to[family == 4 ? 0 : 3]))
		return SYS_PROCEED;
	netns = traced(ctx);
	if (netns)
		emit(ctx, netns, TRACE_GETPEERNAME, family, TRACE_PEER_REWRITTEN, dialled, rec->port, to, to_port);
	return SYS_PROCEED;
}

SEC("cgroup/connect4")
int trace_connect4(struct bpf_sock_addr *ctx)
{
	return trace_dest(ctx, 4, TRACE_CONNECT);
}

SEC("cgroup/connect6")
int trace_connect6(struct bpf_sock_addr *ctx)
{
	return trace_dest(ctx, 6, TRACE_CONNECT);
}

SEC("cgroup/sendmsg4")
int trace_sendmsg4(struct bpf_sock_addr *ctx)
{
	return trace_dest(ctx, 4, TRACE_SENDMSG);
}

SEC("cgroup/sendmsg6")
int trace_sendmsg6(struct bpf_sock_addr *ctx)
{
	return trace_dest(ctx, 6, TRACE_SENDMSG);
}

SEC("cgroup/recvmsg4")
int trace_recvmsg4(struct bpf_sock_addr *ctx)
{
	return trace_recvmsg(ctx, 4);
}

SEC("cgroup/recvmsg6")
int trace_recvmsg6(struct bpf_sock_addr *ctx)
{
	return trace_recvmsg(ctx, 6);
}

SEC("cgroup/getpeername4")
int trace_getpeer4(struct bpf_sock_addr *ctx)
{
	return trace_getpeername(ctx, 4);
}

SEC("cgroup/getpeername6")
int trace_getpeer6(struct bpf_sock_addr *ctx)
{
	return trace_getpeername(ctx, 6);
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
