// Package bpfobj holds the compiled eBPF objects and their Go bindings,
// generated from bpf/*.c by bpf2go. The generated files are committed so that
// building nsredirect needs no clang; `make generate` reproduces them byte for
// byte on any machine: the compiler is pinned here (Debian 12's clang 14, the
// only place that names it) and every header the C includes is vendored in
// bpf/include (-nostdinc: nothing of the host's /usr/include is used).
package bpfobj

//go:generate go tool bpf2go -cc clang-14 -strip llvm-strip-14 -cflags "-O2 -g -Wall -Werror -nostdinc -I../../bpf/include" -target bpfel -type rule_key -type rule_val -type counter_key -type orig_dst -type udp_peer -type nsr_stat Redirect ../../bpf/redirect.c
//go:generate go tool bpf2go -cc clang-14 -strip llvm-strip-14 -cflags "-O2 -g -Wall -Werror -nostdinc -I../../bpf/include" -target bpfel NetnsCookie ../../bpf/netns_cookie.c
//go:generate go tool bpf2go -cc clang-14 -strip llvm-strip-14 -cflags "-O2 -g -Wall -Werror -nostdinc -I../../bpf/include" -target bpfel -type rule_key -type rule_val -type orig_dst -type udp_peer Trace ../../bpf/trace.c
