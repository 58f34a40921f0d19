package docker

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/sirupsen/logrus"

	"github.com/nsredirect/nsredirect/internal/daemon"
	"github.com/nsredirect/nsredirect/internal/testenv"
	"github.com/nsredirect/nsredirect/internal/testenv/enginefake"
)

// fakeEngine is the fake Docker Engine of enginefake, for a test.
type fakeEngine struct{ *enginefake.Engine }

func newFakeEngine(t *testing.T, apiVersion string) fakeEngine {
	t.Helper()
	e, err := enginefake.Start(t.TempDir(), apiVersion)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = e.Close() })
	return fakeEngine{e}
}

// add puts a container that runs as pid (stopped: 0) with labels.
func (e fakeEngine) add(id, name string, pid int, labels map[string]string) {
	e.Put(enginefake.Container{ID: id, Name: name, Pid: pid, Labels: labels})
}

// recorder keeps every desired set the Watcher describes.
type recorder struct {
	mu    sync.Mutex
	calls [][]daemon.Target
}

func (r *recorder) add(ts []daemon.Target) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.calls = append(r.calls, ts)
}

// recording is a Watcher as daemon.Run's source whose descriptions rec
// keeps.
type recording struct {
	*Watcher
	rec *recorder
}

func (s recording) Desired(ctx context.Context) ([]daemon.Target, error) {
	ts, err := s.Watcher.Desired(ctx)
	if err == nil {
		s.rec.add(ts)
	}
	return ts, err
}

// noCookies reads no netns cookie: the targets of the fake Engine are not
// ours to enter, so none is enrolled.
func noCookies() (uint64, error) { return 0, errors.New("no netns cookies in this test") }

// waitFor waits until the latest desired set satisfies ok.
func (r *recorder) waitFor(t *testing.T, what string, ok func([]daemon.Target) bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for time.Now().Before(deadline) {
		r.mu.Lock()
		n := len(r.calls)
		var last []daemon.Target
		if n > 0 {
			last = r.calls[n-1]
		}
		r.mu.Unlock()
		if n > 0 && ok(last) {
			return
		}
		time.Sleep(5 * time.Millisecond)
	}
	t.Fatalf("no reconcile with %s; calls: %+v", what, r.calls)
}

func names(ts []daemon.Target) string {
	var s []string
	for _, t := range ts {
		s = append(s, t.Name)
	}
	return strings.Join(s, ",")
}

func quiet() logrus.FieldLogger {
	l := logrus.New()
	l.SetLevel(logrus.PanicLevel)
	return l
}

func TestNewRejectsNonUnixHosts(t *testing.T) {
	for _, h := range []string{"tcp://127.0.0.1:2375", "unix://relative.sock", "/var/run/docker.sock", ""} {
		if _, err := New(h); !errors.Is(err, ErrHost) || !strings.Contains(err.Error(), "unix:///") {
			t.Errorf("New(%q) = %v; want ErrHost naming the unix:/// form", h, err)
		}
	}
}

func TestNegotiateUsesOlderOfServerAndOurs(t *testing.T) {
	for _, tc := range []struct{ server, want string }{
		{"1.41", "1.41"},
		{"1.50", MaxAPIVersion},
		{MaxAPIVersion, MaxAPIVersion},
	} {
		e := newFakeEngine(t, tc.server)
		c, err := New("unix://" + e.Socket())
		if err != nil {
			t.Fatal(err)
		}
		if err := c.Negotiate(context.Background()); err != nil {
			t.Fatal(err)
		}
		if c.Version() != tc.want {
			t.Errorf("server %s: negotiated %s; want %s", tc.server, c.Version(), tc.want)
		}
		if _, err := c.Running(context.Background(), DefaultLabel); err != nil {
			t.Fatal(err)
		}
		paths, _ := e.Seen()
		if got := paths[len(paths)-1]; got != "/v"+tc.want+"/containers/json" {
			t.Errorf("server %s: listed at %s; want the negotiated version in the path", tc.server, got)
		}
	}
}

