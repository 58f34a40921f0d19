package rule

import (
	"errors"
	"net/netip"
	"slices"
	"strings"
	"testing"
)

var a = netip.MustParseAddr

func TestParse(t *testing.T) {
	for _, tc := range []struct {
		spec string
		want Rule
	}{
		{"80=3210", Rule{FromPort: 80, ToPort: 3210}},
		{" 80=3210 ", Rule{FromPort: 80, ToPort: 3210}},
		{"127.0.0.1:80=3210", Rule{From: a("127.0.0.1"), FromPort: 80, ToPort: 3210}},
		{"127.0.0.2:80=127.0.0.1:3210", Rule{From: a("127.0.0.2"), FromPort: 80, To: a("127.0.0.1"), ToPort: 3210}},
		{"[::1]:80=3210", Rule{From: a("::1"), FromPort: 80, ToPort: 3210}},
		{"[::1]:80=[::1]:3210", Rule{From: a("::1"), FromPort: 80, To: a("::1"), ToPort: 3210}},
		{"[::ffff:127.0.0.1]:80=3210", Rule{From: a("127.0.0.1"), FromPort: 80, ToPort: 3210}},
		{"80=127.0.0.1:3210", Rule{FromPort: 80, To: a("127.0.0.1"), ToPort: 3210}},
		{"1=65535", Rule{FromPort: 1, ToPort: 65535}},
		{"127.0.0.1:80=127.0.0.1:81", Rule{From: a("127.0.0.1"), FromPort: 80, To: a("127.0.0.1"), ToPort: 81}},
		{"80=3210/tcp", Rule{FromPort: 80, ToPort: 3210}},
		{"53=5353/udp", Rule{FromPort: 53, ToPort: 5353, Proto: UDP}},
		{" 53=5353/udp ", Rule{FromPort: 53, ToPort: 5353, Proto: UDP}},
		{"[::1]:53=[::1]:5353/udp", Rule{From: a("::1"), FromPort: 53, To: a("::1"), ToPort: 5353, Proto: UDP}},
		{"127.0.0.1:53=127.0.0.2:53/udp", Rule{From: a("127.0.0.1"), FromPort: 53, To: a("127.0.0.2"), ToPort: 53, Proto: UDP}},
	} {
		got, err := Parse(tc.spec)
		if err != nil {
			t.Errorf("Parse(%q): %v", tc.spec, err)
			continue
		}
		if got != tc.want {
			t.Errorf("Parse(%q) = %+v, want %+v", tc.spec, got, tc.want)
		}
	}
}

func TestParseRejects(t *testing.T) {
	for _, tc := range []struct{ spec, mention string }{
		{"", "want [FROM_ADDR:]FROM_PORT"},
		{"80", "want [FROM_ADDR:]FROM_PORT"},
		{"80=3210=1", "want [FROM_ADDR:]FROM_PORT"},
		{"=3210", "from side"},
		{"80=", "to side"},
		{"0=3210", `"0"`},
		{"80=65536", `"65536"`},
		{"-1=80", `"-1"`},
		{"+80=3210", `"+80"`},
		{"80=32x0", `"32x0"`},
		{"http=3210", `"http"`},
		{"80=80", "to itself"},
		{"80=127.0.0.1:80", "127.0.0.1:80 to itself"},
		{"127.0.0.1:80=80", "127.0.0.1:80 to itself"},
		{"127.0.0.1:80=127.0.0.1:80", "to itself"},
		{"127.0.0.5:80=80", "127.0.0.5:80 to itself"},
		{"[::1]:80=[::1]:80", "[::1]:80 to itself"},
		{"[::1]:80=80", "[::1]:80 to itself"},
		{"[::ffff:127.0.0.1]:80=127.0.0.1:80", "to itself"},
		{"::1:80=3210", "brackets"},
		{"[::1]80=3210", "[ADDR]:PORT"},
		{"[127.0.0.1]:80=3210", "without brackets"},
		{"10.0.0.1:80=3210", "not a loopback"},
		{"80=192.168.1.1:3210", "not a loopback"},
		{"[fe80::1%eth0]:80=3210", "not an IP"},
		{"localhost:80=3210", "not an IP"},
		{"127.0.0.1:80=[::1]:3210", "IPv4 and IPv6"},
		{"[::1]:80=127.0.0.1:3210", "IPv4 and IPv6"},
		{"80=[::1]:3210", "IPv6 TO_ADDR"},
		{":80=3210", "empty address"},
		{"53=5353/sctp", `protocol "sctp"`},
		{"53=5353/UDP", `protocol "UDP"`},
		{"53=5353/", `protocol ""`},
		{"53=5353/udp/udp", "5353/udp"},
		{"53/udp=5353", "at the end"},
		{"53=53/udp", "53/udp to itself"},
		{"53=10.0.0.1:53/udp", "not a loopback"},
		{"53=[::1]:5353/udp", "IPv6 TO_ADDR"},
	} {
		_, err := Parse(tc.spec)
		if err == nil {
			t.Errorf("Parse(%q) accepted a bad spec", tc.spec)
			continue
		}
		if !errors.Is(err, ErrSpec) {
			t.Errorf("Parse(%q) error %v does not wrap ErrSpec", tc.spec, err)
		}
		if msg := err.Error(); !strings.Contains(msg, tc.mention) || !strings.Contains(msg, tc.spec) || strings.Contains(msg, "\n") {
			t.Errorf("Parse(%q) error %q: want one line naming the spec and %q", tc.spec, msg, tc.mention)
		}
	}
}

