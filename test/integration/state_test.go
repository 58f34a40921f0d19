package integration

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"

	"github.com/nsredirect/nsredirect/internal/bpfobj"
	"github.com/nsredirect/nsredirect/internal/entry"
	"github.com/nsredirect/nsredirect/internal/loader"
	"github.com/nsredirect/nsredirect/internal/rule"
	"github.com/nsredirect/nsredirect/internal/testenv"
)

func attachLoader(t *testing.T, pin string) *loader.Loader {
	t.Helper()
	l, err := loader.Attach(pin, testenv.RootCgroup(t), quietLogger())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_, _ = l.Cleanup(true)
		l.Close()
	})
	return l
}

// mustRules is specs as the loader takes them.
func mustRules(t *testing.T, specs string) []entry.Rule {
	t.Helper()
	return rule.Entries(mustParse(t, specs))
}

// mustParse is specs as a source yields them.
func mustParse(t *testing.T, specs string) []rule.Rule {
	t.Helper()
	r, err := rule.ParseList(specs)
	if err != nil {
		t.Fatal(err)
	}
	return r
}

func openPinnedMap(t *testing.T, path string) *ebpf.Map {
	t.Helper()
	m, err := ebpf.LoadPinnedMap(path, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { m.Close() })
	return m
}

// cookieKeys counts the rule and counter entries of cookie, read from the
// kernel maps.
func cookieKeys(t *testing.T, pin string, cookie uint64) (rules, counters int) {
	t.Helper()
	for name, n := range map[string]*int{"nsr_rules": &rules, "nsr_counters": &counters} {
		m := openPinnedMap(t, loader.MapPin(pin, name))
		var k []byte
		it := m.Iterate()
		var v []byte
		var pc []uint64
		for {
			var ok bool
			if m.Type() == ebpf.PerCPUHash {
				ok = it.Next(&k, &pc)
			} else {
				ok = it.Next(&k, &v)
			}
			if !ok {
				break
			}
			if binary.NativeEndian.Uint64(k) == cookie {
				*n++
			}
		}
		if err := it.Err(); err != nil {
			t.Fatal(err)
		}
	}
	return rules, counters
}

// TestUnenrollDeletesWhatTheMapsHold (issue 11, item 8): the record of a
// netns says other specs than its kernel entries (a grammar change, a spec
// an older version wrote); unenroll still leaves the rule and counter maps
// exactly empty, because it deletes what the maps hold for the cookie.
func TestUnenrollDeletesWhatTheMapsHold(t *testing.T) {
	pin := testenv.BPFFS(t)
	ns := testenv.NewNetns(t)
	l := attachLoader(t, pin)
	cookie := ns.Cookie(t)
	if err := l.Enroll(loader.Enrollment{Cookie: cookie, Name: "drift", Owner: "test", Rules: mustRules(t, "80=3210,127.0.0.2:443=127.0.0.1:3211")}); err != nil {
		t.Fatal(err)
	}
	// Rewrite the record: one spec that parses to other keys, one that no
	// parser of this version reads.
	records := openPinnedMap(t, loader.MapPin(pin, loader.RecordsMap))
	raw, err := records.LookupBytes(cookie)
	if err != nil || raw == nil {
		t.Fatalf("record of the enrolled netns: %v", err)
	}
	var doc map[string]any
	if err := json.Unmarshal(raw[4:4+binary.LittleEndian.Uint32(raw)], &doc); err != nil {
		t.Fatal(err)
	}
	doc["specs"] = []string{"81=3212", "tcp:80~3210 (a later grammar)"}
	b, _ := json.Marshal(doc)
	v := make([]byte, len(raw))
	binary.LittleEndian.PutUint32(v, uint32(len(b)))
	copy(v[4:], b)
	if err := records.Put(cookie, v); err != nil {
		t.Fatal(err)
	}
	if r, c := cookieKeys(t, pin, cookie); r == 0 || c != 2 {
		t.Fatalf("before unenroll: %d rule and %d counter entries, want some and 2", r, c)
	}
	if err := l.Unenroll(cookie); err != nil {
		t.Fatal(err)
	}
	if r, c := cookieKeys(t, pin, cookie); r != 0 || c != 0 {
		t.Errorf("after unenroll: %d rule and %d counter entries of the netns left, want 0 and 0", r, c)
	}
	if raw, _ := records.LookupBytes(cookie); raw != nil {
		t.Error("record left after unenroll")
	}
}

