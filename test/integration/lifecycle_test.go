package integration

import (
	"fmt"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/nsredirect/nsredirect/internal/loader"
	"github.com/nsredirect/nsredirect/internal/testenv"
)

// TestRunRestartRefusesNothing: SIGTERM and an immediate restart of `run`
// (systemctl restart, recreating a sidecar) under a connect loop: the
// stopping daemon leaves its rules for the next, which adopts them in place.
func TestRunRestartRefusesNothing(t *testing.T) {
	pin := testenv.BPFFS(t)
	ns := testenv.NewNetns(t)
	testenv.Server(t, ns, ":3210")
	args := []string{"run", "--netns", ns.Path, "--redirect", "80=3210"}
	d := testenv.Daemon(t, pin, args...)
	linksBefore := testenv.LinkIDs(t, pin)

	stop := make(chan struct{})
	ok, failed, done := connectLoop(t, ns, "127.0.0.1:80", stop, 200000)
	waitFor(t, "connect loop started", 30*time.Second, func() bool { return ok.Load() > 50 })
	for i := range 3 {
		if err := d.Stop(syscall.SIGTERM, 5*time.Second); err != nil {
			t.Fatalf("restart %d: SIGTERM: %v\n%s", i, err, d.Output())
		}
		if !strings.Contains(d.Output(), "handover=true") {
			t.Errorf("restart %d: the stopping daemon did not hand over:\n%s", i, d.Output())
		}
		d = testenv.Daemon(t, pin, args...)
		if !strings.Contains(d.Output(), "adopting rules left by a previous owner") {
			t.Errorf("restart %d: the new daemon did not adopt:\n%s", i, d.Output())
		}
		at := ok.Load()
		waitFor(t, "connects after the restart", 30*time.Second, func() bool { return ok.Load() > at+200 })
	}
	close(stop)
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	t.Logf("connect loop across 3 SIGTERM + immediate restarts of run: %d ok, %d refused", ok.Load(), failed.Load())
	if failed.Load() != 0 {
		t.Errorf("%d connects refused across restarts; want 0", failed.Load())
	}
	if got := testenv.LinkIDs(t, pin); fmtIDs(got) != fmtIDs(linksBefore) {
		t.Errorf("restart re-attached: links %v -> %v", linksBefore, got)
	}
	if rows := testenv.Status(t, pin); len(rows) != 1 || !rows[0].Alive {
		t.Errorf("status after the restarts = %+v; want one rule with a live owner", rows)
	}
}

// TestRunStopKeepsRulesUntilCleanup: a plain stop leaves the rules working
// (the other half of a restart); `nsredirect cleanup` is how they are
// removed for good, and then nothing is left.
func TestRunStopKeepsRulesUntilCleanup(t *testing.T) {
	pin := testenv.BPFFS(t)
	ns := testenv.NewNetns(t)
	testenv.Server(t, ns, ":3210")
	d := testenv.Daemon(t, pin, "run", "--netns", ns.Path, "--redirect", "80=3210")
	ids := testenv.ProgIDs(t, pin)
	if err := d.Stop(syscall.SIGTERM, 5*time.Second); err != nil {
		t.Fatalf("SIGTERM: %v", err)
	}
	if got := curl(t, ns, "http://127.0.0.1/"); !strings.Contains(got, ":3210") {
		t.Errorf("after a plain stop: %q; want the redirect kept", got)
	}
	if rows := testenv.Status(t, pin); len(rows) != 1 || rows[0].Alive {
		t.Errorf("status after stop = %+v; want the rule kept, ownerless", rows)
	}
	code, out, errOut := testenv.Run(t, nil, "cleanup", "--pin-dir", pin)
	if code != 0 || !strings.Contains(out, "1 enrollment(s) removed") {
		t.Fatalf("cleanup: exit %d\n%s%s", code, out, errOut)
	}
	testenv.AssertGone(t, pin, ids)
	if _, err := ns.Dial("tcp", "127.0.0.1:80"); err == nil {
		t.Error("still redirected after cleanup")
	}
}

// TestRunRemovesHandedOverRulesOfGoneNetns: what a stopped `run` left for
// a netns that is gone by the time the next `run` starts is removed by it;
// what it left for a netns that lives is kept.
func TestRunRemovesHandedOverRulesOfGoneNetns(t *testing.T) {
	pin := testenv.BPFFS(t)
	gone, lives, next := testenv.NewNetns(t), testenv.NewNetns(t), testenv.NewNetns(t)
	testenv.Server(t, lives, ":3210")
	for _, ns := range []testenv.Netns{gone, lives} {
		d := testenv.Daemon(t, pin, "run", "--netns", ns.Path, "--redirect", "80=3210")
		if err := d.Stop(syscall.SIGTERM, 5*time.Second); err != nil {
			t.Fatalf("SIGTERM: %v", err)
		}
	}
	gone.Delete(t)
	d := testenv.Daemon(t, pin, "run", "--netns", next.Path, "--redirect", "80=3210", "--remove-on-exit")
	if !strings.Contains(d.Output(), "removed rules handed over for a target that is gone") || !strings.Contains(d.Output(), gone.Path) {
		t.Errorf("the next daemon did not say it removed the gone netns's rules:\n%s", d.Output())
	}
	rows := testenv.Status(t, pin)
	if len(testenv.RowsOf(rows, gone.Path)) != 0 || len(testenv.RowsOf(rows, lives.Path)) != 1 || len(testenv.RowsOf(rows, next.Path)) != 1 {
		t.Errorf("status %+v; want the living netns's rule kept, the gone one's removed", rows)
	}
	if got := curl(t, lives, "http://127.0.0.1/"); !strings.Contains(got, ":3210") {
		t.Errorf("the living netns lost its redirect: %q", got)
	}
}

