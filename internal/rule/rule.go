// Package rule parses and validates redirect specs:
//
//	[FROM_ADDR:]FROM_PORT=[TO_ADDR:]TO_PORT[/tcp|/udp]
//
// A spec is TCP unless it ends in /udp (Docker's port syntax); /tcp may be
// written and is dropped when a rule is printed back.
// IPv6 addresses go in brackets ("[::1]:80=3210"). With FROM_ADDR omitted a
// rule covers 127.0.0.1, ::1 and the v4-mapped ::ffff:127.0.0.1, and the
// unspecified 0.0.0.0, :: and ::ffff:0.0.0.0 that Linux delivers to loopback;
// with TO_ADDR omitted the dialled address is kept and only the port changes.
// Both sides must be loopback: nsredirect only ever redirects loopback to
// loopback, so a rule cannot steer traffic that would have left the namespace.
package rule

import (
	"errors"
	"fmt"
	"net/netip"
	"strconv"
	"strings"

	"github.com/nsredirect/nsredirect/internal/entry"
)

// MaxPerTarget bounds the rules of one network namespace; the pinned
// enrollment record stores their specs as text.
const MaxPerTarget = 16

// ErrSpec marks every parse and validation error, so callers can map it to a
// usage error.
var ErrSpec = errors.New("invalid redirect spec")

// Proto is the transport protocol of a rule; the zero value is TCP.
type Proto = entry.Proto

const (
	TCP = entry.TCP
	UDP = entry.UDP
)

// Rule is one parsed spec. A zero From/To address means "omitted".
type Rule struct {
	From     netip.Addr
	FromPort uint16
	To       netip.Addr
	ToPort   uint16
	Proto    Proto
}

// Dest is one concrete destination a rule matches (entry.Dest).
type Dest = entry.Dest

// Expansion is one kernel entry of a rule (entry.Entry).
type Expansion = entry.Entry

var (
	loopback4       = netip.MustParseAddr("127.0.0.1")
	loopback6       = netip.IPv6Loopback()
	loopback4Mapped = netip.AddrFrom16(loopback4.As16())
	// connect() to an unspecified address reaches loopback: tcp_v4_connect
	// routes 0.0.0.0 to 127.0.0.1, tcp_v6_connect turns :: into ::1 (or
	// ::ffff:127.0.0.1 on a v4-bound socket).
	any4       = netip.IPv4Unspecified()
	any6       = netip.IPv6Unspecified()
	any4Mapped = netip.AddrFrom16(any4.As16())
)

// Parse parses one spec.
func Parse(s string) (Rule, error) {
	orig := s
	s = strings.TrimSpace(s)
	from, to, ok := strings.Cut(s, "=")
	if !ok || strings.Contains(to, "=") {
		return Rule{}, specErr(orig, "want [FROM_ADDR:]FROM_PORT=[TO_ADDR:]TO_PORT[/udp], e.g. 80=3210 or 53=5353/udp")
	}
	var r Rule
	var err error
	if strings.Contains(from, "/") {
		return Rule{}, specErr(orig, "the protocol goes at the end of the spec, e.g. 53=5353/udp")
	}
	if i := strings.LastIndex(to, "/"); i >= 0 {
		switch suffix := to[i+1:]; suffix {
		case "tcp":
			r.Proto = TCP
		case "udp":
			r.Proto = UDP
		default:
			return Rule{}, specErr(orig, fmt.Sprintf("protocol %q: want /tcp (the default) or /udp, e.g. 53=5353/udp", suffix))
		}
		to = to[:i]
	}
	if r.From, r.FromPort, err = parseEnd(from); err != nil {
		return Rule{}, specErr(orig, "from side: "+err.Error())
	}
	if r.To, r.ToPort, err = parseEnd(to); err != nil {
		return Rule{}, specErr(orig, "to side: "+err.Error())
	}
	if r.To.IsValid() && r.From.IsValid() && r.From.Unmap().Is4() != r.To.Unmap().Is4() {
		return Rule{}, specErr(orig, "cannot redirect between IPv4 and IPv6; use addresses of one family")
	}
	if r.To.IsValid() && !r.From.IsValid() && !r.To.Unmap().Is4() {
		// 127.0.0.1 cannot be sent to an IPv6 address on an AF_INET socket.
		return Rule{}, specErr(orig, "an IPv6 TO_ADDR needs an IPv6 FROM_ADDR, e.g. [::1]:80=[::1]:3210")
	}
	for _, e := range r.Expand() {
		if e.ToPort == e.Match.Port && (!e.To.IsValid() || e.To == e.Match.Addr) {
			return Rule{}, specErr(orig, fmt.Sprintf("redirects %s to itself; pick another TO_PORT or TO_ADDR", dest(e.Match)))
		}
	}
	return r, nil
}