// fillRules fills the rule map to capacity with entries of cookies no netns
// has, and removes them at cleanup.
func fillRules(t *testing.T, pin string) {
	t.Helper()
	m := openPinnedMap(t, loader.MapPin(pin, bpfobj.RedirectMapNsrRules))
	key := make([]byte, m.KeySize())
	val := make([]byte, m.ValueSize())
	var added []uint64
	for i := uint64(0); i < uint64(m.MaxEntries()); i++ {
		binary.NativeEndian.PutUint64(key, 1<<62+i)
		if err := m.Update(key, val, ebpf.UpdateNoExist); err != nil {
			break // full
		}
		added = append(added, 1<<62+i)
	}
	t.Cleanup(func() {
		for _, c := range added {
			binary.NativeEndian.PutUint64(key, c)
			_ = m.Delete(key)
		}
	})
	if len(added) == 0 {
		t.Fatal("could not add any filler entry")
	}
}

// TestFailedUpdateRollsBackExactly (item 10): an update that overwrites the
// entries of its first spec and then finds the rule map full leaves the
// kernel exactly as it was: the overwritten entries point at the old target
// again and the counter keeps its old count.
func TestFailedUpdateRollsBackExactly(t *testing.T) {
	pin := testenv.BPFFS(t)
	ns := testenv.NewNetns(t)
	l := attachLoader(t, pin)
	cookie := ns.Cookie(t)
	if err := l.Enroll(loader.Enrollment{Cookie: cookie, Name: "upd", Owner: "test", Rules: mustRules(t, "80=3210")}); err != nil {
		t.Fatal(err)
	}
	// A count that a reset to zero would lose.
	counters := openPinnedMap(t, loader.MapPin(pin, bpfobj.RedirectMapNsrCounters))
	ck := make([]byte, counters.KeySize())
	binary.NativeEndian.PutUint64(ck, cookie)
	perCPU := make([]uint64, len(mustPossibleCPUs(t)))
	for i := range perCPU {
		perCPU[i] = uint64(7 + i)
	}
	if err := counters.Put(ck, perCPU); err != nil {
		t.Fatal(err)
	}
	fillRules(t, pin)
	before := dumpMaps(t, pin)
	err := l.Enroll(loader.Enrollment{Cookie: cookie, Name: "upd", Owner: "test", Rules: mustRules(t, "80=3211,81=3212")})
	if err == nil || !strings.Contains(err.Error(), "rule map is full") {
		t.Fatalf("update into a full rule map: %v; want 'rule map is full'", err)
	}
	if after := dumpMaps(t, pin); after != before {
		t.Errorf("a failed update changed the kernel state (- before, + after):\n%s", diffLines(before, after))
	}
}

func mustPossibleCPUs(t *testing.T) []int {
	t.Helper()
	n, err := ebpf.PossibleCPU()
	if err != nil {
		t.Fatal(err)
	}
	return make([]int, n)
}

// diffLines shows the lines that differ.
func diffLines(a, b string) string {
	in := map[string]int{}
	for _, l := range strings.Split(a, "\n") {
		in[l]++
	}
	for _, l := range strings.Split(b, "\n") {
		in[l]--
	}
	var out []string
	for l, n := range in {
		if n > 0 {
			out = append(out, "- "+l)
		} else if n < 0 {
			out = append(out, "+ "+l)
		}
	}
	return strings.Join(out, "\n")
}

