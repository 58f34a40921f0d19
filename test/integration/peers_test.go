package integration

import (
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"

	"github.com/nsredirect/nsredirect/internal/bpfobj"
	"github.com/nsredirect/nsredirect/internal/loader"
	"github.com/nsredirect/nsredirect/internal/testenv"
)

// The records of redirected TCP sockets (issue 14): kept in nsr_peers, a
// preallocated hash keyed by socket cookie, and deleted by the sock_release
// program when the socket is closed; in socket storage only when that hash
// is full.

// heldConn is a connection dialled from inside a netns and kept open.
type heldConn struct {
	c    net.Conn
	fd   int
	peer string // what getpeername reported at connect
}

// dialHeld dials addr from inside ns n times and keeps the connections
// open until the test ends.
func dialHeld(t *testing.T, ns testenv.Netns, addr string, n int) []heldConn {
	t.Helper()
	var held []heldConn
	err := ns.Target().Do(func() error {
		for range n {
			c, err := net.DialTimeout("tcp", addr, 2*time.Second)
			if err != nil {
				return err
			}
			h := heldConn{c: c, peer: c.RemoteAddr().String()}
			raw, err := c.(*net.TCPConn).SyscallConn()
			if err != nil {
				return err
			}
			if err := raw.Control(func(fd uintptr) { h.fd = int(fd) }); err != nil {
				return err
			}
			held = append(held, h)
		}
		return nil
	})
	t.Cleanup(func() {
		for _, h := range held {
			h.c.Close()
		}
	})
	if err != nil {
		t.Fatalf("dial %s from %s: %v", addr, ns.Name, err)
	}
	return held
}

// peerNow asks getpeername of h again (Go keeps what it read at connect).
func (h heldConn) peerNow(t *testing.T) string {
	t.Helper()
	sa, err := unix.Getpeername(h.fd)
	if err != nil {
		t.Fatal(err)
	}
	switch a := sa.(type) {
	case *unix.SockaddrInet4:
		return fmt.Sprintf("%s:%d", net.IP(a.Addr[:]), a.Port)
	case *unix.SockaddrInet6:
		return fmt.Sprintf("[%s]:%d", net.IP(a.Addr[:]), a.Port)
	}
	return fmt.Sprintf("%v", sa)
}

// hasSocketStorage reports whether the socket h has a record in the
// nsr_sockets socket storage (userspace looks it up by the socket's fd).
func hasSocketStorage(t *testing.T, sockets *ebpf.Map, h heldConn) bool {
	t.Helper()
	v := make([]byte, sockets.ValueSize())
	err := sockets.Lookup(int32(h.fd), &v)
	if errors.Is(err, ebpf.ErrKeyNotExist) {
		return false
	}
	if err != nil {
		t.Fatal(err)
	}
	return true
}

func countEntries(t *testing.T, m *ebpf.Map) int {
	t.Helper()
	var k uint64
	v := make([]byte, m.ValueSize())
	n := 0
	it := m.Iterate()
	for it.Next(&k, &v) {
		n++
	}
	if err := it.Err(); err != nil {
		t.Fatal(err)
	}
	return n
}

// fakeCookie is a socket cookie no socket has: the kernel counts them up
// from 1.
const fakeCookie = uint64(1) << 62

// fillPeers fills nsr_peers with entries of sockets that do not exist, so
// that a new record cannot go there; they are removed when the test ends.
func fillPeers(t *testing.T, peers *ebpf.Map) int {
	t.Helper()
	v := make([]byte, peers.ValueSize())
	n := 0
	t.Cleanup(func() {
		for i := range n {
			_ = peers.Delete(fakeCookie + uint64(i))
		}
	})
	for i := 0; i < int(peers.MaxEntries())+1; i++ {
		if err := peers.Update(fakeCookie+uint64(i), v, ebpf.UpdateNoExist); err != nil {
			if errors.Is(err, unix.E2BIG) {
				return n
			}
			t.Fatalf("fill nsr_peers at entry %d: %v", i, err)
		}
		n++
	}
	t.Fatalf("nsr_peers took %d entries, more than its %d", n, peers.MaxEntries())
	return n
}