// ParseList parses comma-separated specs (a label, an annotation or an
// environment variable) and checks them as one set.
func ParseList(s string) ([]Rule, error) {
	var specs []string
	for _, f := range strings.Split(s, ",") {
		if f = strings.TrimSpace(f); f != "" {
			specs = append(specs, f)
		}
	}
	if len(specs) == 0 {
		return nil, fmt.Errorf("%w %q: no spec given; want e.g. 80=3210", ErrSpec, s)
	}
	return ParseAll(specs)
}

// FormatList formats rules back into comma-separated specs;
// ParseList(FormatList(rs)) == rs.
func FormatList(rs []Rule) string {
	s := make([]string, len(rs))
	for i, r := range rs {
		s[i] = r.String()
	}
	return strings.Join(s, ",")
}

// ParseAll parses specs and checks that no two of them match the same
// destination.
func ParseAll(specs []string) ([]Rule, error) {
	if len(specs) > MaxPerTarget {
		return nil, fmt.Errorf("%w: %d specs for one netns; at most %d are allowed", ErrSpec, len(specs), MaxPerTarget)
	}
	rules := make([]Rule, 0, len(specs))
	seen := map[Dest]string{}
	for _, s := range specs {
		r, err := Parse(s)
		if err != nil {
			return nil, err
		}
		for _, e := range r.Expand() {
			if prev, dup := seen[e.Match]; dup {
				return nil, fmt.Errorf("%w %q: %s is already redirected by %q; keep one of them", ErrSpec, s, dest(e.Match), prev)
			}
			seen[e.Match] = s
		}
		rules = append(rules, r)
	}
	return rules, nil
}

// Expand lists the kernel entries of a rule. A v4 FROM address also matches
// its v4-mapped form on dual-stack AF_INET6 sockets; an omitted one matches
// loopback and the unspecified addresses (six entries, four with a v4
// TO_ADDR).
func (r Rule) Expand() []Expansion {
	to := r.To
	var out []Expansion
	add := func(match netip.Addr, to netip.Addr) {
		out = append(out, Expansion{Match: Dest{Addr: match, Port: r.FromPort, Proto: r.Proto}, To: to, ToPort: r.ToPort})
	}
	mapped := func(a netip.Addr) netip.Addr {
		if !a.IsValid() {
			return a
		}
		return netip.AddrFrom16(a.As16())
	}
	switch {
	case !r.From.IsValid():
		v4 := to.Unmap()
		add(loopback4, v4)
		add(loopback4Mapped, mapped(v4))
		if !to.IsValid() {
			// A v4 TO_ADDR cannot be reached from a v6-only ::1 dial.
			add(loopback6, netip.Addr{})
		}
		add(any4, v4)
		add(any4Mapped, mapped(v4))
		if !to.IsValid() {
			add(any6, netip.Addr{})
		}
	case r.From.Unmap().Is4():
		v4 := to.Unmap()
		add(r.From.Unmap(), v4)
		add(mapped(r.From.Unmap()), mapped(v4))
	default:
		add(r.From, to)
	}
	return out
}