// TestFailedAdoptionReleasesOwner (item 10): a daemon adopting the rules a
// crashed owner left, with rules that do not fit, leaves the kernel exactly
// as before and does not keep the owner lock of a netns it never serves.
func TestFailedAdoptionReleasesOwner(t *testing.T) {
	pin := testenv.BPFFS(t)
	ns := testenv.NewNetns(t)
	cookie := ns.Cookie(t)
	crashed, err := loader.Attach(pin, testenv.RootCgroup(t), quietLogger())
	if err != nil {
		t.Fatal(err)
	}
	if err := crashed.Enroll(loader.Enrollment{Cookie: cookie, Name: "adopt", Owner: "test", Rules: mustRules(t, "80=3210")}); err != nil {
		t.Fatal(err)
	}
	crashed.Close() // its owner lock dies with it, as on SIGKILL
	l := attachLoader(t, pin)
	fillRules(t, pin)
	before := dumpMaps(t, pin)
	err = l.Enroll(loader.Enrollment{Cookie: cookie, Name: "adopt", Owner: "test", Rules: mustRules(t, "80=3210,81=3212")})
	if err == nil || !strings.Contains(err.Error(), "rule map is full") {
		t.Fatalf("adoption into a full rule map: %v; want 'rule map is full'", err)
	}
	if after := dumpMaps(t, pin); after != before {
		t.Errorf("a failed adoption changed the kernel state (- before, + after):\n%s", diffLines(before, after))
	}
	recs, err := l.Records()
	if err != nil {
		t.Fatal(err)
	}
	for _, r := range recs {
		if r.Cookie == cookie && r.OwnerAlive {
			t.Errorf("the failed adoption kept the owner lock of %q: it shows as served", r.Name)
		}
	}
}

// TestRecordsKeepIDHolderAndLongNames (item 9): the record of a netns keeps
// its ID and holder, and a name longer than the 127 bytes the old record
// held, whole.
func TestRecordsKeepIDHolderAndLongNames(t *testing.T) {
	pin := testenv.BPFFS(t)
	ns := testenv.NewNetns(t)
	l := attachLoader(t, pin)
	name := "ns/" + strings.Repeat("a-very-long-pod-name-", 12)
	e := loader.Enrollment{Cookie: ns.Cookie(t), NetnsIno: 42, Name: name, Owner: "kube", ID: "0f6c1d2e-uid", Holder: "pod kube-system/nsredirect-x7k2p", Rules: mustRules(t, "80=3210")}
	if err := l.Enroll(e); err != nil {
		t.Fatal(err)
	}
	recs, err := l.Records()
	if err != nil || len(recs) != 1 {
		t.Fatalf("records: %v %+v", err, recs)
	}
	r := recs[0]
	if r.Name != name || r.ID != e.ID || r.Holder != e.Holder || r.Owner != "kube" || r.NetnsIno != 42 || r.OwnerPID != uint32(os.Getpid()) || !r.OwnerAlive {
		t.Errorf("record read back as %+v, want %+v", r, e)
	}
	fill, err := l.Fill()
	if err != nil {
		t.Fatal(err)
	}
	want := map[string]int{"rules": 65536, "counters": 65536, "enrollments": loader.MaxEnrollments, "peers": 16384}
	rules, counters := cookieKeys(t, pin, e.Cookie)
	got := map[string]int{"rules": rules, "counters": counters, "enrollments": 1, "peers": 0}
	for _, f := range fill {
		if f.Capacity != want[f.Map] || f.Entries != got[f.Map] {
			t.Errorf("fill of %s: %d of %d, want %d of %d", f.Map, f.Entries, f.Capacity, got[f.Map], want[f.Map])
		}
	}
	if len(fill) != len(want) {
		t.Errorf("fill reports %d maps, want %d", len(fill), len(want))
	}
}

