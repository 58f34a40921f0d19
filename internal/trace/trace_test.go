package trace

import (
	"encoding/binary"
	"net/netip"
	"testing"
	"time"

	"github.com/nsredirect/nsredirect/internal/bpfobj"
)

// words is an address as the programs hold it: network byte order in
// native words.
func words(a netip.Addr) [4]uint32 {
	var w [4]uint32
	b := a.As16()
	if a.Is4() {
		b4 := a.As4()
		w[0] = binary.NativeEndian.Uint32(b4[:])
		return w
	}
	for i := range w {
		w[i] = binary.NativeEndian.Uint32(b[4*i:])
	}
	return w
}

func port(p uint16) uint16 {
	var b [2]byte
	binary.BigEndian.PutUint16(b[:], p)
	return binary.NativeEndian.Uint16(b[:])
}

func TestDecode(t *testing.T) {
	boot := time.Unix(1000, 0)
	raw := bpfobj.TraceTraceEvent{
		KtimeNs: 5e9, NetnsCookie: 7, SockCookie: 9, PidTgid: 42<<32 | 43, Uid: 1000,
		Dialled: words(netip.MustParseAddr("127.0.0.1")), DialledPort: port(80),
		Target: words(netip.MustParseAddr("127.0.0.2")), TargetPort: port(3210),
		Hook: uint8(bpfobj.TraceTraceHookTRACE_CONNECT), Family: 4, Proto: 6, Verdict: uint8(bpfobj.TraceTraceVerdictTRACE_REDIRECTED),
	}
	copy(raw.Comm[:], []int8{'c', 'u', 'r', 'l'})
	e := decode(raw, boot)
	want := Event{
		Time: boot.Add(5 * time.Second), NetnsCookie: 7, SockCookie: 9, PID: 42, TID: 43, UID: 1000, Comm: "curl",
		Hook: "connect", Proto: "tcp", Family: 4, Verdict: Redirected,
		Dialled: netip.MustParseAddrPort("127.0.0.1:80"), Target: netip.MustParseAddrPort("127.0.0.2:3210"),
	}
	if e != want {
		t.Errorf("decode:\n got %+v\nwant %+v", e, want)
	}
	for _, a := range []string{"::1", "::ffff:127.0.0.1"} {
		got := addrPort(6, words(netip.MustParseAddr(a)), port(53))
		if got != netip.AddrPortFrom(netip.MustParseAddr(a), 53) {
			t.Errorf("addrPort(6, %s): %s", a, got)
		}
	}
}