func TestNegotiateRefusesAncientEngineAndMissingSocket(t *testing.T) {
	e := newFakeEngine(t, "1.19")
	c, _ := New("unix://" + e.Socket())
	if err := c.Negotiate(context.Background()); err == nil || !strings.Contains(err.Error(), "upgrade Docker") {
		t.Errorf("API 1.19: %v; want a refusal saying to upgrade", err)
	}
	c, _ = New("unix://" + filepath.Join(t.TempDir(), "none.sock"))
	if err := c.Negotiate(context.Background()); !errors.Is(err, ErrHost) || !strings.Contains(err.Error(), "--docker-host") {
		t.Errorf("missing socket: %v; want ErrHost naming --docker-host", err)
	}
}

func TestDesiredTargets(t *testing.T) {
	e := newFakeEngine(t, "1.41")
	e.add("aaa", "backend", 1234, map[string]string{DefaultLabel: "80=3210, 443=3211"})
	e.add("bbb", "broken", 1235, map[string]string{DefaultLabel: "80=99999"})
	e.add("ccc", "plain", 1236, map[string]string{"other": "x"})
	e.add("ddd", "stopped", 0, map[string]string{DefaultLabel: "80=3210"})
	e.add("fff", "hostnet", 1237, map[string]string{DefaultLabel: "80=3210"})
	e.Update("fff", func(c *enginefake.Container) { c.NetworkMode = "host" })
	c, _ := New("unix://" + e.Socket())
	if err := c.Negotiate(context.Background()); err != nil {
		t.Fatal(err)
	}
	got, err := NewWatcher(c, DefaultLabel, quiet()).Desired(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if names(got) != "backend,broken,hostnet" {
		t.Fatalf("targets %q; want backend,broken,hostnet (not the unlabelled or stopped ones)", names(got))
	}
	if got[2].Err == nil || !strings.Contains(got[2].Err.Error(), "host network namespace") {
		t.Errorf("host-network target error = %v; want a refusal", got[2].Err)
	}
	b := got[0]
	if b.Err != nil || b.Netns.Spec != "pid:1234" || b.Netns.Path != "/proc/1234/ns/net" || len(b.Rules) != 2 || b.Rules[1].String() != "443=3211" {
		t.Errorf("backend target %+v", b)
	}
	if got[1].Err == nil || !strings.Contains(got[1].Err.Error(), `container broken: label nsredirect.redirect="80=99999"`) {
		t.Errorf("broken target error = %v; want it to name the container and label", got[1].Err)
	}
	_, filters := e.Seen()
	if !strings.Contains(filters[0], `"label":["nsredirect.redirect"]`) || !strings.Contains(filters[0], `"status":["running"]`) {
		t.Errorf("list filters %s", filters[0])
	}
}

func TestRunRelistsOnEventsAndReconnect(t *testing.T) {
	e := newFakeEngine(t, "1.41")
	e.add("aaa", "backend", 1234, map[string]string{DefaultLabel: "80=3210"})
	c, _ := New("unix://" + e.Socket())
	if err := c.Negotiate(context.Background()); err != nil {
		t.Fatal(err)
	}
	w := NewWatcher(c, DefaultLabel, quiet())
	w.BackoffMin, w.BackoffMax = 10*time.Millisecond, 50*time.Millisecond
	rec := &recorder{}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() {
		done <- daemon.Run(ctx, recording{w, rec}, daemon.Config{Kernel: testenv.NewFakeKernel(), Cookies: noCookies, Owner: "docker", Resync: time.Hour, Log: quiet()})
	}()

	// Subscribing lists once.
	rec.waitFor(t, "backend", func(ts []daemon.Target) bool { return names(ts) == "backend" })
	// The container restarts: new pid, an event.
	e.add("aaa", "backend", 2222, map[string]string{DefaultLabel: "80=3210"})
	ev := Event{Type: "container", Action: "restart"}
	ev.Actor.Attributes = map[string]string{DefaultLabel: "80=3210", "name": "backend"} // engines send the labels
	e.Send(ev)
	rec.waitFor(t, "backend at its new pid", func(ts []daemon.Target) bool {
		return len(ts) == 1 && ts[0].Netns.Spec == "pid:2222"
	})
	// The stream breaks; meanwhile the container goes and another comes.
	e.Remove("aaa")
	e.add("eee", "late", 3333, map[string]string{DefaultLabel: "81=3210"})
	e.DropStream()
	rec.waitFor(t, "the relisting after reconnect", func(ts []daemon.Target) bool { return names(ts) == "late" })

	_, filters := e.Seen()
	var evFilter string
	for _, f := range filters {
		if strings.Contains(f, `"type"`) {
			evFilter = f
		}
	}
	// Only the type: label and action are checked on our side
	// (TestEventsPodmanFilters says why).
	if evFilter != `{"type":["container"]}` {
		t.Errorf("event filters %s; want only the container type", evFilter)
	}
	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Errorf("daemon.Run returned %v after cancel; want nil", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("daemon.Run did not return after cancel")
	}
}

func TestWatchRetriesWhileEngineIsDown(t *testing.T) {
	dir := t.TempDir()
	c, _ := New("unix://" + filepath.Join(dir, "later.sock"))
	w := NewWatcher(c, DefaultLabel, quiet())
	w.BackoffMin, w.BackoffMax = 10*time.Millisecond, 40*time.Millisecond
	rec := &recorder{}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	// Watch alone: daemon.Run would end on the first failed listing, and
	// the cli negotiates with Docker before it starts.
	go func() {
		_ = w.Watch(ctx, func() {
			if ts, err := w.Desired(ctx); err == nil {
				rec.add(ts)
			}
		})
	}()
	time.Sleep(100 * time.Millisecond) // several failed attempts
	// The Engine comes up at that path.
	e := newFakeEngine(t, "1.41")
	e.add("aaa", "backend", 1234, map[string]string{DefaultLabel: "80=3210"})
	if err := os.Rename(e.Socket(), filepath.Join(dir, "later.sock")); err != nil {
		t.Fatal(err)
	}
	rec.waitFor(t, "backend once the Engine is up", func(ts []daemon.Target) bool { return names(ts) == "backend" })
}

func TestSharedNetnsEnrolledOnce(t *testing.T) {
	e := newFakeEngine(t, "1.41")
	// Two containers whose pids are in one netns (ours), as with
	// network_mode: container:X.
	e.add("aaa", "app", os.Getpid(), map[string]string{DefaultLabel: "80=3210"})
	e.add("bbb", "sidecar", os.Getppid(), map[string]string{DefaultLabel: "81=3210"})
	c, _ := New("unix://" + e.Socket())
	if err := c.Negotiate(context.Background()); err != nil {
		t.Fatal(err)
	}
	got, err := NewWatcher(c, DefaultLabel, quiet()).Desired(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != 2 || got[0].Err != nil || got[1].Err == nil || !strings.Contains(got[1].Err.Error(), "shares its network namespace with app") {
		t.Fatalf("targets %+v; want app enrolled and sidecar refused for sharing its netns", got)
	}
}

// TestDesiredInspectsOnlyWhatChanged: a listing inspects the containers it
// has not seen and the ones an event named, not every container each time
// (issue 14: 200 inspects per event at 200 containers).
func TestDesiredInspectsOnlyWhatChanged(t *testing.T) {
	e := newFakeEngine(t, "1.41")
	pid := os.Getpid() // a pid that exists, as a running container's does
	e.add("aaa", "a", pid, map[string]string{DefaultLabel: "80=3210"})
	e.add("bbb", "b", pid, map[string]string{DefaultLabel: "80=3210"})
	c, _ := New("unix://" + e.Socket())
	if err := c.Negotiate(context.Background()); err != nil {
		t.Fatal(err)
	}
	w := NewWatcher(c, DefaultLabel, quiet())
	inspects := func() int {
		paths, _ := e.Seen()
		n := 0
		for _, p := range paths {
			if strings.HasSuffix(p, "/json") && !strings.HasSuffix(p, "/containers/json") {
				n++
			}
		}
		return n
	}
	step := func(what string, want int) {
		t.Helper()
		before := inspects()
		got, err := w.Desired(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		if n := inspects() - before; n != want {
			t.Errorf("%s: %d inspects, want %d", what, n, want)
		}
		if len(got) != e.Len() {
			t.Errorf("%s: %d targets, want %d", what, len(got), e.Len())
		}
	}
	step("first listing", 2)
	step("nothing changed", 0)
	w.invalidate("aaa")
	step("an event named aaa", 1)
	e.add("ccc", "c", pid, map[string]string{DefaultLabel: "80=3210"})
	step("a new container", 1)
	w.invalidate("")
	step("the stream reconnected", 3)
}