// Entry is the rule as the loader takes it: its kernel entries, labelled
// with the spec.
func (r Rule) Entry() entry.Rule { return entry.Rule{Label: r.String(), Entries: r.Expand()} }

// Entries is Entry of each of rs.
func Entries(rs []Rule) []entry.Rule {
	out := make([]entry.Rule, len(rs))
	for i, r := range rs {
		out[i] = r.Entry()
	}
	return out
}

// String formats a rule back into spec syntax; Parse(r.String()) == r. A
// TCP rule has no suffix, so specs stored by older versions read the same.
func (r Rule) String() string {
	s := end(r.From, r.FromPort) + "=" + end(r.To, r.ToPort)
	if r.Proto == UDP {
		s += "/udp"
	}
	return s
}

// HasUDP reports whether some rule of rules is UDP.
func HasUDP(rules []Rule) bool {
	for _, r := range rules {
		if r.Proto == UDP {
			return true
		}
	}
	return false
}

func end(a netip.Addr, port uint16) string {
	p := strconv.Itoa(int(port))
	switch {
	case !a.IsValid():
		return p
	case a.Is4():
		return a.String() + ":" + p
	default:
		return "[" + a.String() + "]:" + p
	}
}

func dest(d Dest) string {
	if d.Proto == UDP {
		return end(d.Addr, d.Port) + "/udp"
	}
	return end(d.Addr, d.Port)
}

func parseEnd(s string) (netip.Addr, uint16, error) {
	if s == "" {
		return netip.Addr{}, 0, errors.New("empty; want PORT or ADDR:PORT")
	}
	var addrText, portText string
	switch {
	case strings.HasPrefix(s, "["):
		i := strings.Index(s, "]")
		if i < 0 || i+1 >= len(s) || s[i+1] != ':' {
			return netip.Addr{}, 0, fmt.Errorf("%q: an IPv6 address needs the form [ADDR]:PORT", s)
		}
		addrText, portText = s[1:i], s[i+2:]
	case strings.Count(s, ":") == 1:
		addrText, portText, _ = strings.Cut(s, ":")
	case strings.Contains(s, ":"):
		return netip.Addr{}, 0, fmt.Errorf("%q: put IPv6 addresses in brackets, e.g. [::1]:80", s)
	default:
		portText = s
	}
	port, err := parsePort(portText)
	if err != nil {
		return netip.Addr{}, 0, err
	}
	if addrText == "" && strings.ContainsAny(s, ":[") {
		return netip.Addr{}, 0, fmt.Errorf("%q: empty address; omit the colon to mean loopback", s)
	}
	if addrText == "" {
		return netip.Addr{}, port, nil
	}
	addr, err := netip.ParseAddr(addrText)
	if err != nil || addr.Zone() != "" {
		return netip.Addr{}, 0, fmt.Errorf("%q is not an IP address", addrText)
	}
	if strings.HasPrefix(s, "[") && addr.Is4() {
		return netip.Addr{}, 0, fmt.Errorf("%q: write IPv4 addresses without brackets", s)
	}
	if !addr.Unmap().IsLoopback() {
		return netip.Addr{}, 0, fmt.Errorf("%s is not a loopback address; nsredirect only redirects 127.0.0.0/8 and ::1", addr)
	}
	if addr.Is4In6() {
		// ::ffff:127.0.0.1 is matched through its IPv4 form.
		addr = addr.Unmap()
	}
	return addr, port, nil
}

func parsePort(s string) (uint16, error) {
	if s == "" {
		return 0, errors.New("missing port")
	}
	for _, c := range s {
		if c < '0' || c > '9' {
			return 0, fmt.Errorf("port %q is not a number from 1 to 65535", s)
		}
	}
	n, err := strconv.ParseUint(s, 10, 16)
	if err != nil || n == 0 {
		return 0, fmt.Errorf("port %q is not a number from 1 to 65535", s)
	}
	return uint16(n), nil
}

func specErr(spec, why string) error {
	return fmt.Errorf("%w %q: %s", ErrSpec, spec, why)
}
