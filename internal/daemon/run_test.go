package daemon

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/sirupsen/logrus"
	"github.com/sirupsen/logrus/hooks/test"
	"golang.org/x/sys/unix"

	"github.com/nsredirect/nsredirect/internal/loader"
	"github.com/nsredirect/nsredirect/internal/metrics"
	"github.com/nsredirect/nsredirect/internal/netnsx"
	"github.com/nsredirect/nsredirect/internal/testenv"
)

func pidTarget(t *testing.T, pid int) netnsx.Target {
	t.Helper()
	tg, err := netnsx.ParseTarget(fmt.Sprintf("pid:%d", pid))
	if err != nil {
		t.Fatal(err)
	}
	return tg
}

// TestHostNetnsRefusedByIdentity: a target whose netns is the host's is
// refused whatever path reaches it (self, a process of the host such as
// kthreadd or the parent of this test): counted, named, nothing enrolled. With
// AllowHostNetns it is enrolled.
func TestHostNetnsRefusedByIdentity(t *testing.T) {
	testenv.Privileged(t)
	self, _ := netnsx.ParseTarget("self")
	kthreadd, _ := netnsx.ParseTarget("/proc/2/ns/net")
	for _, tg := range []netnsx.Target{self, kthreadd, pidTarget(t, os.Getppid())} {
		k := newFake()
		d := New(k, testenv.Cookies(t), Options{Owner: "docker", Log: quiet()})
		err := d.Reconcile([]Target{{Name: "h", Kind: "container", Netns: tg, Rules: rules(t, "80=3210")}})
		if !errors.Is(err, ErrHostNetns) || !strings.Contains(err.Error(), "container h") || !strings.Contains(err.Error(), "host network namespace") {
			t.Errorf("target %s: Reconcile = %v; want a refusal naming container h and the host network namespace", tg, err)
		}
		if len(k.Enrolled) != 0 || d.Snapshot().EnrollErrors["h"] != 1 {
			t.Errorf("target %s: enrolled %v, errors %v; want nothing enrolled and one error", tg, k.Enrolled, d.Snapshot().EnrollErrors)
		}
		if !errors.Is(d.Failures()["h"], ErrHostNetns) {
			t.Errorf("target %s: Failures = %v", tg, d.Failures())
		}
	}
	k := newFake()
	d := New(k, testenv.Cookies(t), Options{Owner: "run", Log: quiet(), AllowHostNetns: true})
	if err := d.Reconcile([]Target{{Name: "h", Netns: self, Rules: rules(t, "80=3210")}}); err != nil || len(k.Enrolled) != 1 {
		t.Errorf("AllowHostNetns: %v, enrolled %v; want enrolled", err, k.Enrolled)
	}
}

// TestFailedLookupKeepsLiveNetns: the process a target's netns was found
// through exits while the netns lives on: the rules stay (and the source is
// asked to describe the target again); once nothing reaches the netns any
// more they are removed.
func TestFailedLookupKeepsLiveNetns(t *testing.T) {
	ns := testenv.NewNetns(t)
	p := testenv.Sleeper(t, ns)
	k := newFake()
	d := New(k, testenv.Cookies(t), Options{Owner: "kube", Log: quiet()})
	want := []Target{{Name: "shop/web", Kind: "pod", Netns: pidTarget(t, p.Cmd.Process.Pid), Rules: rules(t, "80=3210")}}
	if err := d.Reconcile(want); err != nil {
		t.Fatal(err)
	}
	cookie := ns.Cookie(t)
	d.TakeStale()
	p.Kill()
	_ = d.Reconcile(want)
	k.Lock()
	_, kept := k.Enrolled[cookie]
	k.Unlock()
	if !kept {
		t.Fatal("rules removed after one failed lookup while /run/netns still holds the netns")
	}
	if !d.TakeStale() {
		t.Error("a target that did not resolve did not ask for a new description")
	}
	ns.Delete(t)
	_ = d.Reconcile(want)
	if _, still := k.Enrolled[cookie]; still {
		t.Error("rules kept after the netns is gone (nothing reaches it)")
	}
}

