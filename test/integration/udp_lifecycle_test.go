package integration

import (
	"os"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/nsredirect/nsredirect/internal/loader"
	"github.com/nsredirect/nsredirect/internal/testenv"
)

// assertUDPAttached checks, through BPF_PROG_QUERY at the cgroup2 root and
// the pins, that all six UDP programs of pin are attached, and that a
// datagram to 127.0.0.1:53 from ns comes back from port 53 with tag's reply.
func assertUDPAttached(t *testing.T, pin, step string, ids []int, ns testenv.Netns, tag string) {
	t.Helper()
	if got := attachedOf(t, ids); len(got) != len(ids) {
		t.Errorf("%s: UDP programs attached at the root: %v; want all %d", step, got, len(ids))
	}
	if got := udpLinksPinned(pin); len(got) != len(ids) {
		t.Errorf("%s: UDP links pinned: %v; want all %d", step, got, len(ids))
	}
	got := mustClient(t, ns, testenv.Tool(t, "python3"), "-c", udpClient, "127.0.0.1", "53")
	if want := "unconnected " + tag + ":unconnected 127.0.0.1 53"; !hasLine(got, want) {
		t.Errorf("%s: want %q in\n%s", step, want, got)
	}
}

// assertUDPGone waits until none of ids is attached at the root and checks
// no UDP link is pinned.
func assertUDPGone(t *testing.T, pin, step string, ids []int) {
	t.Helper()
	waitDetached(t, ids)
	if got := udpLinksPinned(pin); len(got) != 0 {
		t.Errorf("%s: UDP links still pinned: %v", step, got)
	}
}