// TestPeerStorageFailuresCounted (item 11): when neither nsr_peers (full
// here) nor the socket storage (optmem_max of the netns is 0 here, which
// the storage is charged against) can take the record, the connect is still
// redirected, getpeername shows the new port, and the per-CPU failure
// counter says how often.
func TestPeerStorageFailuresCounted(t *testing.T) {
	pin := testenv.BPFFS(t)
	ns := testenv.NewNetns(t)
	testenv.Server(t, ns, ":3210")
	l := attachLoader(t, pin)
	if err := l.Enroll(loader.Enrollment{Cookie: ns.Cookie(t), Name: "optmem", Owner: "test", Rules: mustRules(t, "80=3210")}); err != nil {
		t.Fatal(err)
	}
	if n, err := l.PeerStorageFailures(); err != nil || n != 0 {
		t.Fatalf("failures before: %d (%v), want 0", n, err)
	}
	if out, err := exec.Command("ip", "netns", "exec", ns.Name, "sh", "-c", "test -w /proc/sys/net/core/optmem_max && echo 0 > /proc/sys/net/core/optmem_max").CombinedOutput(); err != nil {
		t.Skipf("net.core.optmem_max is not per netns on this kernel (Linux < 6.8), so storage failure cannot be provoked in a test netns alone: %v %s", err, out)
	}
	fillPeers(t, openPinnedMap(t, loader.MapPin(pin, bpfobj.RedirectMapNsrPeers)))
	const dials = 5
	for i := range dials {
		peer, err := ns.Dial("tcp", "127.0.0.1:80")
		if err != nil {
			t.Fatalf("dial %d with no socket storage: %v (the redirect must still work)", i, err)
		}
		if peer != "127.0.0.1:3210" {
			t.Fatalf("dial %d: getpeername %s; with no storage it can only show the new port", i, peer)
		}
	}
	if n, err := l.PeerStorageFailures(); err != nil || n != dials {
		t.Errorf("PeerStorageFailures = %d (%v), want %d", n, err, dials)
	}
}

// detachLink detaches the pinned link of hook with bpftool, an outside
// hand, and returns its ID.
func detachLink(t *testing.T, pin, hook string) int {
	t.Helper()
	var id int
	for i, h := range testenv.Hooks {
		if h == hook {
			id = testenv.LinkIDs(t, pin)[i]
		}
	}
	out, err := exec.Command(testenv.Tool(t, "bpftool"), "link", "detach", "id", strconv.Itoa(id)).CombinedOutput()
	if err != nil {
		t.Fatalf("bpftool link detach id %d: %v\n%s", id, err, out)
	}
	return id
}

func linkAttachedAt(t *testing.T, pin, hook string) bool {
	t.Helper()
	lnk, err := link.LoadPinnedLink(loader.LinkPin(pin, hook), nil)
	if err != nil {
		return false
	}
	defer lnk.Close()
	info, err := lnk.Info()
	if err != nil {
		t.Fatal(err)
	}
	cg := info.Cgroup()
	return cg != nil && cg.CgroupId != 0
}

// TestHealReattachesDetachedLink: `bpftool link detach` of our connect4
// link under a running loader: the redirect is gone until Heal re-creates
// the link from the pinned program, which it reports.
func TestHealReattachesDetachedLink(t *testing.T) {
	pin := testenv.BPFFS(t)
	ns := testenv.NewNetns(t)
	testenv.Server(t, ns, ":3210")
	l := attachLoader(t, pin)
	if err := l.Enroll(loader.Enrollment{Cookie: ns.Cookie(t), Name: "heal", Owner: "test", Rules: mustRules(t, "80=3210")}); err != nil {
		t.Fatal(err)
	}
	old := detachLink(t, pin, loader.HookConnect4)
	if linkAttachedAt(t, pin, loader.HookConnect4) {
		t.Fatal("link still attached after bpftool link detach")
	}
	if _, err := ns.Dial("tcp", "127.0.0.1:80"); err == nil {
		t.Fatal("connect redirected with connect4 detached: the test does not detach what it thinks")
	}
	repaired, err := l.Heal(testenv.RootCgroup(t))
	if err != nil || len(repaired) != 1 || repaired[0] != loader.HookConnect4 {
		t.Fatalf("Heal = %v, %v; want [connect4]", repaired, err)
	}
	if !linkAttachedAt(t, pin, loader.HookConnect4) || testenv.LinkOf(t, pin, loader.HookConnect4).ID == old {
		t.Fatal("Heal did not pin a new attached link")
	}
	if peer := hostPeer(ns, "127.0.0.1:80"); peer != "127.0.0.1:80" {
		t.Errorf("after Heal: %s, want the redirect back", peer)
	}
	if repaired, err := l.Heal(testenv.RootCgroup(t)); err != nil || len(repaired) != 0 {
		t.Errorf("second Heal = %v, %v; want nothing to repair", repaired, err)
	}
}