// TestPendingIsNotAnError: a target its source says is not there yet (a
// pod's sandbox being re-created) is logged at info, not counted, and does
// not remove rules of a netns that lives.
func TestPendingIsNotAnError(t *testing.T) {
	ns := testenv.NewNetns(t)
	k := newFake()
	log, hook := test.NewNullLogger()
	d := New(k, testenv.Cookies(t), Options{Owner: "kube", Log: log})
	if err := d.Reconcile([]Target{{Name: "shop/web", Netns: ns.Target(), Rules: rules(t, "80=3210")}}); err != nil {
		t.Fatal(err)
	}
	pending := fmt.Errorf("pod shop/web: no process of the pod found (%w)", ErrPending)
	for range 3 {
		_ = d.Reconcile([]Target{{Name: "shop/web", Err: pending}})
	}
	if n := d.Snapshot().EnrollErrors["shop/web"]; n != 0 {
		t.Errorf("pending target counted %d enroll errors; want 0", n)
	}
	for _, e := range hook.AllEntries() {
		if e.Level <= logrus.WarnLevel {
			t.Errorf("logged at %s: %s %v", e.Level, e.Message, e.Data)
		}
	}
	if _, kept := k.Enrolled[ns.Cookie(t)]; !kept {
		t.Error("a pending target's live netns lost its rules")
	}
}

// attachedFake is a fake loader for Run.
type attachedFake struct {
	*fakeKernel
	mu     sync.Mutex
	heal   [][]string // what each Heal call returns, in turn
	closed bool
	// orphans are the records RemoveWhere is offered; what match selects
	// goes to removed, and orphaned is closed.
	orphans  []loader.Record
	removed  []loader.Record
	orphaned chan struct{}
}

func (a *attachedFake) Intact() error { return nil }
func (a *attachedFake) Heal(string) ([]string, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if len(a.heal) == 0 {
		return nil, nil
	}
	h := a.heal[0]
	a.heal = a.heal[1:]
	return h, nil
}
func (a *attachedFake) Fill() ([]metrics.MapFill, error) {
	return []metrics.MapFill{{Map: "rules", Entries: 3, Capacity: 65536}, {Map: "enrollments", Entries: 1, Capacity: 16384}}, nil
}
func (a *attachedFake) PeerStorageFailures() (uint64, error) { return 7, nil }
func (a *attachedFake) Records() ([]loader.Record, error)    { return nil, nil }
func (a *attachedFake) RemoveAllIfUnused() (bool, error)     { return true, nil }
func (a *attachedFake) StartupRepairs() []string             { return nil }
func (a *attachedFake) Close() error                         { a.closed = true; return nil }
func (a *attachedFake) RemoveWhere(match func(loader.Record) bool) ([]loader.Record, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	var removed []loader.Record
	for _, r := range a.orphans {
		if match(r) {
			removed = append(removed, r)
		}
	}
	a.removed = removed
	if a.orphaned != nil {
		close(a.orphaned)
	}
	return removed, nil
}

// listed is a discovery source whose listing never changes.
type listed []Target

func (l listed) Desired(context.Context) ([]Target, error) { return l, nil }
func (listed) Watch(ctx context.Context, _ func()) error {
	<-ctx.Done()
	return nil
}
func (listed) Policy() Policy { return Policy{} }

// TestOrphansClaimedByID: a record a predecessor handed over is claimed by
// the target with its stable ID, not by a name: a container recreated under
// the same name (new ID) whose enrollment fails this time must not keep the
// old container's rules, and a record of the same container is kept.
func TestOrphansClaimedByID(t *testing.T) {
	ns := testenv.NewNetns(t)
	k := &attachedFake{fakeKernel: newFake(), orphaned: make(chan struct{}), orphans: []loader.Record{
		{Enrollment: loader.Enrollment{Cookie: 1, Name: "web", ID: "old-container", Owner: "docker"}},
		{Enrollment: loader.Enrollment{Cookie: 2, Name: "web", ID: "new-container", Owner: "docker"}},
		{Enrollment: loader.Enrollment{Cookie: 3, Name: "web", Owner: "docker"}}, // layout 1: no ID
		{Enrollment: loader.Enrollment{Cookie: 4, Name: "gone", Owner: "kube"}},  // another mode's
		{Enrollment: loader.Enrollment{Cookie: 5, Name: "gone", Owner: "docker"}, OwnerAlive: true},
	}}
	k.Fail["web"] = errors.New("map full")
	log, _ := test.NewNullLogger()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	src := listed{{Name: "web", ID: "new-container", Netns: ns.Target(), Rules: rules(t, "80=3210")}}
	go func() {
		done <- Run(ctx, src, Config{Kernel: k, Cookies: testenv.Cookies(t), Owner: "docker", Resync: time.Hour, Log: log})
	}()
	select {
	case <-k.orphaned:
	case <-time.After(30 * time.Second):
		t.Fatal("RemoveWhere was not called within 30s")
	}
	cancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	k.mu.Lock()
	defer k.mu.Unlock()
	var got []uint64
	for _, r := range k.removed {
		got = append(got, r.Cookie)
	}
	if fmt.Sprint(got) != "[1]" {
		t.Errorf("removed the records with cookies %v; want [1] (the old container's), keeping the same container's, the one without an ID that the name claims, another mode's and a live owner's", got)
	}
}

