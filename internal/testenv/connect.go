package testenv

import (
	"errors"
	"fmt"
	"net"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/nsredirect/nsredirect/internal/netnsx"
)

// DialPid connects to addr from inside the netns of pid (a container's
// process) and returns the peer address getpeername() reports there.
func DialPid(pid int, addr string, timeout time.Duration) (string, error) {
	target, err := netnsx.ParseTarget(fmt.Sprintf("pid:%d", pid))
	if err != nil {
		return "", err
	}
	return DialIn(target, "tcp", addr, timeout)
}

// WaitConnect waits until a connect to addr from pid's netns succeeds; within
// caps a hang.
func WaitConnect(t testing.TB, pid int, addr string, within time.Duration) {
	t.Helper()
	deadline := time.Now().Add(within)
	for {
		_, err := DialPid(pid, addr, 200*time.Millisecond)
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("connect %s from netns of pid %d still fails after %s: %v", addr, pid, within, err)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// AssertRefused checks that a connect to addr from pid's netns is refused
// (nothing redirects it), why saying why it should be.
func AssertRefused(t testing.TB, pid int, addr, why string) {
	t.Helper()
	_, err := DialPid(pid, addr, 2*time.Second)
	if !errors.Is(err, syscall.ECONNREFUSED) {
		t.Errorf("connect %s from netns of pid %d: %v; want connection refused (%s)", addr, pid, err, why)
	}
}

// InNetns runs a foreign client (curl, node) in pid's netns through nsenter
// and returns its output, failing the test if it fails or outlives timeout.
func InNetns(t testing.TB, pid int, timeout time.Duration, name string, args ...string) string {
	t.Helper()
	nsenter := Tool(t, "nsenter")
	bin := Tool(t, name)
	return MustSh(t, timeout, nil, nsenter, append([]string{"-t", strconv.Itoa(pid), "-n", bin}, args...)...)
}

// LoopResult counts the outcomes of a PacedConnects loop.
type LoopResult struct {
	OK, Failed int
	FirstErr   error
}

// PacedConnects dials addr from pid's netns every 2 ms, each connect bounded
// by dialTimeout, until stop is closed (at most limit, at most 100000 times)
// and sends the counts when it ends. Entering the netns failing counts as
// one failure.
func PacedConnects(pid int, addr string, limit, dialTimeout time.Duration, stop <-chan struct{}) <-chan LoopResult {
	res := make(chan LoopResult, 1)
	go func() {
		var r LoopResult
		target, err := netnsx.ParseTarget(fmt.Sprintf("pid:%d", pid))
		if err == nil {
			err = target.Do(func() error {
				dialLoop(addr, dialTimeout, stop, 100000, time.Now().Add(limit), 2*time.Millisecond, func(err error) {
					if err == nil {
						r.OK++
						return
					}
					r.Failed++
					if r.FirstErr == nil {
						r.FirstErr = err
					}
				})
				return nil
			})
		}
		if err != nil && r.FirstErr == nil {
			r.FirstErr, r.Failed = err, r.Failed+1
		}
		res <- r
	}()
	return res
}

// CountConnects dials addr from inside target back to back until stop is
// closed or limit connects are made, counting outcomes as it goes (so a test
// can wait for progress); the first failure is logged. done yields the error
// of entering the netns, or nil, when the loop ends.
func CountConnects(t testing.TB, target netnsx.Target, addr string, stop <-chan struct{}, limit int) (ok, failed *atomic.Int64, done <-chan error) {
	ok, failed = &atomic.Int64{}, &atomic.Int64{}
	errc := make(chan error, 1)
	var once sync.Once
	go func() {
		errc <- target.Do(func() error {
			dialLoop(addr, time.Second, stop, limit, time.Time{}, 0, func(err error) {
				if err == nil {
					ok.Add(1)
					return
				}
				failed.Add(1)
				once.Do(func() { t.Logf("connect failed: %v", err) })
			})
			return nil
		})
	}()
	return ok, failed, errc
}

// dialLoop connects to addr (in the caller's netns, each connect bounded by
// timeout) until stop is closed, n connects are made or end (unless zero)
// has passed, pausing between them, and reports each outcome.
func dialLoop(addr string, timeout time.Duration, stop <-chan struct{}, n int, end time.Time, pause time.Duration, outcome func(error)) {
	for i := 0; i < n && (end.IsZero() || time.Now().Before(end)); i++ {
		select {
		case <-stop:
			return
		default:
		}
		c, err := net.DialTimeout("tcp", addr, timeout)
		if err == nil {
			c.Close()
		}
		outcome(err)
		if pause > 0 {
			time.Sleep(pause)
		}
	}
}