// TestAttachReplacesDetachedLink (item 5, at start-up): a pinned link that
// was detached while no daemon ran is replaced by a new one instead of
// failing the start with ENOLINK.
func TestAttachReplacesDetachedLink(t *testing.T) {
	pin := testenv.BPFFS(t)
	ns := testenv.NewNetns(t)
	testenv.Server(t, ns, ":3210")
	first, err := loader.Attach(pin, testenv.RootCgroup(t), quietLogger())
	if err != nil {
		t.Fatal(err)
	}
	if err := first.Enroll(loader.Enrollment{Cookie: ns.Cookie(t), Name: "restart", Owner: "test", Rules: mustRules(t, "80=3210")}); err != nil {
		t.Fatal(err)
	}
	first.Close()
	detachLink(t, pin, loader.HookConnect6)
	l := attachLoader(t, pin)
	if !linkAttachedAt(t, pin, loader.HookConnect6) {
		t.Fatal("connect6 link not attached after a start that found it detached")
	}
	if got := l.StartupRepairs(); len(got) != 1 || got[0] != loader.HookConnect6 {
		t.Errorf("StartupRepairs = %v, want [connect6]", got)
	}
	if peer := hostPeer(ns, "[::1]:80"); peer != "[::1]:80" {
		t.Errorf("[::1]:80 after the start: %s, want redirected", peer)
	}
}

// v1Object is the programs' object as layout version 1 (main before the
// state was versioned) built it: the state real users have pinned.
const v1Object = "../../internal/loader/testdata/redirect_v1_bpfel.o"

// pinV1State sets up what a version 1 daemon that enrolled ns with specs
// and then died leaves in pin: its maps at the top of the pin dir, its
// records in nsr_enroll, its programs on pinned links at the root.
func pinV1State(t *testing.T, pin string, cookie uint64, name, specs string) {
	t.Helper()
	coll, nRules := pinOldState(t, v1Object, pin, pin, cookie, specs, 0)
	defer coll.Close()
	rec := struct {
		NetnsIno, EnrolledUnixNs uint64
		OwnerPid, RuleCount      uint32
		Owner                    [32]byte
		Name                     [128]byte
		Specs                    [512]byte
	}{NetnsIno: 7, EnrolledUnixNs: uint64(time.Now().UnixNano()), OwnerPid: 4242, RuleCount: uint32(nRules)}
	copy(rec.Owner[:], "run")
	copy(rec.Name[:], name)
	copy(rec.Specs[:], specs)
	var buf bytes.Buffer
	if err := binary.Write(&buf, binary.NativeEndian, rec); err != nil {
		t.Fatal(err)
	}
	if err := coll.Maps["nsr_enroll"].Put(cookie, buf.Bytes()); err != nil {
		t.Fatal(err)
	}
}