// TestUDPLastRuleOfSeveralNetns: the UDP links stay while any netns of the
// host has a UDP rule, whoever holds it, and go with the last one, however
// it goes: two daemons with one netns each (one stops; the other's netns
// then changes to TCP only), one `run` with two netns (one of them
// deleted), and `nsredirect cleanup` of a handed-over UDP netns while a TCP
// daemon runs on. BPF_PROG_QUERY at the root is asked after each step.
func TestUDPLastRuleOfSeveralNetns(t *testing.T) {
	t.Run("two daemons", func(t *testing.T) {
		pin := testenv.BPFFS(t)
		a, b := testenv.NewNetns(t), testenv.NewNetns(t)
		startUDPServer(t, &a, "::", 5353, "a")
		startUDPServer(t, &b, "::", 5353, "b")
		testenv.Server(t, a, ":3210")
		da := testenv.Daemon(t, pin, "run", "--netns", a.Path, "--redirect", "53=5353/udp")
		db := testenv.Daemon(t, pin, "run", "--netns", b.Path, "--redirect", "53=5353/udp", "--remove-on-exit")
		ids := udpProgIDs(t, pin)
		assertUDPAttached(t, pin, "two UDP netns", ids, b, "b")

		if err := db.Stop(syscall.SIGTERM, 10*time.Second); err != nil {
			t.Fatalf("SIGTERM b's daemon: %v\n%s", err, db.Output())
		}
		if rows := testenv.RowsOf(testenv.Status(t, pin), b.Path); len(rows) != 0 {
			t.Fatalf("b's rules outlived its --remove-on-exit daemon: %+v", rows)
		}
		assertUDPAttached(t, pin, "b's UDP rule removed, a's live", ids, a, "a")

		// a's rules change from /udp to TCP only: the daemon is restarted
		// with its new --redirect (a systemd unit edited), adopts a's
		// handed-over rules and replaces them; that was the last UDP rule.
		if err := da.Stop(syscall.SIGTERM, 10*time.Second); err != nil {
			t.Fatalf("SIGTERM a's daemon: %v\n%s", err, da.Output())
		}
		assertUDPAttached(t, pin, "a's rules handed over", ids, a, "a")
		testenv.Daemon(t, pin, "run", "--netns", a.Path, "--redirect", "80=3210", "--remove-on-exit")
		assertUDPGone(t, pin, "a changed to TCP only", ids)
		if got := curl(t, a, "http://127.0.0.1/"); !strings.Contains(got, ":3210") {
			t.Errorf("a's TCP rule: %q", got)
		}
		got := mustClient(t, a, testenv.Tool(t, "python3"), "-c", udpClient, "127.0.0.1", "5353")
		if !hasLine(got, "unconnected a:unconnected 127.0.0.1 5353") {
			t.Errorf("UDP straight to a's server with no UDP rule: %s", got)
		}
	})

	t.Run("one run, two netns", func(t *testing.T) {
		pin := testenv.BPFFS(t)
		a, b := testenv.NewNetns(t), testenv.NewNetns(t)
		startUDPServer(t, &a, "::", 5353, "a")
		d := testenv.Daemon(t, pin, "run", "--netns", a.Path, "--netns", b.Path, "--redirect", "53=5353/udp", "--remove-on-exit")
		ids := udpProgIDs(t, pin)
		assertUDPAttached(t, pin, "two netns of one run", ids, a, "a")

		// b goes (ip netns del; nothing else holds it): its rules go, a's
		// stay, and so do the UDP links. b's cookie is read from status:
		// a thread of this process that entered b could keep it alive.
		if rows := testenv.RowsOf(testenv.Status(t, pin), b.Path); len(rows) != 1 {
			t.Fatalf("status of b: %+v; want one row", rows)
		}
		b.Delete(t)
		waitFor(t, "b's rules gone with b", 60*time.Second, func() bool {
			rows := testenv.Status(t, pin)
			return len(testenv.RowsOf(rows, b.Path)) == 0 && len(testenv.RowsOf(rows, a.Path)) == 1
		})
		assertUDPAttached(t, pin, "b deleted, a live", ids, a, "a")

		if err := d.Stop(syscall.SIGTERM, 10*time.Second); err != nil {
			t.Fatalf("SIGTERM: %v\n%s", err, d.Output())
		}
		assertUDPGone(t, pin, "the run daemon stopped (--remove-on-exit)", ids)
	})

	t.Run("cleanup", func(t *testing.T) {
		pin := testenv.BPFFS(t)
		tcp, udp := testenv.NewNetns(t), testenv.NewNetns(t)
		testenv.Server(t, tcp, ":3210")
		startUDPServer(t, &udp, "::", 5353, "u")
		testenv.Daemon(t, pin, "run", "--netns", tcp.Path, "--redirect", "80=3210", "--remove-on-exit")
		du := testenv.Daemon(t, pin, "run", "--netns", udp.Path, "--redirect", "53=5353/udp")
		ids := udpProgIDs(t, pin)
		if err := du.Stop(syscall.SIGTERM, 10*time.Second); err != nil {
			t.Fatalf("SIGTERM: %v\n%s", err, du.Output())
		}
		assertUDPAttached(t, pin, "the UDP netns handed over", ids, udp, "u")
		tcpIDs := testenv.ProgIDs(t, pin)

		code, out, errOut := testenv.Run(t, nil, "cleanup", "--pin-dir", pin)
		if code != 0 {
			t.Fatalf("cleanup: exit %d\n%s%s", code, out, errOut)
		}
		assertUDPGone(t, pin, "cleanup of the handed-over UDP netns", ids)
		testenv.AssertAttached(t, tcpIDs)
		if got := curl(t, tcp, "http://127.0.0.1/"); !strings.Contains(got, ":3210") {
			t.Errorf("TCP redirect of the live daemon after cleanup: %q", got)
		}
	})
}

// udpLinkIDs reads the IDs of the pinned UDP links, by hook.
func udpLinkIDs(t *testing.T, pin string) map[string]int {
	t.Helper()
	ids := map[string]int{}
	for _, h := range loader.UDPHookNames() {
		ids[h] = pinnedLinkID(t, pin, h)
	}
	return ids
}

