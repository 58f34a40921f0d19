package integration

import (
	"bufio"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/nsredirect/nsredirect/internal/loader"
	"github.com/nsredirect/nsredirect/internal/testenv"
)

// The Python server and client the UDP tests run (testenv has them, for
// the Docker suite too).
const (
	udpServer = testenv.UDPServerPy
	udpClient = testenv.UDPClientPy
)

const nodeDgram = `
const dgram = require('dgram');
const [host, port] = [process.argv[1], Number(process.argv[2])];
const s = dgram.createSocket(host.includes(':') ? 'udp6' : 'udp4');
const t = setTimeout(() => { console.error('no reply'); process.exit(1) }, 3000);
s.on('message', (m, r) => { console.log(m.toString(), r.address, r.port); clearTimeout(t); s.close() });
s.send('nsr:node', port, host);
`

// startUDPServer runs udpServer in ns (nil: on the host) on [addr]:port
// and returns the port.
func startUDPServer(t *testing.T, ns *testenv.Netns, addr string, port int, tag string) int {
	t.Helper()
	var prefix []string
	if ns != nil {
		prefix = []string{"ip", "netns", "exec", ns.Name}
	}
	return testenv.StartUDPServer(t, prefix, addr, port, tag)
}

func udpProgIDs(t *testing.T, pin string) []int { return testenv.UDPProgIDs(t, pin) }

func attachedOf(t *testing.T, ids []int) []string { return testenv.AttachedOf(t, ids) }

// waitDetached waits until none of ids is attached: the kernel detaches a
// link whose last reference went from a deferred work item.
func waitDetached(t *testing.T, ids []int) { testenv.WaitUnattached(t, ids, 5*time.Second) }

// newUDPProgs lists programs with our UDP names attached at the root now
// and not in before.
func newUDPProgs(t *testing.T, before map[int]string) []string {
	t.Helper()
	var out []string
	for id, name := range testenv.AttachedAtRoot(t) {
		if _, old := before[id]; old {
			continue
		}
		for _, p := range []string{"nsr_sendmsg", "nsr_recvmsg", "nsr_udp_conn"} {
			if strings.HasPrefix(name, p) {
				out = append(out, name)
			}
		}
	}
	return out
}

// hasLine reports whether out has a line that is exactly line.
func hasLine(out, line string) bool {
	for _, l := range strings.Split(out, "\n") {
		if strings.TrimSpace(l) == line {
			return true
		}
	}
	return false
}

func udpLinksPinned(pin string) []string {
	var out []string
	for _, h := range loader.UDPHookNames() {
		if _, err := os.Stat(loader.LinkPin(pin, h)); err == nil {
			out = append(out, h)
		}
	}
	return out
}

