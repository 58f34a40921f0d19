// Package bpfobj holds the compiled eBPF object and its Go bindings, generated
// from bpf/redirect.c by bpf2go. The generated files are committed so that
// building nsredirect needs no clang; `make generate` reproduces them.
package bpfobj

//go:generate go tool bpf2go -cc clang -cflags "-O2 -g -Wall -Werror -I/usr/include/x86_64-linux-gnu" -target bpfel -type rule_key -type rule_val -type counter_key -type orig_dst -type enrollment Redirect ../../bpf/redirect.c
//go:generate go tool bpf2go -cc clang -cflags "-O2 -g -Wall -Werror -I/usr/include/x86_64-linux-gnu" -target bpfel NetnsCookie ../../bpf/netns_cookie.c
