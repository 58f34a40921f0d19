// Package integration runs the nsredirect binary against the real kernel, in
// network namespaces the tests create, with the clients users run (curl,
// Node, Python) as well as Go dials. It needs root; under CI=true it fails
// instead of skipping.
package integration

import (
	"errors"
	"fmt"
	"net"
	"os"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/nsredirect/nsredirect/internal/testenv"
)

const nodeFetch = `fetch(process.argv[1]).then(r => r.text()).then(t => console.log(t.trim())).catch(e => { console.error(String(e.cause || e)); process.exit(1) })`

const pyScript = `
import socket, sys, urllib.request
print(urllib.request.urlopen(sys.argv[1], timeout=5).read().decode().strip())
s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
s.connect(("::ffff:127.0.0.1", 80))
print("mapped-peer", s.getpeername()[0], s.getpeername()[1])
s.close()
`

func TestRedirectForeignClients(t *testing.T) {
	pin := testenv.BPFFS(t)
	ns := testenv.NewNetns(t)
	testenv.Server(t, ns, ":3210")
	testenv.Daemon(t, pin, "run", "--netns", ns.Path, "--redirect", "80=3210")

	for _, url := range []string{"http://127.0.0.1/", "http://[::1]/", "http://127.0.0.1:80/healthz"} {
		if got := curl(t, ns, url); !strings.Contains(got, "demo-backend") && got != "ok" {
			t.Errorf("curl %s = %q, want the backend on :3210", url, got)
		}
	}
	node := testenv.Tool(t, "node")
	for _, url := range []string{"http://127.0.0.1/", "http://[::1]/"} {
		if got := mustClient(t, ns, node, "-e", nodeFetch, url); !strings.Contains(got, "demo-backend") {
			t.Errorf("node fetch %s = %q", url, got)
		}
	}
	py := testenv.Tool(t, "python3")
	got := mustClient(t, ns, py, "-c", pyScript, "http://127.0.0.1/")
	if !strings.Contains(got, "demo-backend") {
		t.Errorf("python urllib: %q", got)
	}
	if !strings.Contains(got, "mapped-peer ::ffff:127.0.0.1 80") {
		t.Errorf("v4-mapped dual-stack socket: getpeername should report ::ffff:127.0.0.1 port 80, got %q", got)
	}
	// The Convex-shaped path: the backend itself calls http://127.0.0.1/.
	if got := curl(t, ns, "http://127.0.0.1:3210/action"); !strings.Contains(got, "-> 200") {
		t.Errorf("backend action calling http://127.0.0.1/: %q", got)
	}
	if n := redirects(t, pin, ns.Path); n < 7 {
		t.Errorf("status counts %d redirects, want at least the 7 connects made", n)
	}
}

func TestGetpeernameOnlyForRedirected(t *testing.T) {
	pin := testenv.BPFFS(t)
	ns := testenv.NewNetns(t)
	testenv.Server(t, ns, ":3210")
	testenv.Daemon(t, pin, "run", "--netns", ns.Path, "--redirect", "80=3210")

	for addr, want := range map[string]string{
		"127.0.0.1:80":   "127.0.0.1:80",
		"[::1]:80":       "[::1]:80",
		"127.0.0.1:3210": "127.0.0.1:3210", // direct: must not be disguised
		"[::1]:3210":     "[::1]:3210",
	} {
		if got := hostPeer(ns, addr); got != want {
			t.Errorf("dial %s: getpeername = %s, want %s", addr, got, want)
		}
	}
	// A socket that really connects to a port-80 listener (no redirect after
	// the rule is gone) reports it as is: checked in TestStopRemovesEverything.
}

func TestOtherNetnsAndHostUntouched(t *testing.T) {
	pin := testenv.BPFFS(t)
	target := testenv.NewNetns(t)
	other := testenv.NewNetns(t)
	testenv.Server(t, target, ":3210")
	testenv.Server(t, other, ":3210")
	testenv.Server(t, other, ":80") // the other netns has its own port 80
	testenv.Daemon(t, pin, "run", "--netns", target.Path, "--redirect", "80=3210")

	if got := curl(t, other, "http://127.0.0.1/"); !strings.Contains(got, ":80") {
		t.Errorf("other netns: 127.0.0.1:80 answered %q; it must reach its own port 80 untouched", got)
	}
	if got := hostPeer(other, "127.0.0.1:80"); got != "127.0.0.1:80" {
		t.Errorf("other netns peer = %s", got)
	}
	// The host netns: a connect to 127.0.0.1:80 is not redirected and not counted.
	before := redirects(t, pin, target.Path)
	c, err := net.DialTimeout("tcp", "127.0.0.1:80", time.Second)
	if err == nil {
		peer := c.RemoteAddr().String()
		c.Close()
		if peer != "127.0.0.1:80" {
			t.Errorf("host connect to 127.0.0.1:80 reports peer %s", peer)
		}
	} else if !errors.Is(err, syscall.ECONNREFUSED) {
		t.Logf("host dial 127.0.0.1:80: %v", err)
	}
	if after := redirects(t, pin, target.Path); after != before {
		t.Errorf("a host connect was redirected: counter %d -> %d", before, after)
	}
	if got := curl(t, target, "http://127.0.0.1/"); !strings.Contains(got, ":3210") {
		t.Errorf("target netns: %q", got)
	}
}