func scrape(t *testing.T, addr string) string {
	t.Helper()
	resp, err := http.Get("http://" + addr + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return string(b)
}

// TestRunHealsAndExports: Run calls Heal on every resync, logs and counts
// each link it re-created per hook, and exports the map fill levels and the
// peer-storage failures; on shutdown Fixed hands over unless RemoveOnExit.
func TestRunHealsAndExports(t *testing.T) {
	ns := testenv.NewNetns(t)
	for _, removeOnExit := range []bool{false, true} {
		k := &attachedFake{fakeKernel: newFake(), heal: [][]string{nil, {"connect4"}}}
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		log := logrus.New()
		log.SetOutput(io.Discard)
		// Widens the window between the repair's log call and its entry
		// being recorded: were the repair counted first, the scrape below
		// would see the count with the entry still missing.
		log.AddHook(slowHook{})
		hook := test.NewLocal(log)
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan error, 1)
		src := Fixed{Targets: []Target{{Name: "n", Netns: ns.Target(), Rules: rules(t, "80=3210")}}, RemoveOnExit: removeOnExit}
		go func() {
			done <- Run(ctx, src, Config{Kernel: k, Cookies: testenv.Cookies(t), Owner: "run", Resync: 20 * time.Millisecond, Metrics: ln, Log: log})
		}()
		var body string
		testenv.WaitFor(t, "a link repair counted", 10*time.Second, func() bool {
			body = scrape(t, ln.Addr().String())
			return strings.Contains(body, `nsredirect_link_repairs_total{hook="connect4"} 1`)
		})
		for _, want := range []string{`nsredirect_map_entries{map="rules"} 3`, `nsredirect_map_capacity{map="rules"} 65536`, `nsredirect_peer_storage_failures_total 7`} {
			if !strings.Contains(body, want) {
				t.Errorf("metrics lack %s", want)
			}
		}
		// The count is made after the log line (runner.repaired); seen
		// the count, the line must be there already: no wait.
		logged := false
		for _, e := range hook.AllEntries() {
			if e.Data["hook"] == "connect4" && strings.Contains(e.Message, "re-created") {
				logged = true
			}
		}
		if !logged {
			t.Error("the repair was counted before it was logged")
		}
		cancel()
		if err := <-done; err != nil {
			t.Fatal(err)
		}
		k.Lock()
		_, kept := k.Enrolled[ns.Cookie(t)]
		released := k.Released[ns.Cookie(t)]
		k.Unlock()
		if kept == removeOnExit || released == removeOnExit || !k.closed {
			t.Errorf("RemoveOnExit=%v: rules kept %v, released %v, closed %v", removeOnExit, kept, released, k.closed)
		}
	}
}

// slowHook delays the log entries of link repairs.
type slowHook struct{}

func (slowHook) Levels() []logrus.Level { return []logrus.Level{logrus.WarnLevel} }
func (slowHook) Fire(e *logrus.Entry) error {
	if e.Data["hook"] != nil {
		time.Sleep(100 * time.Millisecond)
	}
	return nil
}

// TestBadTargetDropsRules: a target its source now describes as wrong (an
// annotation edited into garbage) loses its rules at once, netns alive or
// not; one it could not look up keeps them.
func TestBadTargetDropsRules(t *testing.T) {
	ns := testenv.NewNetns(t)
	k := newFake()
	d := New(k, testenv.Cookies(t), Options{Owner: "kube", Log: quiet()})
	good := []Target{{Name: "p", Netns: ns.Target(), Rules: rules(t, "80=3210")}}
	if err := d.Reconcile(good); err != nil {
		t.Fatal(err)
	}
	cookie := ns.Cookie(t)
	_ = d.Reconcile([]Target{{Name: "p", Err: fmt.Errorf("%w: read /host/proc: permission denied", ErrLookup)}})
	if _, kept := k.Enrolled[cookie]; !kept {
		t.Error("a failed lookup removed the rules of a live netns")
	}
	_ = d.Reconcile([]Target{{Name: "p", Err: errors.New(`annotation "80=x" does not parse`)}})
	if _, kept := k.Enrolled[cookie]; kept {
		t.Error("a bad annotation kept the old rules")
	}
}