// TestUDPRedirect (issue 15): 53=5353/udp in a netns. dig asks 127.0.0.1:53
// and [::1]:53 and gets the answer of the server on 5353; Python's
// unconnected sendto/recvfrom, connected UDP, getpeername and v4-mapped
// dual-stack sockets all see the reply come from port 53; so does Node's
// dgram. Another netns and the host are untouched, and the TCP rule next to
// it works while TCP to port 53 reaches a TCP server on 53 (not one on 5353)
// and UDP to the TCP rule's port 80 a UDP server on 80 (not one on 3210).
func TestUDPRedirect(t *testing.T) {
	pin := testenv.BPFFS(t)
	ns := testenv.NewNetns(t)
	other := testenv.NewNetns(t)
	testenv.Server(t, ns, ":3210")
	startUDPServer(t, &ns, "::", 5353, "backend")
	startUDPServer(t, &other, "::", 53, "other-53")
	// TCP servers on the UDP rule's ports, UDP ones on the TCP rule's: each
	// protocol's rules must leave the other's traffic where it was sent.
	testenv.Server(t, ns, ":53")
	testenv.Server(t, ns, ":5353")
	startUDPServer(t, &ns, "::", 80, "udp-80")
	startUDPServer(t, &ns, "::", 3210, "udp-3210")
	// The host: a server on a free port that the netns's second rule also
	// names; the host's own datagrams to it must reach it.
	hostPort := startUDPServer(t, nil, "::1", 0, "host")
	testenv.Daemon(t, pin, "run", "--netns", ns.Path, "--redirect", "53=5353/udp",
		"--redirect", fmt.Sprintf("%d=5353/udp", hostPort), "--redirect", "80=3210/tcp", "--remove-on-exit")

	dig := testenv.Tool(t, "dig")
	for _, server := range []string{"@127.0.0.1", "@::1"} {
		if got := mustClient(t, ns, dig, "+short", "+tries=1", "+time=3", "-p", "53", server, "a.example.test"); got != "192.0.2.53" {
			t.Errorf("dig %s -p 53 = %q, want the answer of the server on 5353", server, got)
		}
	}
	py := testenv.Tool(t, "python3")
	got := mustClient(t, ns, py, "-c", udpClient, "127.0.0.1", "53")
	for _, want := range []string{
		"unconnected backend:unconnected 127.0.0.1 53",
		"connected backend:connected 127.0.0.1 53",
		"peer 127.0.0.1 53",
		"mapped backend:mapped ::ffff:127.0.0.1 53",
		"mapped-connected backend:mapped-connected ::ffff:127.0.0.1 53",
		"mapped-peer ::ffff:127.0.0.1 53",
	} {
		if !hasLine(got, want) {
			t.Errorf("python over 127.0.0.1:53: want %q in\n%s", want, got)
		}
	}
	got = mustClient(t, ns, py, "-c", udpClient, "::1", "53")
	for _, want := range []string{"unconnected backend:unconnected ::1 53", "connected backend:connected ::1 53", "peer ::1 53"} {
		if !hasLine(got, want) {
			t.Errorf("python over [::1]:53: want %q in\n%s", want, got)
		}
	}
	node := testenv.Tool(t, "node")
	for _, host := range []string{"127.0.0.1", "::1"} {
		if got := mustClient(t, ns, node, "-e", nodeDgram, host, "53"); got != "backend:node "+host+" 53" {
			t.Errorf("node dgram to %s:53 = %q, want the backend's reply from port 53", host, got)
		}
	}
	// Untouched: another netns reaches its own port 53, the host its own
	// server on the port the netns redirects.
	if got := mustClient(t, other, py, "-c", udpClient, "127.0.0.1", "53"); !hasLine(got, "unconnected other-53:unconnected 127.0.0.1 53") {
		t.Errorf("another netns was redirected:\n%s", got)
	}
	if got, err := exec.Command(py, "-c", udpClient, "::1", strconv.Itoa(hostPort)).CombinedOutput(); err != nil || !hasLine(string(got), fmt.Sprintf("unconnected host:unconnected ::1 %d", hostPort)) {
		t.Errorf("the host was redirected: %v\n%s", err, got)
	}
	// TCP: the rule next to the UDP ones works; TCP to 53 is not redirected:
	// it reaches the TCP server on 53, not the one on the UDP rule's 5353.
	if got := curl(t, ns, "http://127.0.0.1/"); !strings.Contains(got, "demo-backend on [::]:3210") {
		t.Errorf("TCP rule 80=3210/tcp next to UDP rules: %q", got)
	}
	for _, url := range []string{"http://127.0.0.1:53/", "http://[::1]:53/"} {
		if got := curl(t, ns, url); !strings.HasSuffix(got, "demo-backend on [::]:53") {
			t.Errorf("curl %s = %q; want the TCP server on 53: a /udp rule must not redirect TCP", url, got)
		}
	}
	// And the other way round: UDP to the port of the TCP rule reaches the
	// UDP server on 80, not one on the TCP rule's 3210.
	got = mustClient(t, ns, py, "-c", udpClient, "127.0.0.1", "80")
	for _, want := range []string{"unconnected udp-80:unconnected 127.0.0.1 80", "connected udp-80:connected 127.0.0.1 80", "peer 127.0.0.1 80"} {
		if !hasLine(got, want) {
			t.Errorf("UDP to 127.0.0.1:80 (a TCP rule's port): want %q in\n%s", want, got)
		}
	}
	if n := redirects(t, pin, ns.Path); n < 10 {
		t.Errorf("status counts %d redirects, want at least the 10 datagrams and connects sent through the UDP rules", n)
	}
}

