package integration

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
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

// Before Linux 5.11 eBPF maps are charged to RLIMIT_MEMLOCK. Without
// CAP_SYS_RESOURCE and under a low hard limit the daemon cannot lift it:
// one line naming the limit and the fixes, exit 2, nothing pinned. From 5.11
// (memcg accounting) the same daemon runs.
func TestLowMemlockLimit(t *testing.T) {
	pin := testenv.BPFFS(t)
	ns := testenv.NewNetns(t)
	testenv.Server(t, ns, ":3210")
	prlimit := testenv.Tool(t, "prlimit")
	setpriv := testenv.Tool(t, "setpriv")
	bin := testenv.Binary(t, "NSREDIRECT_BIN", "github.com/nsredirect/nsredirect/cmd/nsredirect")
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	t.Cleanup(cancel)
	// The four capabilities of docs/security.md (TestLeastPrivilege): CAP_SYS_PTRACE
	// tells the host's netns on kernels before 6.18.
	cmd := exec.CommandContext(ctx, prlimit, "--memlock=65536:65536", "--",
		setpriv, "--inh-caps=-all", "--bounding-set=-all,+bpf,+net_admin,+sys_admin,+sys_ptrace", "--",
		bin, "run", "--netns", ns.Path, "--redirect", "80=3210", "--pin-dir", pin)
	var u unix.Utsname
	if err := unix.Uname(&u); err != nil {
		t.Fatal(err)
	}
	var major, minor int
	fmt.Sscanf(unix.ByteSliceToString(u.Release[:]), "%d.%d", &major, &minor)
	if major > 5 || (major == 5 && minor >= 11) {
		p := testenv.Start(t, cmd)
		p.WaitOutput(t, "nsredirect running", 20*time.Second)
		if peer := hostPeer(ns, "127.0.0.1:80"); peer != "127.0.0.1:80" {
			t.Errorf("redirect under a 64 KiB memlock limit on %d.%d: %s", major, minor, peer)
		}
		return
	}
	out, err := cmd.CombinedOutput()
	var ee *exec.ExitError
	if !errors.As(err, &ee) || ee.ExitCode() != 2 {
		t.Fatalf("daemon under a 64 KiB memlock limit on %d.%d: %v, want exit 2\n%s", major, minor, err, out)
	}
	line := strings.TrimSpace(string(out))
	if strings.Contains(line, "\n") || !strings.Contains(line, "RLIMIT_MEMLOCK") || !strings.Contains(line, "LimitMEMLOCK=infinity") {
		t.Errorf("want one line naming RLIMIT_MEMLOCK and how to lift it, got:\n%s", out)
	}
	if entries, err := os.ReadDir(pin); err == nil && len(entries) > 0 {
		t.Errorf("refused daemon left state in %s: %v", pin, entries)
	}
}