func removeUDPLinkPins(t *testing.T, pin string, hooks ...string) {
	t.Helper()
	for _, h := range hooks {
		if err := os.Remove(loader.LinkPin(pin, h)); err != nil {
			t.Fatal(err)
		}
	}
}

// TestUDPLinkPinRemovedHealed: a UDP link pin removed by hand under a live
// UDP rule (its last reference: the link detaches) comes back. With other
// UDP links still pinned the next heal re-creates it; with every one gone
// the heal finds the UDP rule by its scan of the rule map, every tenth heal
// while no UDP link is pinned (loader.healNeeds). Both are logged and counted
// as repairs.
func TestUDPLinkPinRemovedHealed(t *testing.T) {
	pin := testenv.BPFFS(t)
	ns := testenv.NewNetns(t)
	startUDPServer(t, &ns, "::", 5353, "backend")
	d := testenv.Daemon(t, pin, "run", "--netns", ns.Path, "--redirect", "53=5353/udp", "--metrics-addr", "127.0.0.1:0", "--remove-on-exit")
	url := testenv.MetricsURL(t, d)
	ids := udpProgIDs(t, pin)
	before := udpLinkIDs(t, pin)

	removeUDPLinkPins(t, pin, loader.HookRecvmsg4)
	waitFor(t, "link_recvmsg4 re-created by the heal", 30*time.Second, func() bool { return linkAttachedAt(t, pin, loader.HookRecvmsg4) })
	if got := pinnedLinkID(t, pin, loader.HookRecvmsg4); got == before[loader.HookRecvmsg4] {
		t.Errorf("link_recvmsg4 is still link %d: the pin was not removed", got)
	}
	assertUDPAttached(t, pin, "link_recvmsg4 healed", ids, ns, "backend")

	// Every UDP link pin: found by the rule-map scan, within udpScanEvery
	// heals (the bound here only guards against a hang).
	before = udpLinkIDs(t, pin)
	removeUDPLinkPins(t, pin, loader.UDPHookNames()...)
	waitFor(t, "every UDP link re-created by the heal", 60*time.Second, func() bool {
		for _, h := range loader.UDPHookNames() {
			if !linkAttachedAt(t, pin, h) {
				return false
			}
		}
		return true
	})
	for h, id := range udpLinkIDs(t, pin) {
		if id == before[h] {
			t.Errorf("link_%s is still link %d: the pin was not removed", h, id)
		}
	}
	assertUDPAttached(t, pin, "every UDP link healed", ids, ns, "backend")
	_, body := testenv.HTTPGet(t, url+"/metrics")
	for _, h := range loader.UDPHookNames() {
		want := 1.0
		if h == loader.HookRecvmsg4 {
			want = 2
		}
		if v := metricValue(t, body, `nsredirect_link_repairs_total{hook="`+h+`"}`); v != want {
			t.Errorf("link repairs of %s = %v; want %v", h, v, want)
		}
	}
}

