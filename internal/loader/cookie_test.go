package loader_test

import (
	"errors"
	"net"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/nsredirect/nsredirect/internal/loader"
	"github.com/nsredirect/nsredirect/internal/netnsx"
	"github.com/nsredirect/nsredirect/internal/testenv"
)

func probeSource(t *testing.T) *loader.CookieSource {
	t.Helper()
	testenv.Privileged(t)
	if err := loader.CheckKernel(); err != nil {
		t.Fatal(err)
	}
	src, err := loader.NewCookieSource(testenv.RootCgroup(t), true)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = src.Close() })
	if src.Name != loader.CookieBPFProbe {
		t.Fatalf("forced probe source is %q", src.Name)
	}
	return src
}

// The BPF probe gives every netns the cookie SO_NETNS_COOKIE gives it (where
// the kernel has that to compare with), distinct per netns, the same on
// every read, and leaves the probe map empty.
func TestCookieProbeMatchesSockopt(t *testing.T) {
	src := probeSource(t)
	_, sockoptErr := netnsx.SockoptCookie()
	haveSockopt := sockoptErr == nil
	if !haveSockopt && !errors.Is(sockoptErr, unix.ENOPROTOOPT) {
		t.Fatalf("SO_NETNS_COOKIE: %v", sockoptErr)
	}
	self, _ := netnsx.ParseTarget("self")
	targets := []netnsx.Target{self}
	for range 4 {
		targets = append(targets, testenv.NewNetns(t).Target())
	}
	seen := map[uint64]string{}
	for _, tg := range targets {
		got, _, err := tg.ResolveWith(src.Read)
		if err != nil {
			t.Fatalf("probe %s: %v", tg, err)
		}
		if again, _, err := tg.ResolveWith(src.Read); err != nil || again != got {
			t.Errorf("probe %s again = %d, %v; want %d", tg, again, err, got)
		}
		if other, dup := seen[got]; dup {
			t.Errorf("netns %s and %s share cookie %d", tg, other, got)
		}
		seen[got] = tg.Spec
		if haveSockopt {
			want, _, err := tg.Resolve()
			if err != nil || got != want {
				t.Errorf("netns %s: probe cookie %d, SO_NETNS_COOKIE %d (%v)", tg, got, want, err)
			}
		}
	}
	if n, err := src.Pending(); err != nil || n != 0 {
		t.Errorf("probe map holds %d entries after use (%v), want 0", n, err)
	}
	if !haveSockopt {
		t.Log("kernel has no SO_NETNS_COOKIE: checked distinct and stable cookies only; the integration suite checks that redirects keyed by them work")
	}
}

// Concurrent reads take turns: the kernel refuses one program attached twice.
func TestCookieProbeConcurrentReads(t *testing.T) {
	src := probeSource(t)
	ns := testenv.NewNetns(t)
	want, _, err := ns.Target().ResolveWith(src.Read)
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	errs := make(chan error, 8)
	for range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			got, _, err := ns.Target().ResolveWith(src.Read)
			if err == nil && got != want {
				err = errors.New("cookie changed")
			}
			errs <- err
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Error(err)
		}
	}
}

// While the probe program is attached, UDP and TCP connects of other
// sockets, even to the probe's own 127.0.0.1:9, go through untouched.
func TestCookieProbeLeavesOtherConnectsAlone(t *testing.T) {
	src := probeSource(t)
	ns := testenv.NewNetns(t)
	err := ns.Target().Do(func() error {
		for _, addr := range []string{"127.0.0.1:9", "127.0.0.1:53"} {
			c, err := net.DialTimeout("udp4", addr, time.Second)
			if err != nil {
				return err
			}
			c.Close()
		}
		ln, err := net.Listen("tcp4", "127.0.0.1:9")
		if err != nil {
			return err
		}
		defer ln.Close()
		c, err := net.DialTimeout("tcp4", "127.0.0.1:9", time.Second)
		if err != nil {
			return err
		}
		return c.Close()
	})
	if err != nil {
		t.Fatalf("connect with the probe attached: %v", err)
	}
	if n, err := src.Pending(); err != nil || n != 0 {
		t.Errorf("probe map holds %d entries (%v), want 0", n, err)
	}
}

// Before 5.14 the probe is attached at the cgroup2 root once, when the
// source is made, and stays, through the same link, across reads: no attach
// or detach at the root (each takes cgroup_mutex) per read. Close detaches it.
func TestCookieProbeAttachedOnceForItsLife(t *testing.T) {
	testenv.Privileged(t)
	src, err := loader.NewCookieSource(testenv.RootCgroup(t), true)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = src.Close() })
	prog, lnk, err := src.ProbeIDs()
	if err != nil || prog == 0 {
		t.Fatalf("probe not attached before the first read: prog %d link %d (%v)", prog, lnk, err)
	}
	if _, ok := testenv.AttachedAtRoot(t)[prog]; !ok {
		t.Fatalf("probe program %d is not attached at the cgroup2 root before any read", prog)
	}
	ns := testenv.NewNetns(t)
	for i := range 5 {
		if _, _, err := ns.Target().ResolveWith(src.Read); err != nil {
			t.Fatalf("read %d: %v", i, err)
		}
		p, l, err := src.ProbeIDs()
		if err != nil || p != prog || l != lnk {
			t.Fatalf("after read %d the probe is prog %d link %d (%v), want prog %d link %d: attached anew", i, p, l, err, prog, lnk)
		}
	}
	if _, ok := testenv.AttachedAtRoot(t)[prog]; !ok {
		t.Fatalf("probe program %d detached after reads", prog)
	}
	if err := src.Close(); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(5 * time.Second)
	for {
		if _, ok := testenv.AttachedAtRoot(t)[prog]; !ok {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("probe program %d still attached 5s after Close", prog)
		}
		time.Sleep(20 * time.Millisecond)
	}
}