// pinOldState loads the programs' object of an older layout and leaves in
// pin what all of them had: its maps pinned in mapDir, the rules of specs
// for cookie (proto, when not 0, in rule_key.proto) with their counters,
// and the TCP programs on pinned links at the root. It returns the
// collection, for the caller to close, and the number of rules.
func pinOldState(t *testing.T, object, pin, mapDir string, cookie uint64, specs string, proto byte) (*ebpf.Collection, int) {
	t.Helper()
	spec, err := ebpf.LoadCollectionSpec(object)
	if err != nil {
		t.Fatal(err)
	}
	coll, err := ebpf.NewCollection(spec)
	if err != nil {
		t.Fatal(err)
	}
	ok := false
	defer func() {
		if !ok {
			coll.Close()
		}
	}()
	if err := os.MkdirAll(mapDir, 0o700); err != nil {
		t.Fatal(err)
	}
	for name, m := range coll.Maps {
		if err := m.Pin(filepath.Join(mapDir, name)); err != nil {
			t.Fatal(err)
		}
	}
	rules := mustRules(t, specs)
	for i, r := range rules {
		for _, x := range r.Entries {
			k, v := v1RuleEntry(cookie, uint32(i), x)
			if proto != 0 {
				k[27] = proto
			}
			if err := coll.Maps["nsr_rules"].Put(k, v); err != nil {
				t.Fatal(err)
			}
		}
		ck := make([]byte, 16)
		binary.NativeEndian.PutUint64(ck, cookie)
		binary.NativeEndian.PutUint32(ck[8:], uint32(i))
		perCPU := make([]uint64, len(mustPossibleCPUs(t)))
		perCPU[0] = 1000 + uint64(i)
		if err := coll.Maps["nsr_counters"].Put(ck, perCPU); err != nil {
			t.Fatal(err)
		}
	}
	attach := map[string]ebpf.AttachType{
		loader.HookConnect4: ebpf.AttachCGroupInet4Connect, loader.HookConnect6: ebpf.AttachCGroupInet6Connect,
		loader.HookGetpeername4: ebpf.AttachCgroupInet4GetPeername, loader.HookGetpeername6: ebpf.AttachCgroupInet6GetPeername,
	}
	for hook, typ := range attach {
		prog := coll.Programs["nsr_"+hook]
		lnk, err := link.AttachCgroup(link.CgroupOptions{Path: testenv.RootCgroup(t), Attach: typ, Program: prog})
		if err != nil {
			t.Fatal(err)
		}
		if err := lnk.Pin(loader.LinkPin(pin, hook)); err != nil {
			t.Fatal(err)
		}
		lnk.Close()
		if err := prog.Pin(loader.ProgPin(pin, hook)); err != nil {
			t.Fatal(err)
		}
	}
	ok = true
	return coll, len(rules)
}

// v1RuleEntry lays a rule entry out as version 1 did (the layout of
// rule_key and rule_val has not changed since).
func v1RuleEntry(cookie uint64, index uint32, x entry.Entry) ([]byte, []byte) {
	words := func(a netip.Addr) (uint8, []byte) {
		if a.Is4() {
			b := a.As4()
			return 4, append(b[:], make([]byte, 12)...)
		}
		b := a.As16()
		return 6, b[:]
	}
	k := make([]byte, 32)
	binary.NativeEndian.PutUint64(k, cookie)
	fam, addr := words(x.Match.Addr)
	copy(k[8:24], addr)
	binary.BigEndian.PutUint16(k[24:], x.Match.Port)
	k[26] = fam
	v := make([]byte, 24)
	if x.To.IsValid() {
		_, to := words(x.To)
		copy(v[0:16], to)
	} else {
		v[18] = 1
	}
	binary.BigEndian.PutUint16(v[16:], x.ToPort)
	binary.NativeEndian.PutUint32(v[20:], index)
	return k, v
}