// TestPeerRecordsDroppedOnClose: redirected sockets, IPv4 and IPv6, report
// what they dialled from a record in nsr_peers (none in socket storage: no
// allocation on the hit path), one per open socket; closing them deletes
// their records, so the hash holds only the sockets open now.
func TestPeerRecordsDroppedOnClose(t *testing.T) {
	pin := testenv.BPFFS(t)
	ns := testenv.NewNetns(t)
	testenv.Server(t, ns, ":3210")
	l := attachLoader(t, pin)
	if err := l.Enroll(loader.Enrollment{Cookie: ns.Cookie(t), Name: "peers", Owner: "test", Rules: mustRules(t, "80=3210")}); err != nil {
		t.Fatal(err)
	}
	peers := openPinnedMap(t, loader.MapPin(pin, bpfobj.RedirectMapNsrPeers))
	sockets := openPinnedMap(t, loader.MapPin(pin, bpfobj.RedirectMapNsrSockets))
	if n := countEntries(t, peers); n != 0 {
		t.Fatalf("nsr_peers holds %d entries before any connect", n)
	}
	const each = 10
	held := append(dialHeld(t, ns, "127.0.0.1:80", each), dialHeld(t, ns, "[::1]:80", each)...)
	for _, h := range held {
		if want := map[bool]string{true: "127.0.0.1:80", false: "[::1]:80"}[strings.HasPrefix(h.peer, "127.")]; h.peer != want || h.peerNow(t) != want {
			t.Errorf("getpeername %s then %s; want %s", h.peer, h.peerNow(t), want)
		}
		if hasSocketStorage(t, sockets, h) {
			t.Errorf("a redirected socket (%s) has socket storage; its record belongs in nsr_peers", h.peer)
		}
	}
	if n := countEntries(t, peers); n != 2*each {
		t.Errorf("nsr_peers holds %d entries with %d redirected sockets open", n, 2*each)
	}
	// A connect that was not redirected leaves no record.
	dialHeld(t, ns, "127.0.0.1:3210", 1)
	for _, h := range held {
		h.c.Close()
	}
	waitFor(t, "the closed sockets' records deleted", 10*time.Second, func() bool { return countEntries(t, peers) == 0 })
}

// TestPeerRecordsFallBackWhenHashFull: with nsr_peers full, a redirected
// socket's record goes in socket storage and getpeername is still exact;
// the hash is left as it was.
func TestPeerRecordsFallBackWhenHashFull(t *testing.T) {
	pin := testenv.BPFFS(t)
	ns := testenv.NewNetns(t)
	testenv.Server(t, ns, ":3210")
	l := attachLoader(t, pin)
	if err := l.Enroll(loader.Enrollment{Cookie: ns.Cookie(t), Name: "full", Owner: "test", Rules: mustRules(t, "80=3210")}); err != nil {
		t.Fatal(err)
	}
	peers := openPinnedMap(t, loader.MapPin(pin, bpfobj.RedirectMapNsrPeers))
	sockets := openPinnedMap(t, loader.MapPin(pin, bpfobj.RedirectMapNsrSockets))
	full := fillPeers(t, peers)
	t.Logf("nsr_peers full at %d entries", full)
	for _, addr := range []string{"127.0.0.1:80", "[::1]:80"} {
		h := dialHeld(t, ns, addr, 1)[0]
		if h.peer != addr || h.peerNow(t) != addr {
			t.Errorf("with nsr_peers full: getpeername %s then %s; want %s", h.peer, h.peerNow(t), addr)
		}
		if !hasSocketStorage(t, sockets, h) {
			t.Errorf("with nsr_peers full, %s keeps no record in socket storage", addr)
		}
	}
	if n := countEntries(t, peers); n != full {
		t.Errorf("nsr_peers holds %d entries, want the %d it was filled with", n, full)
	}
}

// v2Object is the programs' object as layout version 2 built it (main
// before nsr_peers): the state the previous release pinned.
const v2Object = "../../internal/loader/testdata/redirect_v2_bpfel.o"

// pinV2State sets up what a daemon of layout version 2 that enrolled ns
// with specs and then died leaves in pin: its maps under v2/, its records
// in v2/nsr_records, its TCP programs on pinned links at the root and its
// UDP programs pinned unattached.
func pinV2State(t *testing.T, pin string, cookie uint64, name, specs string) {
	t.Helper()
	dir := filepath.Join(pin, "v2")
	coll, _ := pinOldState(t, v2Object, pin, dir, cookie, specs, 6) // rule_key.proto: TCP
	defer coll.Close()
	records, err := ebpf.NewMap(&ebpf.MapSpec{Name: "nsr_records", Type: ebpf.Hash, KeySize: 8, ValueSize: 2048, MaxEntries: 8192, Flags: unix.BPF_F_NO_PREALLOC})
	if err != nil {
		t.Fatal(err)
	}
	defer records.Close()
	if err := records.Pin(filepath.Join(dir, "nsr_records")); err != nil {
		t.Fatal(err)
	}
	doc, err := json.Marshal(map[string]any{"netns_ino": 7, "name": name, "owner": "run", "id": "/run/netns/" + name, "specs": strings.Split(specs, ","), "owner_pid": 4242, "enrolled_unix_ns": time.Now().UnixNano()})
	if err != nil {
		t.Fatal(err)
	}
	rec := make([]byte, 2048)
	binary.LittleEndian.PutUint32(rec, uint32(len(doc)))
	copy(rec[4:], doc)
	if err := records.Put(cookie, rec); err != nil {
		t.Fatal(err)
	}
	for _, hook := range loader.UDPHookNames() {
		if err := coll.Programs["nsr_"+hook].Pin(loader.ProgPin(pin, hook)); err != nil {
			t.Fatal(err)
		}
	}
}

