//go:build soak

package soak

import (
	"context"
	"net"
	"os"
	"testing"
	"time"

	"github.com/nsredirect/nsredirect/internal/testenv"
)

// TestSoakMemory is the light soak that tells a plateau from a leak: one
// daemon, one redirected connect every 10 ms and a metrics scrape every
// second, for NSREDIRECT_SOAK_MEMORY_DURATION (default 60m). It prints RSS,
// Go heap in use and goroutines every minute, and fails if RSS grew by 1 MB
// or more after the first 5 minutes. Skipped unless the duration is set; run
// alone (after make build, as root):
//
//	NSREDIRECT_SOAK_MEMORY_DURATION=60m NSREDIRECT_BIN=$PWD/bin/nsredirect \
//	DEMO_BACKEND_BIN=$PWD/bin/demo-backend \
//	go test -count=1 -tags soak -v -timeout 70m -run TestSoakMemory ./test/soak/
func TestSoakMemory(t *testing.T) {
	v := os.Getenv("NSREDIRECT_SOAK_MEMORY_DURATION")
	if v == "" {
		t.Skip("NSREDIRECT_SOAK_MEMORY_DURATION not set (60m for the full run)")
	}
	dur, err := time.ParseDuration(v)
	if err != nil || dur <= 0 {
		t.Fatalf("NSREDIRECT_SOAK_MEMORY_DURATION=%q: want a duration such as 60m", v)
	}
	pin := testenv.BPFFS(t)
	ns := testenv.NewNetns(t)
	serve(t, ns)
	d := testenv.Daemon(t, pin, "run", "--netns", ns.Path, "--redirect", "80=3210", "--metrics-addr", "127.0.0.1:0")
	url := testenv.MetricsURL(t, d)

	ctx, cancel := context.WithTimeout(context.Background(), dur)
	defer cancel()
	var ok, failed int64
	done := make(chan struct{})
	go func() {
		defer close(done)
		_ = ns.Target().Do(func() error {
			tick := time.NewTicker(10 * time.Millisecond)
			defer tick.Stop()
			for n := 0; n < 10_000_000 && ctx.Err() == nil; n++ {
				addr := "127.0.0.1:80"
				if n%2 == 1 {
					addr = "[::1]:80"
				}
				if c, err := net.DialTimeout("tcp", addr, time.Second); err != nil {
					failed++
				} else {
					c.Close()
					ok++
				}
				select {
				case <-ctx.Done():
				case <-tick.C:
				}
			}
			return nil
		})
	}()

	type sample struct {
		min                 int
		rssKB, heapKB, gors int
	}
	var samples []sample
	scrape := time.NewTicker(time.Second)
	defer scrape.Stop()
	start := time.Now()
	next := start
	for ctx.Err() == nil {
		_, body := testenv.HTTPGet(t, url+"/metrics")
		if now := time.Now(); !now.Before(next) {
			s := procStats(t, d, "")
			heap := int(testenv.MetricValue(body, "go_memstats_heap_inuse_bytes ") / 1024)
			gors := int(testenv.MetricValue(body, "go_goroutines "))
			samples = append(samples, sample{int(now.Sub(start).Round(time.Minute) / time.Minute), s.rssKB, heap, gors})
			t.Logf("minute %3d: rss %6d KB  heap in use %6d KB  goroutines %3d", samples[len(samples)-1].min, s.rssKB, heap, gors)
			next = next.Add(time.Minute)
		}
		select {
		case <-ctx.Done():
		case <-scrape.C:
		}
	}
	<-done
	s := procStats(t, d, "")
	t.Logf("end: rss %d KB; %d connects ok, %d failed", s.rssKB, ok, failed)
	if failed != 0 {
		t.Errorf("%d connects failed; want 0", failed)
	}
	var at5 *sample
	for i := range samples {
		if samples[i].min >= 5 {
			at5 = &samples[i]
			break
		}
	}
	if at5 != nil {
		t.Logf("RSS after minute %d: %d KB -> %d KB (%+d KB)", at5.min, at5.rssKB, s.rssKB, s.rssKB-at5.rssKB)
		if s.rssKB-at5.rssKB >= 1024 {
			t.Errorf("RSS grew %d KB after minute %d; want < 1024", s.rssKB-at5.rssKB, at5.min)
		}
	}
}