// TestMigratesV1LayoutUnderLoad (item 9): a daemon of this version finds the
// state a version 1 daemon left (another map layout: records in the
// programs' object, no failure counter) and migrates it in place while a
// connect loop runs in the enrolled netns: not one connect is refused, the
// links stay (their programs are swapped), the rules, records and counts
// move to the new maps, and the old pins are gone.
func TestMigratesV1LayoutUnderLoad(t *testing.T) {
	pin := testenv.BPFFS(t)
	ns := testenv.NewNetns(t)
	testenv.Server(t, ns, ":3210")
	cookie := ns.Cookie(t)
	pinV1State(t, pin, cookie, "v1-netns", "80=3210")
	t.Cleanup(func() {
		// Whatever the test reached: unpin everything (links first).
		for _, h := range testenv.Hooks {
			_ = os.Remove(loader.LinkPin(pin, h))
		}
	})
	if peer := hostPeer(ns, "127.0.0.1:80"); peer != "127.0.0.1:80" {
		t.Fatalf("the version 1 state does not redirect: %s", peer)
	}
	linksBefore := testenv.LinkIDs(t, pin)
	progsBefore := testenv.ProgIDs(t, pin)

	l := attachUnderLoad(t, ns, pin, "1")

	for _, name := range []string{"nsr_rules", "nsr_counters", "nsr_sockets", "nsr_enroll"} {
		if _, err := os.Stat(filepath.Join(pin, name)); !os.IsNotExist(err) {
			t.Errorf("version 1 pin %s left after the migration (%v)", name, err)
		}
	}
	// Version 1 had no sock_release hook: its link is new (Hooks[0]).
	if got := testenv.LinkIDs(t, pin); len(got) != len(testenv.Hooks) || !equalInts(got[1:], linksBefore) {
		t.Errorf("links %v after the migration, want the same %v (programs swapped in place) and sock_release's", got, linksBefore)
	}
	for i, id := range testenv.ProgIDs(t, pin)[1:] {
		if id == progsBefore[i] {
			t.Errorf("hook %d still runs the version 1 program %d", i, id)
		}
	}
	recs, err := l.Records()
	if err != nil || len(recs) != 1 {
		t.Fatalf("records after the migration: %v %+v", err, recs)
	}
	r := recs[0]
	if r.Cookie != cookie || r.Name != "v1-netns" || r.Owner != "run" || r.OwnerPID != 4242 || strings.Join(r.Labels, ",") != "80=3210" || r.NetnsIno != 7 {
		t.Errorf("migrated record %+v", r)
	}
	if r.Redirects[0] < 1000 {
		t.Errorf("redirect count %d after the migration: the version 1 count (1000) was lost", r.Redirects[0])
	}
	if peer := hostPeer(ns, "127.0.0.1:80"); peer != "127.0.0.1:80" {
		t.Errorf("after the migration: %s", peer)
	}
	// The migrated state is this version's: it is adopted, updated and
	// removed like any other.
	if err := l.Enroll(loader.Enrollment{Cookie: cookie, Name: "v1-netns", Owner: "run", Rules: mustRules(t, "80=3210")}); err != nil {
		t.Fatalf("adopt the migrated enrollment: %v", err)
	}
	ids := testenv.ProgIDs(t, pin)
	if _, err := l.Cleanup(true); err != nil {
		t.Fatal(err)
	}
	testenv.AssertGone(t, pin, ids)
}

// attachUnderLoad starts a loader over the older state in pin (layout
// version) while a connect loop runs in ns, and fails the test if a connect
// is refused across the migration.
func attachUnderLoad(t *testing.T, ns testenv.Netns, pin, version string) *loader.Loader {
	t.Helper()
	var ok, failed atomic.Int64
	var lastErr atomic.Value
	stop := make(chan struct{})
	done := make(chan struct{})
	go func() {
		defer close(done)
		deadline := time.Now().Add(60 * time.Second)
		for i := 0; i < 100000 && time.Now().Before(deadline); i++ {
			select {
			case <-stop:
				return
			default:
			}
			if _, err := testenv.DialIn(ns.Target(), "tcp", "127.0.0.1:80", 2*time.Second); err != nil {
				failed.Add(1)
				lastErr.Store(err.Error())
			} else {
				ok.Add(1)
			}
		}
	}()
	waitFor(t, "connects before the migration", 20*time.Second, func() bool { return ok.Load() >= 50 })
	l, err := loader.Attach(pin, testenv.RootCgroup(t), quietLogger())
	if err != nil {
		close(stop)
		<-done
		t.Fatalf("attach over the version %s state: %v", version, err)
	}
	t.Cleanup(func() {
		_, _ = l.Cleanup(true)
		l.Close()
	})
	atMigration := ok.Load()
	waitFor(t, "connects after the migration", 20*time.Second, func() bool { return ok.Load() >= atMigration+50 })
	close(stop)
	<-done
	t.Logf("%d connects, %d refused, across the migration", ok.Load(), failed.Load())
	if failed.Load() != 0 {
		t.Errorf("%d connects refused across the migration (last: %v)", failed.Load(), lastErr.Load())
	}
	return l
}

func equalInts(a, b []int) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}