func TestTwoInstancesIsolated(t *testing.T) {
	pin := testenv.BPFFS(t)
	a, b := testenv.NewNetns(t), testenv.NewNetns(t)
	testenv.Server(t, a, ":3210")
	testenv.Server(t, b, ":3211")
	// --remove-on-exit: this test is about stopping one leaving the other.
	da := testenv.Daemon(t, pin, "run", "--netns", a.Path, "--redirect", "80=3210", "--remove-on-exit")
	linksBefore := testenv.LinkIDs(t, pin)
	db := testenv.Daemon(t, pin, "run", "--netns", b.Path, "--redirect", "80=3211", "--remove-on-exit")

	// One program per hook, shared: the second instance replaced the program
	// inside the same links (link.Update), it did not attach more.
	if got := testenv.LinkIDs(t, pin); fmtIDs(got) != fmtIDs(linksBefore) {
		t.Errorf("second instance changed the links %v -> %v; it must update them in place", linksBefore, got)
	}
	ids := testenv.ProgIDs(t, pin)
	if attached := testenv.AttachedAtRoot(t); attached[ids[0]] == "" {
		t.Errorf("our connect4 program %d is not attached at the root", ids[0])
	}

	if got := curl(t, a, "http://127.0.0.1/"); !strings.Contains(got, ":3210") {
		t.Errorf("netns a: %q", got)
	}
	if got := curl(t, b, "http://127.0.0.1/"); !strings.Contains(got, ":3211") {
		t.Errorf("netns b: %q", got)
	}
	if err := da.Stop(syscall.SIGTERM, 5*time.Second); err != nil {
		t.Fatalf("daemon a exit: %v", err)
	}
	if _, err := client(t, a, testenv.Tool(t, "curl"), "-sS", "--max-time", "2", "http://127.0.0.1/"); err == nil {
		t.Error("netns a still redirected after its daemon stopped")
	}
	if got := curl(t, b, "http://127.0.0.1/"); !strings.Contains(got, ":3211") {
		t.Errorf("netns b broken after a stopped: %q", got)
	}
	if _, err := os.Stat(pin); err != nil {
		t.Errorf("pins removed while b still runs: %v", err)
	}
	if err := db.Stop(syscall.SIGTERM, 5*time.Second); err != nil {
		t.Fatalf("daemon b exit: %v", err)
	}
	testenv.AssertGone(t, pin, ids)
}

func TestStopRemovesEverything(t *testing.T) {
	pin := testenv.BPFFS(t)
	ns := testenv.NewNetns(t)
	testenv.Server(t, ns, ":3210")
	// The intent to stop for good; a plain stop hands over (TestRunRestart*).
	d := testenv.Daemon(t, pin, "run", "--netns", ns.Path, "--redirect", "80=3210", "--remove-on-exit")
	ids := testenv.ProgIDs(t, pin)
	curl(t, ns, "http://127.0.0.1/")

	start := time.Now()
	if err := d.Stop(syscall.SIGTERM, 5*time.Second); err != nil {
		t.Fatalf("SIGTERM: exit %v, want 0\n%s", err, d.Output())
	}
	t.Logf("stopped in %s", time.Since(start))
	testenv.AssertGone(t, pin, ids)
	if _, err := ns.Dial("tcp", "127.0.0.1:80"); !errors.Is(err, syscall.ECONNREFUSED) {
		t.Errorf("after stop, connect to 127.0.0.1:80 = %v, want connection refused (no redirect)", err)
	}
	// With a real listener on :80, getpeername reports 80 from the kernel.
	testenv.Server(t, ns, ":80")
	if got := hostPeer(ns, "127.0.0.1:80"); got != "127.0.0.1:80" {
		t.Errorf("peer %s", got)
	}
}

// connectLoop dials addr from inside ns until stop is closed or limit
// connects are made, counting outcomes as it goes.
func connectLoop(t *testing.T, ns testenv.Netns, addr string, stop <-chan struct{}, limit int) (ok, failed *atomic.Int64, done <-chan error) {
	return testenv.CountConnects(t, ns.Target(), addr, stop, limit)
}

