// Package entry is the one form a redirect takes between the spec grammar
// and the kernel: internal/rule expands a spec into entries, internal/loader
// writes them into the rule map as they are. Plain values: no grammar, no
// kernel.
package entry

import "net/netip"

// Proto is the transport protocol of an entry; the zero value is TCP.
type Proto uint8

const (
	TCP Proto = iota
	UDP
)

func (p Proto) String() string {
	if p == UDP {
		return "udp"
	}
	return "tcp"
}

// Dest is one concrete destination an entry matches, as the kernel sees it
// in connect() or sendmsg(): a v4 address on AF_INET sockets, a v6
// (possibly v4-mapped) address on AF_INET6 sockets.
type Dest struct {
	Addr  netip.Addr
	Port  uint16
	Proto Proto
}

// Entry is one kernel entry: match Match, send to To (zero address: keep
// the dialled one) on ToPort.
type Entry struct {
	Match  Dest
	To     netip.Addr
	ToPort uint16
}

// Rule is what one spec became: its entries, and a label (the spec,
// formatted) that is only ever displayed (status's RULE column, metrics).
type Rule struct {
	Label   string
	Entries []Entry
}

// HasUDP reports whether some entry of rules is UDP.
func HasUDP(rules []Rule) bool {
	for _, r := range rules {
		for _, e := range r.Entries {
			if e.Match.Proto == UDP {
				return true
			}
		}
	}
	return false
}