func TestExpand(t *testing.T) {
	d := func(s string, p uint16) Dest { return Dest{Addr: a(s), Port: p, Proto: TCP} }
	u := func(s string, p uint16) Dest { return Dest{Addr: a(s), Port: p, Proto: UDP} }
	for _, tc := range []struct {
		spec string
		want []Expansion
	}{
		// Linux delivers connect() to 0.0.0.0, :: and ::ffff:0.0.0.0 to
		// loopback: an omitted FROM_ADDR covers them too.
		{"80=3210", []Expansion{
			{Match: d("127.0.0.1", 80), To: netip.Addr{}, ToPort: 3210},
			{Match: d("::ffff:127.0.0.1", 80), To: netip.Addr{}, ToPort: 3210},
			{Match: d("::1", 80), To: netip.Addr{}, ToPort: 3210},
			{Match: d("0.0.0.0", 80), To: netip.Addr{}, ToPort: 3210},
			{Match: d("::ffff:0.0.0.0", 80), To: netip.Addr{}, ToPort: 3210},
			{Match: d("::", 80), To: netip.Addr{}, ToPort: 3210},
		}},
		{"80=127.0.0.2:3210", []Expansion{
			{Match: d("127.0.0.1", 80), To: a("127.0.0.2"), ToPort: 3210},
			{Match: d("::ffff:127.0.0.1", 80), To: a("::ffff:127.0.0.2"), ToPort: 3210},
			{Match: d("0.0.0.0", 80), To: a("127.0.0.2"), ToPort: 3210},
			{Match: d("::ffff:0.0.0.0", 80), To: a("::ffff:127.0.0.2"), ToPort: 3210},
		}},
		// Not a self-redirect: 127.0.0.1:80 goes to 127.0.0.2.
		{"80=127.0.0.2:80", []Expansion{
			{Match: d("127.0.0.1", 80), To: a("127.0.0.2"), ToPort: 80},
			{Match: d("::ffff:127.0.0.1", 80), To: a("::ffff:127.0.0.2"), ToPort: 80},
			{Match: d("0.0.0.0", 80), To: a("127.0.0.2"), ToPort: 80},
			{Match: d("::ffff:0.0.0.0", 80), To: a("::ffff:127.0.0.2"), ToPort: 80},
		}},
		{"127.0.0.5:80=3210", []Expansion{
			{Match: d("127.0.0.5", 80), To: netip.Addr{}, ToPort: 3210},
			{Match: d("::ffff:127.0.0.5", 80), To: netip.Addr{}, ToPort: 3210},
		}},
		{"[::1]:80=[::1]:3210", []Expansion{{Match: d("::1", 80), To: a("::1"), ToPort: 3210}}},
		{"[::1]:53=[::1]:5353/udp", []Expansion{{Match: u("::1", 53), To: a("::1"), ToPort: 5353}}},
		{"53=5353/udp", []Expansion{
			{Match: u("127.0.0.1", 53), To: netip.Addr{}, ToPort: 5353},
			{Match: u("::ffff:127.0.0.1", 53), To: netip.Addr{}, ToPort: 5353},
			{Match: u("::1", 53), To: netip.Addr{}, ToPort: 5353},
			{Match: u("0.0.0.0", 53), To: netip.Addr{}, ToPort: 5353},
			{Match: u("::ffff:0.0.0.0", 53), To: netip.Addr{}, ToPort: 5353},
			{Match: u("::", 53), To: netip.Addr{}, ToPort: 5353},
		}},
	} {
		r, err := Parse(tc.spec)
		if err != nil {
			t.Fatal(err)
		}
		got := r.Expand()
		if len(got) != len(tc.want) {
			t.Fatalf("%s: Expand() = %v, want %v", tc.spec, got, tc.want)
		}
		for i := range got {
			if got[i] != tc.want[i] {
				t.Errorf("%s: Expand()[%d] = %v, want %v", tc.spec, i, got[i], tc.want[i])
			}
		}
	}
}