// TestUDPRestartRepairsRemovedLinkPin: a UDP link pin removed while no
// daemon runs (the rules handed over) is repaired by the next daemon's
// start: the replies lose their dialled source until then, and have it
// back once the new daemon runs.
func TestUDPRestartRepairsRemovedLinkPin(t *testing.T) {
	pin := testenv.BPFFS(t)
	ns := testenv.NewNetns(t)
	startUDPServer(t, &ns, "::", 5353, "backend")
	args := []string{"run", "--netns", ns.Path, "--redirect", "53=5353/udp"}
	d := testenv.Daemon(t, pin, args...)
	ids := udpProgIDs(t, pin)
	recvmsg4 := ids[4]
	if loader.UDPHookNames()[4] != loader.HookRecvmsg4 {
		t.Fatalf("UDP hooks %v: the test takes the fifth for recvmsg4", loader.UDPHookNames())
	}
	d.Kill()
	removeUDPLinkPins(t, pin, loader.HookRecvmsg4)
	waitDetached(t, []int{recvmsg4})
	got := mustClient(t, ns, testenv.Tool(t, "python3"), "-c", udpClient, "127.0.0.1", "53")
	if !hasLine(got, "unconnected backend:unconnected 127.0.0.1 5353") {
		t.Fatalf("with link_recvmsg4 gone the reply should come from the real source 5353:\n%s", got)
	}

	// The new daemon loads its own programs: the five links it adopts get
	// them through link.Update, recvmsg4 a new link.
	d = testenv.Daemon(t, pin, append(args, "--remove-on-exit")...)
	ids = udpProgIDs(t, pin)
	assertUDPAttached(t, pin, "restarted", ids, ns, "backend")
	if err := d.Stop(syscall.SIGTERM, 10*time.Second); err != nil {
		t.Fatalf("SIGTERM: %v\n%s", err, d.Output())
	}
	assertUDPGone(t, pin, "stopped", ids)
}

// udpAlternate sends from ONE unconnected socket to the first server
// (127.0.0.1:53) and then the second (127.0.0.2:53) before reading either
// reply, then the same with one socket per server and with connected
// sockets; one line per reply: "KIND TAG:MSG SRC PORT".
const udpAlternate = `
import socket
def show(kind, s):
    data, src = s.recvfrom(512)
    print(kind, data.decode(), src[0], src[1], flush=True)
servers = [("127.0.0.1", 53), ("127.0.0.2", 53)]
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(3)
for i, srv in enumerate(servers):
    s.sendto(b"nsr:shared%d" % i, srv)
show("shared", s); show("shared", s)
s.sendto(b"nsr:again", servers[0])
show("shared-again", s)
own = []
for i, srv in enumerate(servers):
    o = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); o.settimeout(3)
    o.sendto(b"nsr:own%d" % i, srv)
    own.append(o)
for o in own:
    show("own", o)
conn = []
for i, srv in enumerate(servers):
    c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); c.settimeout(3)
    c.connect(srv)
    c.send(b"nsr:conn%d" % i)
    conn.append(c)
for c in conn:
    show("connected", c)
`

// TestUDPOneUnconnectedSocketTwoServers pins a documented limitation
// (docs/architecture.md, UDP): nsr_udp_peers keeps one reply mapping per socket, the last
// redirected destination. An unconnected socket that sends to two
// redirected servers before reading gets the first server's reply with its
// real source (127.0.0.1:5353), the second's from 127.0.0.2:53; one socket
// per server, or connected UDP, gets both from port 53. A change to the
// mapping makes this test fail, and docs/architecture.md must change with it.
func TestUDPOneUnconnectedSocketTwoServers(t *testing.T) {
	pin := testenv.BPFFS(t)
	ns := testenv.NewNetns(t)
	startUDPServer(t, &ns, "::ffff:127.0.0.1", 5353, "first")
	startUDPServer(t, &ns, "::ffff:127.0.0.2", 5354, "second")
	testenv.Daemon(t, pin, "run", "--netns", ns.Path, "--redirect", "127.0.0.1:53=5353/udp", "--redirect", "127.0.0.2:53=5354/udp", "--remove-on-exit")
	got := mustClient(t, ns, testenv.Tool(t, "python3"), "-c", udpAlternate)
	for _, want := range []string{
		// The limitation: the mapping is the second server's by the time
		// the first one's reply is read.
		"shared first:shared0 127.0.0.1 5353",
		"shared second:shared1 127.0.0.2 53",
		"shared-again first:again 127.0.0.1 53",
		"own first:own0 127.0.0.1 53",
		"own second:own1 127.0.0.2 53",
		"connected first:conn0 127.0.0.1 53",
		"connected second:conn1 127.0.0.2 53",
	} {
		if !hasLine(got, want) {
			t.Errorf("want %q in\n%s", want, got)
		}
	}
}
