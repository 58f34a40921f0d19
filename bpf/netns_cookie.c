// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * nsredirect: learn a network namespace's cookie on kernels without
 * getsockopt(SO_NETNS_COOKIE) (Linux < 5.14).
 *
 * The rules are keyed by bpf_get_netns_cookie(), which sock_addr programs
 * have since 5.7, but userspace could only read that cookie from 5.14 on. So
 * userspace asks the kernel through this program: from a thread inside the
 * target netns it opens a UDP socket, files its socket cookie (SO_COOKIE) in
 * nsr_netns_probe and connect()s it to 127.0.0.1:9. This program, seeing its
 * own socket, writes the netns cookie into the entry and refuses the connect,
 * so the probe socket is never bound or routed.
 *
 * It is a separate object from redirect.c so the redirect programs stay as
 * they are. Userspace attaches it once for the daemon's life (an attach at
 * the root takes cgroup_mutex and recomputes every cgroup's programs).
 */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#define SYS_REJECT 0
#define SYS_PROCEED 1
#define NSR_IPPROTO_UDP 17 /* linux/in.h, without its libc dependencies */

/* The probe destination: loopback, the discard port. Other sockets that
 * connect there pay one hash miss and proceed unchanged. */
#define NSR_PROBE_ADDR 0x7f000001 /* 127.0.0.1 */
#define NSR_PROBE_PORT 9

/* Socket cookie of a probe socket -> netns cookie, filled in here. Userspace
 * inserts 0 and deletes the entry after reading it. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 64);
	__type(key, __u64);
	__type(value, __u64);
} nsr_netns_probe SEC(".maps");

SEC("cgroup/connect4")
int nsr_netns_cookie(struct bpf_sock_addr *ctx)
{
	__u64 sock_cookie;
	__u64 *netns_cookie;

	if (ctx->protocol != NSR_IPPROTO_UDP || ctx->user_ip4 != bpf_htonl(NSR_PROBE_ADDR) ||
	    ctx->user_port != bpf_htons(NSR_PROBE_PORT))
		return SYS_PROCEED;

	sock_cookie = bpf_get_socket_cookie(ctx);
	netns_cookie = bpf_map_lookup_elem(&nsr_netns_probe, &sock_cookie);
	if (!netns_cookie)
		return SYS_PROCEED;
	*netns_cookie = bpf_get_netns_cookie(ctx);
	return SYS_REJECT; /* connect() fails with EPERM: the answer is in the map */
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