// TestRunRefusesHostNetns: a target that is the host's netns, however it
// is named, exits 2 before anything is attached, unless --allow-host-netns
// (logged as a warning).
func TestRunRefusesHostNetns(t *testing.T) {
	pin := testenv.BPFFS(t)
	// A port nothing uses: the allowed case below redirects on the host.
	spec := "127.0.0.1:47991=127.0.0.1:47992"
	for _, target := range []string{"self", "/proc/2/ns/net", "pid:2"} {
		code, _, stderr := testenv.Run(t, nil, "run", "--netns", target, "--redirect", spec, "--pin-dir", pin)
		if code != 2 || !strings.Contains(stderr, "host network namespace") || !strings.Contains(stderr, "--allow-host-netns") || strings.Count(strings.TrimSpace(stderr), "\n") != 0 {
			t.Errorf("run --netns %s on the host: exit %d, %q; want exit 2, one line naming the host network namespace and --allow-host-netns", target, code, stderr)
		}
	}
	if code, _, _ := testenv.Run(t, nil, "status", "--pin-dir", pin); code != 0 {
		t.Fatal("status failed")
	}
	testenv.AssertGone(t, pin, nil)

	d := testenv.Daemon(t, pin, "run", "--netns", "self", "--redirect", spec, "--allow-host-netns", "--remove-on-exit")
	if !strings.Contains(d.Output(), "level=warning") || !strings.Contains(d.Output(), "--allow-host-netns") {
		t.Errorf("--allow-host-netns not logged as a warning:\n%s", d.Output())
	}
	ids := testenv.ProgIDs(t, pin)
	if err := d.Stop(syscall.SIGTERM, 5*time.Second); err != nil {
		t.Fatalf("SIGTERM: %v", err)
	}
	testenv.AssertGone(t, pin, ids)
}

// TestDetachedLinkHealed: `bpftool link detach` of our connect4 link under
// a running daemon: the next resync re-creates and re-pins it, logs it and
// counts it; the redirect comes back.
func TestDetachedLinkHealed(t *testing.T) {
	pin := testenv.BPFFS(t)
	ns := testenv.NewNetns(t)
	testenv.Server(t, ns, ":3210")
	d := testenv.Daemon(t, pin, "run", "--netns", ns.Path, "--redirect", "80=3210", "--metrics-addr", "127.0.0.1:0", "--remove-on-exit")
	url := testenv.MetricsURL(t, d)
	connect4 := testenv.LinkOf(t, pin, loader.HookConnect4)
	bpftool := testenv.Tool(t, "bpftool")
	if out, err := exec.Command(bpftool, "link", "detach", "id", strconv.Itoa(connect4.ID)).CombinedOutput(); err != nil {
		t.Fatalf("bpftool link detach: %v\n%s", err, out)
	}
	took := waitFor(t, "the redirect back", 10*time.Second, func() bool {
		_, err := ns.Dial("tcp", "127.0.0.1:80")
		return err == nil
	})
	t.Logf("detached link re-created in %s", took.Round(time.Millisecond))
	_, body := testenv.HTTPGet(t, url+"/metrics")
	if v := metricValue(t, body, `nsredirect_link_repairs_total{hook="connect4"}`); v != 1 {
		t.Errorf("link repairs of connect4 = %v; want 1", v)
	}
	if !strings.Contains(d.Output(), "re-created and re-pinned") {
		t.Errorf("the repair was not logged:\n%s", d.Output())
	}
	for _, m := range []string{`nsredirect_map_entries{map="rules"}`, `nsredirect_map_capacity{map="rules"}`, `nsredirect_peer_storage_failures_total`} {
		metricValue(t, body, m)
	}
	if got := testenv.LinkOf(t, pin, loader.HookConnect4); got.ID == connect4.ID {
		t.Errorf("connect4 link %d not replaced", got.ID)
	}
}