func TestKillRestartAdoptsWithZeroFailures(t *testing.T) {
	pin := testenv.BPFFS(t)
	ns := testenv.NewNetns(t)
	testenv.Server(t, ns, ":3210")
	d := testenv.Daemon(t, pin, "run", "--netns", ns.Path, "--redirect", "80=3210")
	linksBefore := testenv.LinkIDs(t, pin)

	stop := make(chan struct{})
	ok, failed, done := connectLoop(t, ns, "127.0.0.1:80", stop, 200000)
	// The waits are progress bounds, not speed limits: under qemu without
	// KVM (make test-kernels) the loop manages ~60 connects a second.
	waitFor(t, "connect loop started", 30*time.Second, func() bool { return ok.Load() > 50 })

	d.Kill()
	atKill := ok.Load()
	waitFor(t, "connects while no daemon runs", 30*time.Second, func() bool { return ok.Load() > atKill+200 })
	rows := testenv.Status(t, pin)
	if len(rows) != 1 || rows[0].Alive {
		t.Errorf("after kill -9, status = %+v; want the rule kept with a dead owner", rows)
	}

	d2 := testenv.Daemon(t, pin, "run", "--netns", ns.Path, "--redirect", "80=3210")
	if !strings.Contains(d2.Output(), "adopting rules left by a previous owner") {
		t.Errorf("restarted daemon did not say it adopted:\n%s", d2.Output())
	}
	atRestart := ok.Load()
	waitFor(t, "connects after restart", 30*time.Second, func() bool { return ok.Load() > atRestart+200 })
	close(stop)
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	t.Logf("connect loop across kill -9 and restart: %d ok, %d failed", ok.Load(), failed.Load())
	if failed.Load() != 0 {
		t.Errorf("%d connects failed across kill -9 + restart; want 0", failed.Load())
	}
	if got := testenv.LinkIDs(t, pin); fmtIDs(got) != fmtIDs(linksBefore) {
		t.Errorf("restart re-attached: links %v -> %v; the program must be swapped with link.Update", linksBefore, got)
	}
	rows = testenv.Status(t, pin)
	if len(rows) != 1 || !rows[0].Alive {
		t.Errorf("after restart, status = %+v; want one rule with a live owner", rows)
	}
}

func TestSecondDaemonForSameNetnsRefused(t *testing.T) {
	pin := testenv.BPFFS(t)
	ns := testenv.NewNetns(t)
	testenv.Server(t, ns, ":3210")
	first := testenv.Daemon(t, pin, "run", "--netns", ns.Path, "--redirect", "80=3210")

	second := testenv.StartNsredirect(t, pin, "run", "--netns", ns.Path, "--redirect", "80=3210")
	code, err := second.Wait(20 * time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if code != 1 || !strings.Contains(second.Output(), fmt.Sprintf("pid %d", first.Cmd.Process.Pid)) {
		t.Errorf("second daemon for the same netns: exit %d, output:\n%s\nwant exit 1 naming pid %d", code, second.Output(), first.Cmd.Process.Pid)
	}
	if first.Exited() {
		t.Fatal("first daemon died")
	}
	if got := curl(t, ns, "http://127.0.0.1/"); !strings.Contains(got, ":3210") {
		t.Errorf("first daemon's redirect broken by the refused second: %q", got)
	}
}

func TestFollowsRecreatedNetns(t *testing.T) {
	pin := testenv.BPFFS(t)
	ns := testenv.NewNetns(t)
	srv := testenv.Server(t, ns, ":3210")
	d := testenv.Daemon(t, pin, "run", "--netns", ns.Path, "--redirect", "80=3210")
	oldCookie := ns.Cookie(t)
	curl(t, ns, "http://127.0.0.1/")

	// Replace the netns under the same path, as `ip netns del; ip netns add` does.
	srv.Stop(syscall.SIGTERM, 5*time.Second)
	if out, err := testenvIP("netns", "del", ns.Name); err != nil {
		t.Fatalf("ip netns del: %v %s", err, out)
	}
	if out, err := testenvIP("netns", "add", ns.Name); err != nil {
		t.Fatalf("ip netns add: %v %s", err, out)
	}
	if out, err := testenvIP("-n", ns.Name, "link", "set", "lo", "up"); err != nil {
		t.Fatalf("lo up: %v %s", err, out)
	}
	newCookie := ns.Cookie(t)
	if newCookie == oldCookie {
		t.Fatal("recreated netns has the same cookie")
	}
	testenv.Server(t, ns, ":3210")
	took := waitFor(t, "redirect in the recreated netns", 5*time.Second, func() bool {
		_, err := ns.Dial("tcp", "127.0.0.1:80")
		return err == nil
	})
	t.Logf("recreated netns redirected again after %s", took)
	for _, r := range testenv.Status(t, pin) {
		if r.Cookie == oldCookie {
			t.Errorf("rule for the dead netns (cookie %d) still enrolled", oldCookie)
		}
	}
	// Two correct paths, depending on whether a resync fell between the
	// del and the add (it does on a slow machine, e.g. under qemu): the
	// cookie changed under a live rule, or the path vanished and came back.
	out := d.Output()
	if !strings.Contains(out, "netns was replaced; following it") && !strings.Contains(out, "netns enrolled again") {
		t.Errorf("daemon did not log following the netns:\n%s", out)
	}
}