// TestUDPHooksOnlyWhileUDPRules: with only TCP rules on the host no UDP
// program is attached (a host without UDP rules pays nothing per datagram);
// the first UDP rule attaches them, a detached one is healed, and SIGTERM of
// the daemon with the last UDP rule (--remove-on-exit) removes them while
// the TCP redirect of the other daemon keeps working.
func TestUDPHooksOnlyWhileUDPRules(t *testing.T) {
	pin := testenv.BPFFS(t)
	tcpNs := testenv.NewNetns(t)
	udpNs := testenv.NewNetns(t)
	testenv.Server(t, tcpNs, ":3210")
	startUDPServer(t, &udpNs, "::", 5353, "backend")
	testenv.Daemon(t, pin, "run", "--netns", tcpNs.Path, "--redirect", "80=3210", "--remove-on-exit")
	if got := attachedOf(t, udpProgIDs(t, pin)); len(got) != 0 {
		t.Fatalf("UDP programs attached with only a TCP rule on the host: %v", got)
	}
	if got := udpLinksPinned(pin); len(got) != 0 {
		t.Fatalf("UDP links pinned with only a TCP rule on the host: %v", got)
	}

	d := testenv.Daemon(t, pin, "run", "--netns", udpNs.Path, "--redirect", "53=5353/udp", "--remove-on-exit")
	if got := attachedOf(t, udpProgIDs(t, pin)); len(got) != 6 {
		t.Fatalf("UDP programs at the root with a UDP rule: %v, want 6", got)
	}
	py := testenv.Tool(t, "python3")
	if got := mustClient(t, udpNs, py, "-c", udpClient, "127.0.0.1", "53"); !hasLine(got, "unconnected backend:unconnected 127.0.0.1 53") {
		t.Errorf("UDP redirect: %s", got)
	}

	// Healed: bpftool detaches the sendmsg4 link; the next resync
	// re-creates it.
	id := pinnedLinkID(t, pin, loader.HookSendmsg4)
	if out, err := exec.Command(testenv.Tool(t, "bpftool"), "link", "detach", "id", strconv.Itoa(id)).CombinedOutput(); err != nil {
		t.Fatalf("bpftool link detach: %v\n%s", err, out)
	}
	waitFor(t, "the sendmsg4 link re-created", 20*time.Second, func() bool { return linkAttachedAt(t, pin, loader.HookSendmsg4) })
	ids := udpProgIDs(t, pin)
	if got := mustClient(t, udpNs, py, "-c", udpClient, "127.0.0.1", "53"); !hasLine(got, "unconnected backend:unconnected 127.0.0.1 53") {
		t.Errorf("UDP redirect after the heal: %s", got)
	}

	if err := d.Stop(syscall.SIGTERM, 10*time.Second); err != nil {
		t.Fatalf("SIGTERM: %v\n%s", err, d.Output())
	}
	waitDetached(t, ids)
	if got := udpLinksPinned(pin); len(got) != 0 {
		t.Errorf("UDP links still pinned after the last UDP rule went: %v", got)
	}
	if got := curl(t, tcpNs, "http://127.0.0.1/"); !strings.Contains(got, "demo-backend") {
		t.Errorf("TCP redirect after the UDP daemon left: %q", got)
	}
	if peer := hostPeer(tcpNs, "127.0.0.1:80"); peer != "127.0.0.1:80" {
		t.Errorf("TCP getpeername after the UDP daemon left: %s", peer)
	}
}

func pinnedLinkID(t *testing.T, pin, hook string) int {
	t.Helper()
	out, err := exec.Command(testenv.Tool(t, "bpftool"), "link", "show", "pinned", loader.LinkPin(pin, hook)).CombinedOutput()
	if err != nil {
		t.Fatalf("bpftool link show %s: %v\n%s", hook, err, out)
	}
	id, err := strconv.Atoi(strings.TrimSuffix(strings.Fields(string(out))[0], ":"))
	if err != nil {
		t.Fatalf("bpftool link show %s: %q", hook, out)
	}
	return id
}

// udpLoop asks 127.0.0.1:53, one request in flight, each with a 2 s
// timeout, until the file STOP exists (at most N requests and SECONDS);
// every reply must come from 127.0.0.1:53 with the request's number. It
// prints "sent K" every 100 requests and "done K" at the end.
const udpLoop = `
import os, socket, sys, time
stop, n, limit = sys.argv[1], int(sys.argv[2]), time.time() + float(sys.argv[3])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(2)
i = 0
while i < n and time.time() < limit and not (i % 100 == 0 and os.path.exists(stop)):
    s.sendto(b"nsr:%d" % i, ("127.0.0.1", 53))
    data, src = s.recvfrom(512)
    if data != b"backend:%d" % i or src != ("127.0.0.1", 53):
        print("bad reply", data, src, flush=True); sys.exit(1)
    i += 1
    if i % 100 == 0:
        print("sent", i, flush=True)
print("done", i, flush=True)
`