// TestRunSelfInOwnPidNamespace is the sidecar of docs/docker.md (`run --netns self`
// sharing the backend's netns, in a container with its own pid
// namespace): its pid 1 shares the target netns but is not the host's, so
// the target is not taken for the host netns. It sees no host process, so
// only init_net's fixed inode (Linux >= 6.18) tells the host's netns; on an
// older kernel it must refuse to start (fail closed), naming the fix.
func TestRunSelfInOwnPidNamespace(t *testing.T) {
	pin := testenv.BPFFS(t)
	ns := testenv.NewNetns(t)
	testenv.Server(t, ns, ":3210")
	bin := testenv.Binary(t, "NSREDIRECT_BIN", "github.com/nsredirect/nsredirect/cmd/nsredirect")
	// nsenter, not `ip netns exec`, which would remount /sys and hide the cgroup2 mount.
	sidecar := func() *exec.Cmd {
		return exec.Command(testenv.Tool(t, "nsenter"), "--net="+ns.Path,
			"unshare", "--pid", "--fork", "--mount-proc", "--kill-child=SIGTERM",
			bin, "run", "--netns", "self", "--redirect", "80=3210", "--pin-dir", pin, "--remove-on-exit")
	}
	var u unix.Utsname
	if err := unix.Uname(&u); err != nil {
		t.Fatal(err)
	}
	release := unix.ByteSliceToString(u.Release[:])
	var major, minor int
	if _, err := fmt.Sscanf(release, "%d.%d", &major, &minor); err != nil {
		t.Fatalf("kernel release %q: %v", release, err)
	}
	if major < 6 || major == 6 && minor < 18 {
		out, err := sidecar().CombinedOutput()
		ee, ok := err.(*exec.ExitError)
		if !ok || ee.ExitCode() != 2 || !strings.Contains(string(out), "CAP_SYS_PTRACE") || !strings.Contains(string(out), "--allow-host-netns") {
			t.Errorf("sidecar on Linux %s: %v, %q; want exit 2 naming CAP_SYS_PTRACE and --allow-host-netns", release, err, out)
		}
		testenv.AssertGone(t, pin, nil)
		return
	}
	d := testenv.Start(t, sidecar())
	d.WaitOutput(t, "nsredirect running", 20*time.Second)
	if got := curl(t, ns, "http://127.0.0.1/"); !strings.Contains(got, ":3210") {
		t.Errorf("sidecar's redirect: %q", got)
	}
	if strings.Contains(d.Output(), "is the host network namespace") || strings.Contains(d.Output(), "level=error") {
		t.Errorf("the sidecar's own netns was taken for the host's:\n%s", d.Output())
	}
	ids := testenv.ProgIDs(t, pin)
	// unshare does not pass SIGTERM on: signal the daemon, its child.
	children, err := os.ReadFile(fmt.Sprintf("/proc/%d/task/%d/children", d.Cmd.Process.Pid, d.Cmd.Process.Pid))
	if err != nil {
		t.Fatal(err)
	}
	child, err := strconv.Atoi(strings.TrimSpace(string(children)))
	if err != nil {
		t.Fatalf("children of unshare: %q", children)
	}
	if err := syscall.Kill(child, syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	took := waitFor(t, "the sidecar to remove everything", 10*time.Second, func() bool {
		_, err := os.Stat(pin)
		return os.IsNotExist(err)
	})
	t.Logf("stopped and cleaned up in %s", took)
	testenv.AssertGone(t, pin, ids)
}

// TestRunSeveralNetns: one `run` daemon serves every --netns given, each
// with every --redirect; one namespace given twice (under two names) exits
// 2 naming both before anything is attached; SIGTERM with --remove-on-exit
// removes them all.
func TestRunSeveralNetns(t *testing.T) {
	pin := testenv.BPFFS(t)
	a, b, other := testenv.NewNetns(t), testenv.NewNetns(t), testenv.NewNetns(t)
	for _, ns := range []testenv.Netns{a, b, other} {
		testenv.Server(t, ns, ":3210")
	}

	code, _, stderr := testenv.Run(t, nil, "run", "--netns", a.Path, "--netns", b.Path, "--netns", a.Path, "--redirect", "80=3210", "--pin-dir", pin)
	if code != 2 || !strings.Contains(stderr, "one network namespace") || strings.Count(strings.TrimSpace(stderr), "\n") != 0 {
		t.Errorf("run with %s given twice: exit %d, %q; want exit 2, one line", a.Path, code, stderr)
	}
	testenv.AssertGone(t, pin, nil)

	d := testenv.Daemon(t, pin, "run", "--netns", a.Path, "--netns", b.Path, "--redirect", "80=3210", "--remove-on-exit")
	for _, ns := range []testenv.Netns{a, b} {
		if peer, err := ns.Dial("tcp", "127.0.0.1:80"); err != nil || peer != "127.0.0.1:80" {
			t.Errorf("%s: 127.0.0.1:80 -> %q, %v; want redirected, peer 127.0.0.1:80", ns.Path, peer, err)
		}
	}
	if _, err := other.Dial("tcp", "127.0.0.1:80"); err == nil {
		t.Errorf("%s, not given, was redirected too", other.Path)
	}
	rows := testenv.Status(t, pin)
	if len(testenv.RowsOf(rows, a.Path)) != 1 || len(testenv.RowsOf(rows, b.Path)) != 1 || len(rows) != 2 {
		t.Errorf("status %+v; want one row for each of %s and %s", rows, a.Path, b.Path)
	}
	ids := testenv.ProgIDs(t, pin)
	if err := d.Stop(syscall.SIGTERM, 5*time.Second); err != nil {
		t.Fatalf("SIGTERM: %v", err)
	}
	testenv.AssertGone(t, pin, ids)
}