func TestParseList(t *testing.T) {
	rules, err := ParseList("80=3210, 443=3211,")
	if err != nil || len(rules) != 2 || rules[1].FromPort != 443 {
		t.Fatalf("ParseList = %v, %v", rules, err)
	}
	for _, bad := range []string{"", " , ", "80=3210,80=3211", "80=3210,127.0.0.1:80=9", "80=3210,x"} {
		if _, err := ParseList(bad); !errors.Is(err, ErrSpec) {
			t.Errorf("ParseList(%q) = %v, want ErrSpec", bad, err)
		}
	}
	// TCP and UDP on the same port do not collide; two UDP rules do.
	if _, err := ParseList("53=5353/udp,53=5353"); err != nil {
		t.Errorf("53/tcp and 53/udp refused together: %v", err)
	}
	if _, err := ParseList("53=5353/udp,127.0.0.1:53=5354/udp"); err == nil || !strings.Contains(err.Error(), "127.0.0.1:53/udp is already redirected") {
		t.Errorf("two UDP rules for 127.0.0.1:53: %v", err)
	}
	// Different loopback addresses on the same port do not collide.
	if _, err := ParseList("127.0.0.1:80=3210,127.0.0.2:80=3211,[::1]:80=3212"); err != nil {
		t.Errorf("distinct sources refused: %v", err)
	}
	many := strings.Repeat("1=2,", MaxPerTarget) + "3=4"
	if _, err := ParseList(many); !errors.Is(err, ErrSpec) {
		t.Errorf("%d specs accepted, limit is %d", MaxPerTarget+1, MaxPerTarget)
	}
}

// FuzzParse checks that Parse never panics, that every accepted rule is
// loopback-only (the unspecified addresses Linux sends to loopback count),
// prints back to an equal rule, expands to 1-6 entries and sends no
// destination to itself.
// The seed corpus runs in every `go test`.
func FuzzParse(f *testing.F) {
	for _, s := range []string{"80=3210", "[::1]:80=3210", "127.0.0.1:80=127.0.0.2:3210", "[::ffff:127.0.0.1]:80=3210",
		"80=", "=", "[", "[]:1=2", "1=[::1]:2", "65535=1", "0=0", "127.0.0.1:1=::1", "80=3210,81=1",
		"80=127.0.0.1:80", "127.0.0.1:80=80", "[::1]:80=[::1]:80", "80=127.0.0.2:80", "[::ffff:127.0.0.1]:80=127.0.0.1:80",
		"53=5353/udp", "53=5353/tcp", "53=5353/", "53=5353/sctp", "53/udp=5353", "[::1]:53=[::1]:5353/udp", "53=53/udp", "/udp", "53=5353/udp/tcp"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		r, err := Parse(s)
		if err != nil {
			if !errors.Is(err, ErrSpec) || strings.Contains(err.Error(), "\n") {
				t.Fatalf("Parse(%q): bad error %q", s, err)
			}
			return
		}
		if r.FromPort == 0 || r.ToPort == 0 {
			t.Fatalf("Parse(%q) accepted port 0: %+v", s, r)
		}
		back, err := Parse(r.String())
		if err != nil || back != r {
			t.Fatalf("Parse(%q) = %+v, but Parse(%q) = %+v, %v", s, r, r.String(), back, err)
		}
		exp := r.Expand()
		if len(exp) < 1 || len(exp) > 6 {
			t.Fatalf("Parse(%q).Expand() has %d entries", s, len(exp))
		}
		for _, e := range exp {
			m := e.Match.Addr.Unmap()
			if !m.IsLoopback() && !m.IsUnspecified() || e.To.IsValid() && !e.To.Unmap().IsLoopback() {
				t.Fatalf("Parse(%q) expands to non-loopback %+v", s, e)
			}
			if e.ToPort == e.Match.Port && (!e.To.IsValid() || e.To == e.Match.Addr) {
				t.Fatalf("Parse(%q) redirects %v to itself", s, e.Match)
			}
		}
	})
}

// FuzzParseList is the label/annotation parser: comma-separated specs as
// Docker labels and Kubernetes annotations carry them. It never panics,
// every error is one line wrapping ErrSpec, an accepted list has no two
// rules matching the same destination, and FormatList prints it back to an
// equal list.
func FuzzParseList(f *testing.F) {
	for _, s := range []string{"80=3210", "80=3210,443=3211", " 80=3210 , ", "80=3210,80=3211", ",,", "[::1]:80=3210,127.0.0.1:80=3211",
		strings.Repeat("1=2,", 20), "80=3210,\n81=3211", "53=5353/udp,53=5353", "53=5353/udp,53=5354/udp", "53=5353/udp,80=3210/tcp"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		rules, err := ParseList(s)
		if err != nil {
			if !errors.Is(err, ErrSpec) || strings.Contains(err.Error(), "\n") {
				t.Fatalf("ParseList(%q): bad error %q", s, err)
			}
			return
		}
		if len(rules) == 0 || len(rules) > MaxPerTarget {
			t.Fatalf("ParseList(%q) = %d rules", s, len(rules))
		}
		seen := map[Dest]bool{}
		for _, r := range rules {
			for _, e := range r.Expand() {
				if seen[e.Match] {
					t.Fatalf("ParseList(%q) accepted two rules for %v", s, e.Match)
				}
				seen[e.Match] = true
			}
		}
		if back, err := ParseList(FormatList(rules)); err != nil || !slices.Equal(back, rules) {
			t.Fatalf("ParseList(FormatList(%v)) = %v, %v; want the same rules", rules, back, err)
		}
	})
}
