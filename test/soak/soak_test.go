//go:build soak

// Package soak runs nsredirect daemons for minutes under connect load in 20
// namespaces while some daemons are SIGKILLed and restarted and namespaces
// come and go. Run with `sudo make soak` (NSREDIRECT_SOAK_DURATION, default
// 5m). It is built only with -tags soak, so `make test` stays short.
package soak

import (
	"context"
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/cilium/ebpf"

	"github.com/nsredirect/nsredirect/internal/bpfobj"
	"github.com/nsredirect/nsredirect/internal/loader"
	"github.com/nsredirect/nsredirect/internal/testenv"
)

type stats struct {
	fds        int
	rssKB      int
	threads    int
	goroutines int
	heapKB     int // Go heap in use
}

func procStats(t *testing.T, p *testenv.Proc, metricsURL string) stats {
	t.Helper()
	pid := p.Cmd.Process.Pid
	var s stats
	// Scrape first, so the scrape's own allocations are in both readings.
	if metricsURL != "" {
		c := net.Dialer{Timeout: 2 * time.Second}
		conn, err := c.Dial("tcp", strings.TrimPrefix(metricsURL, "http://"))
		if err == nil {
			fmt.Fprintf(conn, "GET /metrics HTTP/1.0\r\n\r\n")
			body := testenv.ReadAll(conn)
			conn.Close()
			s.goroutines = int(testenv.MetricValue(body, "go_goroutines "))
			s.heapKB = int(testenv.MetricValue(body, "go_memstats_heap_inuse_bytes ") / 1024)
		}
	}
	fds, _ := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
	s.fds = len(fds)
	status, _ := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	for _, line := range strings.Split(string(status), "\n") {
		f := strings.Fields(line)
		switch {
		case len(f) >= 2 && f[0] == "VmRSS:":
			s.rssKB, _ = strconv.Atoi(f[1])
		case len(f) >= 2 && f[0] == "Threads:":
			s.threads, _ = strconv.Atoi(f[1])
		}
	}
	return s
}

// serve listens on :3210 inside ns (the socket stays in the netns) and
// accepts until the test ends.
func serve(t *testing.T, ns testenv.Netns) net.Listener {
	var ln net.Listener
	if err := ns.Target().Do(func() error {
		var err error
		ln, err = net.Listen("tcp", ":3210")
		return err
	}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			c.Close()
		}
	}()
	return ln
}