// TestMigratesV2LayoutUnderLoad: a daemon of this version finds the state a
// layout 2 daemon left (no nsr_peers, no sock_release program) and migrates
// it in place while a connect loop runs in the enrolled netns: not one
// connect is refused; the maps are the same kernel maps, now under v3/ (so
// the counts and the socket storage carry over with no copy: a socket
// redirected before the migration still reports what it dialled); the TCP
// links stay, with new programs, and sock_release gets one; v2/ is gone.
func TestMigratesV2LayoutUnderLoad(t *testing.T) {
	pin := testenv.BPFFS(t)
	ns := testenv.NewNetns(t)
	testenv.Server(t, ns, ":3210")
	cookie := ns.Cookie(t)
	pinV2State(t, pin, cookie, "v2-netns", "80=3210")
	t.Cleanup(func() {
		for _, h := range testenv.Hooks {
			_ = os.Remove(loader.LinkPin(pin, h))
		}
	})
	old := dialHeld(t, ns, "127.0.0.1:80", 1)[0]
	if old.peer != "127.0.0.1:80" {
		t.Fatalf("the version 2 state does not redirect: %s", old.peer)
	}
	rulesBefore, err := ebpf.LoadPinnedMap(filepath.Join(pin, "v2", "nsr_rules"), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer rulesBefore.Close()
	linksBefore := testenv.LinkIDs(t, pin)
	progsBefore := testenv.ProgIDs(t, pin)

	l := attachUnderLoad(t, ns, pin, "2")

	if _, err := os.Stat(filepath.Join(pin, "v2")); !os.IsNotExist(err) {
		t.Errorf("version 2 state dir left after the migration (%v)", err)
	}
	rulesAfter := openPinnedMap(t, loader.MapPin(pin, bpfobj.RedirectMapNsrRules))
	if a, b := mapID(t, rulesBefore), mapID(t, rulesAfter); a != b {
		t.Errorf("nsr_rules is map %d after the migration, was %d: the maps are carried over, not copied", b, a)
	}
	if got := testenv.LinkIDs(t, pin); len(got) != len(testenv.Hooks) || !equalInts(got[1:], linksBefore) {
		t.Errorf("links %v after the migration, want the same %v (programs swapped in place) and sock_release's", got, linksBefore)
	}
	for i, id := range testenv.ProgIDs(t, pin)[1:] {
		if id == progsBefore[i] {
			t.Errorf("hook %s still runs the version 2 program %d", testenv.Hooks[i+1], id)
		}
	}
	if got := old.peerNow(t); got != "127.0.0.1:80" {
		t.Errorf("a socket redirected before the migration reports %s; want what it dialled, 127.0.0.1:80 (its socket storage carried over)", got)
	}
	recs, err := l.Records()
	if err != nil || len(recs) != 1 {
		t.Fatalf("records after the migration: %v %+v", err, recs)
	}
	r := recs[0]
	if r.Cookie != cookie || r.Name != "v2-netns" || r.Owner != "run" || r.OwnerPID != 4242 || strings.Join(r.Labels, ",") != "80=3210" || r.NetnsIno != 7 {
		t.Errorf("migrated record %+v", r)
	}
	if r.Redirects[0] < 1000 {
		t.Errorf("redirect count %d after the migration: the version 2 count (1000) was lost", r.Redirects[0])
	}
	fresh := dialHeld(t, ns, "127.0.0.1:80", 1)[0]
	if fresh.peer != "127.0.0.1:80" {
		t.Errorf("after the migration: %s", fresh.peer)
	}
	peers := openPinnedMap(t, loader.MapPin(pin, bpfobj.RedirectMapNsrPeers))
	if n := countEntries(t, peers); n != 1 {
		t.Errorf("nsr_peers holds %d entries with one socket redirected after the migration open", n)
	}
	if err := l.Enroll(loader.Enrollment{Cookie: cookie, Name: "v2-netns", Owner: "run", Rules: mustRules(t, "80=3210")}); err != nil {
		t.Fatalf("adopt the migrated enrollment: %v", err)
	}
	ids := testenv.ProgIDs(t, pin)
	if _, err := l.Cleanup(true); err != nil {
		t.Fatal(err)
	}
	testenv.AssertGone(t, pin, ids)
}

func mapID(t *testing.T, m *ebpf.Map) ebpf.MapID {
	t.Helper()
	info, err := m.Info()
	if err != nil {
		t.Fatal(err)
	}
	id, _ := info.ID()
	return id
}