// TestUDPKill9RestartLosesNoReply: a request loop runs through 53=5353/udp
// while the daemon is killed with SIGKILL and started again: the pinned
// rules and links keep working, the restart adopts them (link.Update), and
// not one request goes unanswered or is answered from another address.
func TestUDPKill9RestartLosesNoReply(t *testing.T) {
	pin := testenv.BPFFS(t)
	ns := testenv.NewNetns(t)
	startUDPServer(t, &ns, "::", 5353, "backend")
	args := []string{"run", "--netns", ns.Path, "--redirect", "53=5353/udp", "--remove-on-exit"}
	d := testenv.Daemon(t, pin, args...)
	before := pinnedLinkID(t, pin, loader.HookRecvmsg4)

	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	stop := filepath.Join(t.TempDir(), "stop")
	loop := ns.Command(ctx, testenv.Tool(t, "python3"), "-c", udpLoop, stop, "10000000", "40")
	out, err := loop.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	loop.Stderr = loop.Stdout
	if err := loop.Start(); err != nil {
		t.Fatal(err)
	}
	type line struct {
		text string
		at   time.Time
	}
	lines := make(chan line, 1<<16)
	go func() {
		sc := bufio.NewScanner(out)
		for sc.Scan() {
			lines <- line{sc.Text(), time.Now()}
		}
		close(lines)
	}()
	var lastAt time.Time
	next := func() string {
		select {
		case l, ok := <-lines:
			if !ok {
				return "(loop ended)"
			}
			lastAt = l.at
			return l.text
		case <-time.After(30 * time.Second):
			return "(no output in 30s)"
		}
	}
	if l := next(); !strings.HasPrefix(l, "sent") {
		t.Fatalf("request loop: %s", l)
	}
	d.Kill()
	if l := next(); !strings.HasPrefix(l, "sent") {
		t.Fatalf("request loop after kill -9: %s", l)
	}
	testenv.Daemon(t, pin, args...)
	restarted := time.Now()
	// Requests answered after the restart too (lines printed after it),
	// then stop.
	for after := 0; after < 2; {
		if l := next(); !strings.HasPrefix(l, "sent") {
			t.Fatalf("request loop after the restart: %s", l)
		}
		if lastAt.After(restarted) {
			after++
		}
	}
	if err := os.WriteFile(stop, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	var last string
	for l := next(); ; l = next() {
		last = l
		if !strings.HasPrefix(l, "sent") {
			break
		}
	}
	if err := loop.Wait(); err != nil || !strings.HasPrefix(last, "done") {
		t.Fatalf("request loop across kill -9 and restart: %v, last line %q", err, last)
	}
	n, _ := strconv.Atoi(strings.Fields(last)[1])
	if n < 200 {
		t.Errorf("only %d requests in the loop; want enough to span the restart", n)
	}
	if after := pinnedLinkID(t, pin, loader.HookRecvmsg4); after != before {
		t.Errorf("the recvmsg4 link was replaced (%d -> %d), not adopted", before, after)
	}
	t.Logf("%d requests answered across kill -9 and restart", n)
}

// TestUDPBadSuffixRefused: a bad protocol suffix is a usage error of one
// line naming it, and nothing is pinned or attached.
func TestUDPBadSuffixRefused(t *testing.T) {
	pin := testenv.BPFFS(t)
	ns := testenv.NewNetns(t)
	env := []string{"PATH=" + os.Getenv("PATH")}
	before := testenv.AttachedAtRoot(t)
	for _, tc := range []struct{ spec, mention string }{
		{"53=5353/sctp", `"sctp"`},
		{"53/udp=5353", "at the end"},
		{"53=5353/", `protocol ""`},
	} {
		code, stdout, stderr := testenv.Run(t, env, "run", "--netns", ns.Path, "--redirect", tc.spec, "--pin-dir", pin)
		if code != 2 || !strings.Contains(stderr, tc.mention) || strings.Count(strings.TrimSpace(stderr), "\n") > 0 {
			t.Errorf("%s: exit %d, stderr %q (stdout %q); want exit 2 and one line mentioning %s", tc.spec, code, stderr, stdout, tc.mention)
		}
	}
	if _, err := os.Stat(pin); !os.IsNotExist(err) {
		t.Errorf("pin dir left behind: %v", err)
	}
	if got := newUDPProgs(t, before); len(got) != 0 {
		t.Errorf("UDP programs attached: %v", got)
	}
}