func TestSoak(t *testing.T) {
	dur := 5 * time.Minute
	if v := os.Getenv("NSREDIRECT_SOAK_DURATION"); v != "" {
		d, err := time.ParseDuration(v)
		if err != nil {
			t.Fatalf("NSREDIRECT_SOAK_DURATION=%q: %v", v, err)
		}
		dur = d
	}
	pin := testenv.BPFFS(t)
	const stable, flappy = 10, 10
	nss := make([]testenv.Netns, stable+flappy)
	daemons := make([]*testenv.Proc, stable+flappy)
	urls := make([]string, stable)
	start := func(i int) *testenv.Proc {
		args := []string{"run", "--netns", nss[i].Path, "--redirect", "80=3210", "--remove-on-exit"}
		if i < stable {
			args = append(args, "--metrics-addr", "127.0.0.1:0")
		}
		return testenv.Daemon(t, pin, args...)
	}
	for i := range nss {
		nss[i] = testenv.NewNetns(t)
		serve(t, nss[i])
		daemons[i] = start(i)
		if i < stable {
			urls[i] = testenv.MetricsURL(t, daemons[i])
		}
	}

	ctx, cancel := context.WithTimeout(context.Background(), dur)
	defer cancel()
	var ok, failed atomic.Int64
	var wg sync.WaitGroup
	for i := range nss {
		wg.Add(1)
		go func() {
			defer wg.Done()
			_ = nss[i].Target().Do(func() error {
				for n := 0; n < 2_000_000 && ctx.Err() == nil; n++ {
					addr := "127.0.0.1:80"
					if n%2 == 1 {
						addr = "[::1]:80"
					}
					c, err := net.DialTimeout("tcp", addr, time.Second)
					if err != nil {
						if failed.Add(1) <= 5 {
							t.Logf("netns %d: connect %s: %v", i, addr, err)
						}
					} else {
						c.Close()
						ok.Add(1)
					}
					time.Sleep(2 * time.Millisecond)
				}
				return nil
			})
		}()
	}

	// The leak checks compare the stable daemons after a warm-up with the
	// end: a Go daemon's RSS climbs for its first minute while the heap and
	// the GC's goal settle (the 60-minute TestSoakMemory shows the plateau),
	// and that climb is not a leak. Churn runs through the warm-up too.
	warmup := time.Now().Add(min(time.Minute, dur/5))
	var before []stats
	sampleBefore := func() {
		before = make([]stats, stable)
		for i := range before {
			before[i] = procStats(t, daemons[i], urls[i])
		}
	}

	var kills, dropped int
	var orphans []string
	rng := rand.New(rand.NewPCG(1, 2))
	for ctx.Err() == nil {
		if before == nil && time.Now().After(warmup) {
			sampleBefore()
		}
		switch rng.IntN(3) {
		case 0, 1: // SIGKILL a daemon and restart it: its successor adopts
			i := stable + rng.IntN(flappy)
			daemons[i].Kill()
			daemons[i] = start(i)
			kills++
		case 2: // a netns that comes and goes
			ns := testenv.NewNetns(t)
			ln := serve(t, ns)
			d := testenv.Daemon(t, pin, "run", "--netns", ns.Path, "--redirect", "80=3210")
			if peer, err := ns.Dial("tcp", "127.0.0.1:80"); err != nil || peer != "127.0.0.1:80" {
				t.Errorf("ephemeral netns: %s %v", peer, err)
			}
			if rng.IntN(2) == 0 {
				// Deleted under a running daemon: it drops the rule itself.
				ns.Delete(t)
				ln.Close()
				deadline := time.Now().Add(5 * time.Second)
				for hasRow(t, pin, ns.Path) && time.Now().Before(deadline) {
					time.Sleep(50 * time.Millisecond)
				}
				if hasRow(t, pin, ns.Path) {
					t.Errorf("daemon kept the rule of deleted netns %s", ns.Path)
				}
				dropped++
				if err := d.Stop(syscall.SIGTERM, 5*time.Second); err != nil {
					t.Errorf("stop: %v", err)
				}
			} else {
				// The daemon dies first: an orphan for `cleanup` to collect.
				d.Kill()
				ns.Delete(t)
				ln.Close()
				orphans = append(orphans, ns.Path)
			}
		}
		select {
		case <-ctx.Done():
		case <-time.After(time.Duration(300+rng.IntN(700)) * time.Millisecond):
		}
	}
	wg.Wait()
	if before == nil {
		sampleBefore() // a run too short for the warm-up: compare with now
	}

	after := make([]stats, stable)
	for i := range after {
		after[i] = procStats(t, daemons[i], urls[i])
	}
	t.Logf("soak %s: %d connects ok, %d failed; %d kill -9 + restarts; %d netns deleted under a live daemon; %d orphaned",
		dur, ok.Load(), failed.Load(), kills, dropped, len(orphans))
	if failed.Load() != 0 {
		t.Errorf("%d connects failed in live netns; want 0", failed.Load())
	}
	t.Logf("%-8s %12s %16s %16s %12s %12s", "daemon", "fds", "rss KB", "heap KB", "threads", "goroutines")
	for i := range before {
		b, a := before[i], after[i]
		t.Logf("%-8d %5d -> %-4d %6d -> %-6d %6d -> %-6d %4d -> %-4d %4d -> %-4d", i, b.fds, a.fds, b.rssKB, a.rssKB, b.heapKB, a.heapKB, b.threads, a.threads, b.goroutines, a.goroutines)
		if a.fds > b.fds {
			t.Errorf("daemon %d: fds grew %d -> %d", i, b.fds, a.fds)
		}
		if a.goroutines > b.goroutines+3 {
			t.Errorf("daemon %d: goroutines grew %d -> %d", i, b.goroutines, a.goroutines)
		}
		if a.rssKB > b.rssKB+4096 {
			t.Errorf("daemon %d: RSS grew %d -> %d KB", i, b.rssKB, a.rssKB)
		}
	}

	// GC: what the restarted daemons did not collect already (a `run`
	// removes the handed-over records of netns proven gone when it starts),
	// `cleanup` does; nothing of a dead netns stays either way.
	rulesBefore := countEntries(t, pin)
	code, out, errOut := testenv.Run(t, nil, "cleanup", "--pin-dir", pin)
	byCleanup := -1
	if i := strings.LastIndex(out, "cleanup done:"); i >= 0 {
		if _, err := fmt.Sscanf(out[i:], "cleanup done: %d enrollment(s) removed", &byCleanup); err != nil {
			byCleanup = -1
		}
	}
	if code != 0 || byCleanup < 0 || byCleanup > len(orphans) {
		t.Errorf("cleanup: exit %d\n%s%s\nwant at most %d removed", code, out, errOut, len(orphans))
	}
	t.Logf("orphans: %d, of which %d collected by cleanup and the rest by the daemons that started after them", len(orphans), byCleanup)
	rows := testenv.Status(t, pin)
	if len(rows) != len(nss) {
		t.Errorf("after GC %d rules enrolled, want %d: %+v", len(rows), len(nss), rows)
	}
	for _, r := range rows {
		if !r.Alive {
			t.Errorf("rule of %s has a dead owner after the soak", r.Netns)
		}
	}
	for _, dead := range orphans {
		if hasRow(t, pin, dead) {
			t.Errorf("rule for dead netns %s survived GC", dead)
		}
	}
	if got, want := countEntries(t, pin), 6*len(nss); got != want {
		t.Errorf("nsr_rules holds %d entries after GC (%d before), want %d (6 per netns)", got, rulesBefore, want)
	}
	t.Logf("nsr_rules entries: %d before GC, %d after (20 netns x 6)", rulesBefore, countEntries(t, pin))

	for _, d := range daemons {
		if err := d.Stop(syscall.SIGTERM, 5*time.Second); err != nil {
			t.Errorf("stop: %v", err)
		}
	}
	if _, err := os.Stat(pin); !os.IsNotExist(err) {
		t.Errorf("pins left after every daemon stopped")
	}
}

func hasRow(t *testing.T, pin, name string) bool {
	for _, r := range testenv.Status(t, pin) {
		if r.Netns == name {
			return true
		}
	}
	return false
}

func countEntries(t *testing.T, pin string) int {
	t.Helper()
	m, err := ebpf.LoadPinnedMap(loader.MapPin(pin, bpfobj.RedirectMapNsrRules), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	n := 0
	var k, v []byte
	it := m.Iterate()
	for it.Next(&k, &v) {
		n++
	}
	return n
}