// TestReusedPidNotFollowed: the process a target's /proc path went through
// is gone and its pid belongs to another process (another netns) now: that
// one is never enrolled; the source is asked to describe the target again.
func TestReusedPidNotFollowed(t *testing.T) {
	a, b := testenv.NewNetns(t), testenv.NewNetns(t)
	pa, pb := testenv.Sleeper(t, a), testenv.Sleeper(t, b)
	// A proc-like root whose entry 100 leads to pa, then to pb, as a
	// reused pid would: a new directory (a new inode, as procfs gives a new
	// process) whose stat gives each its own start time.
	root := t.TempDir()
	dir := root + "/100"
	point := func(p *testenv.Proc, start int) {
		if _, err := os.Stat(dir); err == nil {
			// Kept aside, so its inode number is not handed out again.
			if err := os.Rename(dir, fmt.Sprintf("%s/gone-%d", root, start)); err != nil {
				t.Fatal(err)
			}
		}
		if err := os.MkdirAll(dir+"/ns", 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.Symlink(fmt.Sprintf("/proc/%d/ns/net", p.Cmd.Process.Pid), dir+"/ns/net"); err != nil {
			t.Fatal(err)
		}
		stat := fmt.Sprintf("100 (sleep) S 1 1 1 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 %d 0 0\n", start)
		if err := os.WriteFile(dir+"/stat", []byte(stat), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	point(pa, 1000)
	tg, _ := netnsx.ParseTarget(dir + "/ns/net")
	k := newFake()
	d := New(k, testenv.Cookies(t), Options{Owner: "docker", Log: quiet()})
	want := []Target{{Name: "web", Kind: "container", Netns: tg, Rules: rules(t, "80=3210")}}
	if err := d.Reconcile(want); err != nil {
		t.Fatal(err)
	}
	d.TakeStale()
	point(pb, 2000)
	if err := d.Reconcile(want); err == nil || !strings.Contains(err.Error(), "another process") {
		t.Errorf("Reconcile = %v; want the reused pid refused", err)
	}
	if _, wrong := k.Enrolled[b.Cookie(t)]; wrong {
		t.Error("the netns of the process that took the pid was enrolled")
	}
	if !d.TakeStale() {
		t.Error("the source was not asked to describe the target again")
	}
}

// TestExitOfWatchedProcessTold: the process a /proc/PID/ns/net target goes
// through is watched through a pidfd once enrolled; its exit is told on
// Exited (the run loop then asks its source again) with no probe.
func TestExitOfWatchedProcessTold(t *testing.T) {
	ns := testenv.NewNetns(t)
	p := testenv.Sleeper(t, ns)
	tg, err := netnsx.ParseTarget(fmt.Sprintf("pid:%d", p.Cmd.Process.Pid))
	if err != nil {
		t.Fatal(err)
	}
	d := New(newFake(), testenv.Cookies(t), Options{Owner: "docker", Log: quiet()})
	if err := d.Reconcile([]Target{{Name: "web", Kind: "container", Netns: tg, Rules: rules(t, "80=3210")}}); err != nil {
		t.Fatal(err)
	}
	defer func() { _ = d.Shutdown(false) }()
	if d.Moved() {
		t.Fatal("Moved while the process lives")
	}
	select {
	case <-d.Changed():
		t.Fatal("an exit told while the process lives")
	default:
	}
	p.Kill()
	select {
	case <-d.Changed():
	case <-time.After(10 * time.Second): // bounds a hang only
		t.Fatal("the exit of the target's process was not told")
	}
	if !d.Moved() {
		t.Error("Moved is false once the watched process is gone")
	}
}

// TestSameNetnsThroughNewPathFollowed: a target that resolves to the same
// netns through another path (a container sharing another's netns restarted
// with a new pid) is looked at through the new path from then on; the old
// path, gone, would otherwise make every probe ask for a new description.
func TestSameNetnsThroughNewPathFollowed(t *testing.T) {
	ns := testenv.NewNetns(t)
	first, second := testenv.Sleeper(t, ns), testenv.Sleeper(t, ns)
	target := func(p *testenv.Proc) []Target {
		tg, err := netnsx.ParseTarget(fmt.Sprintf("pid:%d", p.Cmd.Process.Pid))
		if err != nil {
			t.Fatal(err)
		}
		return []Target{{Name: "web", Kind: "container", Netns: tg, Rules: rules(t, "80=3210")}}
	}
	d := New(newFake(), testenv.Cookies(t), Options{Owner: "docker", Log: quiet()})
	defer func() { _ = d.Shutdown(false) }()
	if err := d.Reconcile(target(first)); err != nil {
		t.Fatal(err)
	}
	if err := d.Reconcile(target(second)); err != nil {
		t.Fatal(err)
	}
	first.Kill()
	if d.Moved() {
		t.Error("Moved after the old path's process exited: the target is still looked at through it")
	}
	if got := d.Serving(); len(got) != 1 {
		t.Errorf("serving %v; want the one target", got)
	}
}

// TestSettled: a daemon is settled when every desired target is enrolled or
// failing for a reason of its own (a bad label); a failed lookup, a target
// not there yet or one that cannot be enrolled unsettles it.
func TestSettled(t *testing.T) {
	ns := testenv.NewNetns(t)
	d := New(newFake(), testenv.Cookies(t), Options{Owner: "kube", Log: quiet()})
	defer func() { _ = d.Shutdown(false) }()
	good := Target{Name: "good", Netns: ns.Target(), Rules: rules(t, "80=3210")}
	for _, c := range []struct {
		what    string
		others  []Target
		settled bool
	}{
		{"every target enrolled", nil, true},
		{"a bad label", []Target{{Name: "bad", Err: errors.New(`annotation "80=x" does not parse`)}}, true},
		{"a failed lookup", []Target{{Name: "lookup", Err: fmt.Errorf("%w: read /host/proc: permission denied", ErrLookup)}}, false},
		{"not there yet", []Target{{Name: "pending", Err: fmt.Errorf("no process yet (%w)", ErrPending)}}, false},
		{"a netns that does not resolve", []Target{{Name: "gone", Netns: netnsx.Target{Spec: "/nonexistent", Path: "/nonexistent"}, Rules: rules(t, "80=3210")}}, false},
	} {
		_ = d.Reconcile(append([]Target{good}, c.others...))
		d.TakeStale() // the resync that follows has asked its source again
		if got := d.Settled(); got != c.settled {
			t.Errorf("with %s: Settled = %v, want %v", c.what, got, c.settled)
		}
	}
}

// TestBindMountTargetWatched: a bind-mount target (/run/netns/NAME) is not
// probed: the watch of the mount table tells when it is unmounted and
// mounted again over another netns (ip netns del, ip netns add), and the
// next reconcile follows it there.
func TestBindMountTargetWatched(t *testing.T) {
	a, b := testenv.NewNetns(t), testenv.NewNetns(t)
	path := filepath.Join(t.TempDir(), "ns")
	if err := os.WriteFile(path, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	bind := func(n testenv.Netns) {
		t.Helper()
		if err := unix.Mount(n.Path, path, "", unix.MS_BIND, ""); err != nil {
			t.Fatalf("bind %s at %s: %v", n.Path, path, err)
		}
	}
	bind(a)
	t.Cleanup(func() {
		for unix.Unmount(path, unix.MNT_DETACH) == nil {
		}
	})
	tg, err := netnsx.ParseTarget(path)
	if err != nil {
		t.Fatal(err)
	}
	k := newFake()
	d := New(k, testenv.Cookies(t), Options{Owner: "run", Log: quiet()})
	defer func() { _ = d.Shutdown(false) }()
	want := []Target{{Name: path, Netns: tg, Rules: rules(t, "80=3210")}}
	if err := d.Reconcile(want); err != nil {
		t.Fatal(err)
	}
	for drained := false; !drained; { // the watch's first look, at no change
		select {
		case <-d.Changed():
		case <-time.After(200 * time.Millisecond):
			drained = true
		}
	}
	if err := unix.Unmount(path, 0); err != nil {
		t.Fatal(err)
	}
	bind(b)
	select {
	case <-d.Changed():
	case <-time.After(10 * time.Second): // bounds a hang only
		t.Fatal("the netns mounted anew under the target's path was not told")
	}
	if d.Moved() {
		t.Error("the probe looked at a bind-mount target the mount table's watch covers")
	}
	if err := d.Reconcile(want); err != nil {
		t.Fatal(err)
	}
	k.Lock()
	_, old := k.Enrolled[a.Cookie(t)]
	_, followed := k.Enrolled[b.Cookie(t)]
	k.Unlock()
	if old || !followed {
		t.Errorf("after the re-mount: old netns enrolled %v, new one %v; want only the new one", old, followed)
	}
}
