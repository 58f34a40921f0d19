//go:build runtimes

package runtimes_test

import (
	"fmt"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/nsredirect/nsredirect/internal/docker"
	"github.com/nsredirect/nsredirect/internal/testenv"
	"github.com/nsredirect/nsredirect/internal/testenv/enginetest"
)

// dial connects to addr from inside the netns of pid and returns the peer
// address getpeername() reports there.
func dial(pid int, addr string, timeout time.Duration) (string, error) {
	return testenv.DialPid(pid, addr, timeout)
}

func mustRefuse(t *testing.T, pid int, addr, why string) {
	t.Helper()
	testenv.AssertRefused(t, pid, addr, why)
}

// waitRedirect waits until a connect to addr from pid's netns succeeds.
func waitRedirect(t *testing.T, pid int, addr string, within time.Duration) {
	t.Helper()
	testenv.WaitConnect(t, pid, addr, within)
}

// inNetns runs a foreign client (curl, node) in pid's netns through nsenter.
func inNetns(t *testing.T, pid int, name string, args ...string) string {
	t.Helper()
	return testenv.InNetns(t, pid, 60*time.Second, name, args...)
}

// clients checks that curl and Node's fetch (what a Convex Node action
// uses) reach the backend on 127.0.0.1:80 and [::1]:80 from inside pid's
// netns.
func clients(t *testing.T, pid int, what string) {
	t.Helper()
	for _, url := range []string{"http://127.0.0.1/", "http://[::1]/"} {
		if out := inNetns(t, pid, "curl", "-gsS", "--max-time", "5", url); !strings.Contains(out, "hello from demo-backend") {
			t.Errorf("%s: curl %s: %q", what, url, out)
		}
		script := fmt.Sprintf(`fetch(%q).then(r => r.text()).then(b => console.log(b.trim())).catch(e => { console.error(e.cause || e); process.exit(1) })`, url)
		if out := inNetns(t, pid, "node", "-e", script); !strings.Contains(out, "hello from demo-backend") {
			t.Errorf("%s: node fetch %s: %q", what, url, out)
		}
	}
	for _, addr := range []string{"127.0.0.1:80", "[::1]:80"} {
		peer, err := dial(pid, addr, 2*time.Second)
		if err != nil {
			t.Errorf("%s: connect %s: %v", what, addr, err)
		} else if peer != addr {
			t.Errorf("%s: getpeername after connect %s = %s; want the address dialled", what, addr, peer)
		}
	}
}

// restartLatency runs action (a restart or recreate) while a poller waits
// for the new container that find returns to start, then connects to
// 127.0.0.1:80 inside it until the redirect works. It returns the time
// from the container's start (the engine's StartedAt) to the first
// redirected connect, logged against the 1 s target.
func restartLatency(t *testing.T, what string, action func(), find func() (docker.Inspected, bool)) time.Duration {
	t.Helper()
	return enginetest.RestartLatency(t, what, followBound, action, find)
}

// followBound is the target a restart's follow time is reported against:
// the 1 s. NSREDIRECT_RUNTIMES_FOLLOW_BOUND (a Go duration) raises
// it, and with it the hang caps, in the qemu TCG guest of `make
// test-runtimes-guest`; the measured figure is in the table either way.
var followBound = func() time.Duration {
	if d, err := time.ParseDuration(os.Getenv("NSREDIRECT_RUNTIMES_FOLLOW_BOUND")); err == nil && d > 0 {
		return d
	}
	return time.Second
}()

// followCap caps a wait for a first redirect: 5 s, or followBound if that
// is longer.
var followCap = max(5*time.Second, followBound)

// loopDialTimeout bounds each connect of a connect loop: 1 s, or
// NSREDIRECT_RUNTIMES_DIAL_TIMEOUT where the machine itself stalls for
// longer (a qemu TCG guest on a loaded host: there a SYN the backend's
// starved accept queue dropped is only retransmitted after 1 s, which a 1 s
// bound counts as a failure although nothing was refused).
var loopDialTimeout = func() time.Duration {
	if d, err := time.ParseDuration(os.Getenv("NSREDIRECT_RUNTIMES_DIAL_TIMEOUT")); err == nil && d > 0 {
		return d
	}
	return time.Second
}()

// loopResult counts the outcomes of a connect loop.
type loopResult struct {
	ok, failed int
	firstErr   error
}

// connectLoop dials addr from pid's netns until stop is closed (at most
// limit, at most 100000 times) and counts outcomes.
func connectLoop(pid int, addr string, limit time.Duration, stop <-chan struct{}) <-chan loopResult {
	res := make(chan loopResult, 1)
	go func() {
		r := <-testenv.PacedConnects(pid, addr, limit, loopDialTimeout, stop)
		res <- loopResult{ok: r.OK, failed: r.Failed, firstErr: r.FirstErr}
	}()
	return res
}

func ms(d time.Duration) string { return fmt.Sprintf("%d ms", d.Milliseconds()) }
