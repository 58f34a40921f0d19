package integration

import (
	"errors"
	"net"
	"os"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/nsredirect/nsredirect/internal/netnsx"
	"github.com/nsredirect/nsredirect/internal/testenv"
)

// haveSockoptCookie reports whether this kernel has SO_NETNS_COOKIE (5.14).
func haveSockoptCookie(t *testing.T) bool {
	t.Helper()
	_, err := netnsx.SockoptCookie()
	if err != nil && !errors.Is(err, unix.ENOPROTOOPT) {
		t.Fatalf("SO_NETNS_COOKIE: %v", err)
	}
	return err == nil
}

// The daemon picks the cookie source from the kernel and says which.
func TestCookieSourceChosenByKernel(t *testing.T) {
	pin := testenv.BPFFS(t)
	ns := testenv.NewNetns(t)
	testenv.Server(t, ns, ":3210")
	if os.Getenv("NSREDIRECT_NETNS_COOKIE") != "" {
		t.Setenv("NSREDIRECT_NETNS_COOKIE", "")
	}
	d := testenv.Daemon(t, pin, "run", "--netns", ns.Path, "--redirect", "80=3210")
	want := "netns_cookie=bpf-probe"
	if haveSockoptCookie(t) {
		want = "netns_cookie=sockopt"
	}
	if !strings.Contains(d.Output(), want) {
		t.Errorf("daemon did not log %s:\n%s", want, d.Output())
	}
	if got := hostPeer(ns, "127.0.0.1:80"); got != "127.0.0.1:80" {
		t.Errorf("dial 127.0.0.1:80: %s", got)
	}
}

// The BPF probe path (forced here; the only one before Linux 5.14) keeps
// every behaviour: redirect for foreign and Go clients on both families,
// getpeername reporting port 80, the same cookie SO_NETNS_COOKIE gives, check
// working, and other netns untouched.
func TestRedirectThroughCookieProbe(t *testing.T) {
	t.Setenv("NSREDIRECT_NETNS_COOKIE", "bpf-probe")
	pin := testenv.BPFFS(t)
	ns := testenv.NewNetns(t)
	other := testenv.NewNetns(t)
	testenv.Server(t, ns, ":3210")
	testenv.Server(t, other, ":80")
	d := testenv.Daemon(t, pin, "run", "--netns", ns.Path, "--redirect", "80=3210")
	if !strings.Contains(d.Output(), "netns_cookie=bpf-probe") {
		t.Errorf("daemon did not log netns_cookie=bpf-probe:\n%s", d.Output())
	}

	for _, url := range []string{"http://127.0.0.1/", "http://[::1]/"} {
		if got := curl(t, ns, url); !strings.Contains(got, ":3210") {
			t.Errorf("curl %s = %q, want the backend on :3210", url, got)
		}
	}
	for _, addr := range []string{"127.0.0.1:80", "[::1]:80"} {
		if got := hostPeer(ns, addr); got != addr {
			t.Errorf("dial %s: getpeername = %s, want %s", addr, got, addr)
		}
	}
	rows := testenv.Status(t, pin)
	if len(rows) != 1 || rows[0].Cookie != ns.Cookie(t) {
		t.Fatalf("status %+v; want one rule under cookie %d", rows, ns.Cookie(t))
	}
	if haveSockoptCookie(t) {
		want, _, err := ns.Target().ResolveWith(netnsx.SockoptCookie)
		if err != nil || rows[0].Cookie != want {
			t.Errorf("enrolled under cookie %d, SO_NETNS_COOKIE says %d (%v)", rows[0].Cookie, want, err)
		}
	}
	if code, out, errOut := testenv.Run(t, nil, "check", "--netns", ns.Path, "--dial", "127.0.0.1:80", "--pin-dir", pin); code != 0 {
		t.Errorf("check through the probe: exit %d: %s%s", code, out, errOut)
	}

	// Another netns keeps its own port 80, and its UDP connects, even to
	// the probe's 127.0.0.1:9, go through.
	if got := curl(t, other, "http://127.0.0.1/"); !strings.Contains(got, ":80") {
		t.Errorf("other netns: 127.0.0.1:80 answered %q; want its own port 80", got)
	}
	err := other.Target().Do(func() error {
		c, err := net.DialTimeout("udp4", "127.0.0.1:9", time.Second)
		if err != nil {
			return err
		}
		return c.Close()
	})
	if err != nil {
		t.Errorf("other netns: UDP connect to 127.0.0.1:9: %v", err)
	}
}

// A bad value of the knob is bad input: one line naming it, exit 2, nothing
// attached.
func TestCookieKnobRefusesBadValue(t *testing.T) {
	pin := testenv.BPFFS(t)
	ns := testenv.NewNetns(t)
	env := append(os.Environ(), "NSREDIRECT_NETNS_COOKIE=ebpf")
	code, _, errOut := testenv.Run(t, env, "run", "--netns", ns.Path, "--redirect", "80=3210", "--pin-dir", pin)
	if code != 2 || !strings.Contains(errOut, `NSREDIRECT_NETNS_COOKIE="ebpf"`) || strings.Count(strings.TrimSpace(errOut), "\n") != 0 {
		t.Errorf("bad knob: exit %d, stderr %q; want exit 2 and one line naming the value", code, errOut)
	}
	if entries, err := os.ReadDir(pin); err == nil && len(entries) > 0 {
		t.Errorf("bad knob left state in %s: %v", pin, entries)
	}
}
