// Named to sort after docker_test.go: these tests enter namespaces, which can
// leave the main thread in one (see netnsx.Target), and TestSharedNetnsEnrolledOnce
// relies on this process being in the host netns.

package docker

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/sirupsen/logrus"
	"github.com/sirupsen/logrus/hooks/test"

	"github.com/nsredirect/nsredirect/internal/daemon"
	"github.com/nsredirect/nsredirect/internal/loader"
	"github.com/nsredirect/nsredirect/internal/netnsx"
	"github.com/nsredirect/nsredirect/internal/testenv"
	"github.com/nsredirect/nsredirect/internal/testenv/enginefake"
)

// ownNetns starts a process in a netns of its own, held by it alone (as a
// container's is), and returns it with that netns's cookie.
func ownNetns(t *testing.T) (*testenv.Proc, uint64) {
	t.Helper()
	p := testenv.Start(t, exec.Command("unshare", "-n", "sleep", "60"))
	pid := p.Cmd.Process.Pid
	deadline := time.Now().Add(10 * time.Second) // caps a hang only
	for {
		exe, _ := os.Readlink(fmt.Sprintf("/proc/%d/exe", pid))
		if strings.HasSuffix(exe, "/sleep") {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("pid %d never ran sleep", pid)
		}
		time.Sleep(5 * time.Millisecond)
	}
	tg, _ := netnsx.ParseTarget(fmt.Sprintf("pid:%d", pid))
	cookie, _, err := tg.ResolveWith(testenv.Cookies(t))
	if err != nil {
		t.Fatal(err)
	}
	return p, cookie
}

// runDaemon runs daemon.Run with w as its source on a real loader, until
// the test ends; it returns the metrics address and a reader of the
// pinned records.
func runDaemon(t *testing.T, w *Watcher, log logrus.FieldLogger) (string, func() map[uint64]loader.Record) {
	t.Helper()
	pin := testenv.BPFFS(t)
	cg := testenv.RootCgroup(t)
	kernel, err := loader.Attach(pin, cg, log)
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() {
		done <- daemon.Run(ctx, w, daemon.Config{Kernel: kernel, Cookies: testenv.Cookies(t), Owner: "docker", Cgroup: cg, Metrics: ln, Log: log})
	}()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("daemon: %v", err)
		}
	})
	records := func() map[uint64]loader.Record {
		l, err := loader.OpenPinned(pin, log)
		if err != nil {
			return nil
		}
		defer l.Close()
		recs, _ := l.Records()
		out := map[uint64]loader.Record{}
		for _, r := range recs {
			out[r.Cookie] = r
		}
		return out
	}
	return ln.Addr().String(), records
}

func newTestWatcher(t *testing.T, e fakeEngine, log logrus.FieldLogger) *Watcher {
	t.Helper()
	c, _ := New("unix://" + e.Socket())
	if err := c.Negotiate(context.Background()); err != nil {
		t.Fatal(err)
	}
	w := NewWatcher(c, DefaultLabel, log)
	w.Relist = time.Hour // no safety-net listing: only the daemon's own wake-ups
	return w
}

// TestRestartWithoutEventFollowed is Podman's `restart`: the container
// gets a new pid and netns and no usable event comes. The old pid no longer
// resolves, which makes the daemon ask the source again: the new netns is
// enrolled within the next resync (1 s), the old one's rules removed.
func TestRestartWithoutEventFollowed(t *testing.T) {
	first, oldCookie := ownNetns(t)
	e := newFakeEngine(t, "1.41")
	e.add("aaa", "web", first.Cmd.Process.Pid, map[string]string{DefaultLabel: "80=3210"})
	_, records := runDaemon(t, newTestWatcher(t, e, quiet()), quiet())
	waitRecords(t, records, "the first netns enrolled", func(m map[uint64]loader.Record) bool { return m[oldCookie].Name == "web" })

	second, newCookie := ownNetns(t)
	e.add("aaa", "web", second.Cmd.Process.Pid, map[string]string{DefaultLabel: "80=3210"})
	restarted := time.Now()
	first.Kill()
	waitRecords(t, records, "the restarted container's netns enrolled", func(m map[uint64]loader.Record) bool {
		_, old := m[oldCookie]
		return m[newCookie].Name == "web" && !old
	})
	t.Logf("restart with no event followed in %s", time.Since(restarted).Round(time.Millisecond))
}

func waitRecords(t *testing.T, records func() map[uint64]loader.Record, what string, ok func(map[uint64]loader.Record) bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second) // caps a hang only
	for !ok(records()) {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s; records %+v", what, records())
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// TestChainedHostNetnsRefused: a labelled container whose netns is the
// host's without network_mode: host (container: of a container that shares
// the host's) is refused by netns identity: a log line naming it and the
// host network namespace, an enroll error, nothing in the maps; a
// container beside it is enrolled.
func TestChainedHostNetnsRefused(t *testing.T) {
	good, goodCookie := ownNetns(t)
	e := newFakeEngine(t, "1.41")
	e.add("aaa", "app", good.Cmd.Process.Pid, map[string]string{DefaultLabel: "80=3210"})
	// Our parent runs in the host's netns: the pid such a container shows.
	e.add("bbb", "chained", os.Getppid(), map[string]string{DefaultLabel: "80=3210"})
	e.Update("bbb", func(c *enginefake.Container) { c.NetworkMode = "container:ccc" })
	log, hook := test.NewNullLogger()
	addr, records := runDaemon(t, newTestWatcher(t, e, log), log)
	waitRecords(t, records, "app enrolled", func(m map[uint64]loader.Record) bool { return m[goodCookie].Name == "app" })
	if recs := records(); len(recs) != 1 {
		t.Errorf("records %+v; want app's only", recs)
	}
	resp, err := http.Get("http://" + addr + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if !strings.Contains(string(body), `nsredirect_enroll_errors_total{netns="chained"} 1`) {
		t.Errorf("no enroll error counted for the chained container:\n%s", body)
	}
	found := false
	for _, en := range hook.AllEntries() {
		if msg := fmt.Sprint(en.Data[logrus.ErrorKey]); en.Level == logrus.ErrorLevel && strings.Contains(msg, "container chained") && strings.Contains(msg, "host network namespace") {
			found = true
		}
	}
	if !found {
		t.Error("no error log naming container chained and the host network namespace")
	}
}
