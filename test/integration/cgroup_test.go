package integration

import (
	"bytes"
	"context"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/nsredirect/nsredirect/internal/testenv"
	"golang.org/x/sys/unix"
)

// hybridCgroup builds what a hybrid (cgroup v1 + v2) host's /sys/fs/cgroup
// looks like once bound into a container, on any host: a tmpfs whose
// unified/ is the cgroup2 root. Unmounted at cleanup.
func hybridCgroup(t *testing.T) string {
	t.Helper()
	dir := t.TempDir()
	if err := unix.Mount("tmpfs", dir, "tmpfs", 0, "size=1m"); err != nil {
		t.Fatalf("mount tmpfs at %s: %v", dir, err)
	}
	t.Cleanup(func() {
		if err := unix.Unmount(dir, unix.MNT_DETACH); err != nil {
			t.Errorf("unmount %s: %v", dir, err)
		}
	})
	unified := filepath.Join(dir, "unified")
	if err := os.Mkdir(unified, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := unix.Mount(testenv.RootCgroup(t), unified, "", unix.MS_BIND, ""); err != nil {
		t.Fatalf("bind the cgroup2 root at %s: %v", unified, err)
	}
	t.Cleanup(func() {
		if err := unix.Unmount(unified, unix.MNT_DETACH); err != nil {
			t.Errorf("unmount %s: %v", unified, err)
		}
	})
	return dir
}

// subCgroup creates a cgroup below the cgroup2 root, removed at cleanup
// (register it before starting anything in it).
func subCgroup(t *testing.T) string {
	t.Helper()
	dir := filepath.Join(testenv.RootCgroup(t), testenv.Name("nsr-sub-"))
	if err := os.Mkdir(dir, 0o755); err != nil {
		t.Fatalf("create cgroup %s: %v", dir, err)
	}
	t.Cleanup(func() {
		// Processes moved in have ended by now (their cleanup runs first);
		// the kernel may take a moment to drop them from the cgroup.
		deadline := time.Now().Add(5 * time.Second)
		for unix.Rmdir(dir) == unix.EBUSY && time.Now().Before(deadline) {
			time.Sleep(20 * time.Millisecond)
		}
		if _, err := os.Stat(dir); !os.IsNotExist(err) {
			t.Errorf("cgroup %s left behind", dir)
		}
	})
	return dir
}

// TestHybridCgroupAttachesAtUnified: `--cgroup` naming a hybrid hierarchy
// (the compose file's /host/cgroup2 on a v1 + v2 host) attaches at its
// unified/ part in run mode too, says so in the log, and redirects.
func TestHybridCgroupAttachesAtUnified(t *testing.T) {
	pin := testenv.BPFFS(t)
	ns := testenv.NewNetns(t)
	testenv.Server(t, ns, ":3210")
	hybrid := hybridCgroup(t)
	d := testenv.Daemon(t, pin, "run", "--netns", ns.Path, "--redirect", "80=3210", "--cgroup", hybrid)
	if out := d.Output(); !strings.Contains(out, "hybrid") || !strings.Contains(out, filepath.Join(hybrid, "unified")) {
		t.Errorf("the fallback to %s/unified is not logged:\n%s", hybrid, out)
	}
	if got := curl(t, ns, "http://127.0.0.1/"); !strings.Contains(got, "demo-backend") {
		t.Errorf("curl http://127.0.0.1/ = %q, want the backend on :3210", got)
	}
}

// TestSubCgroupRefused: programs attached at a sub-cgroup would miss every
// connect outside it, so `--cgroup SUB` exits 2 naming it and leaves nothing
// pinned or attached there.
func TestSubCgroupRefused(t *testing.T) {
	pin := testenv.BPFFS(t)
	ns := testenv.NewNetns(t)
	sub := subCgroup(t)
	// A socket for docker mode to find; it is refused before any request.
	sock := filepath.Join(t.TempDir(), "docker.sock")
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	for _, mode := range [][]string{
		{"run", "--netns", ns.Path, "--redirect", "80=3210"},
		{"docker", "--docker-host", "unix://" + sock},
	} {
		args := append(mode, "--cgroup", sub, "--pin-dir", pin)
		code, stdout, stderr := runBounded(t, 20*time.Second, args...)
		if code != 2 || !strings.Contains(stderr, sub) || !strings.Contains(stderr, "sub-cgroup") || strings.Count(strings.TrimSpace(stderr), "\n") > 0 {
			t.Errorf("%s --cgroup %s: exit %d, stderr %q; want exit 2 and one line naming it as a sub-cgroup\nstdout: %s", mode[0], sub, code, stderr, stdout)
		}
	}
	if _, err := os.Stat(pin); !os.IsNotExist(err) {
		t.Errorf("a refused --cgroup left the pin dir %s behind", pin)
	}
	if out, err := exec.Command(testenv.Tool(t, "bpftool"), "cgroup", "show", sub).CombinedOutput(); err != nil || strings.Contains(string(out), "nsr_") {
		t.Errorf("bpftool cgroup show %s: %v\n%s", sub, err, out)
	}
}

// TestRootCgroupAcceptedInPrivateCgroupNamespace: a daemon in its own
// cgroup namespace rooted at a sub-cgroup (a container with
// cgroupns=private) still sees the host's cgroup2 root through its mount,
// accepts it and redirects.
func TestRootCgroupAcceptedInPrivateCgroupNamespace(t *testing.T) {
	pin := testenv.BPFFS(t)
	ns := testenv.NewNetns(t)
	testenv.Server(t, ns, ":3210")
	sub := subCgroup(t)
	fd, err := unix.Open(sub, unix.O_DIRECTORY|unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fd)
	bin := testenv.Binary(t, "NSREDIRECT_BIN", "github.com/nsredirect/nsredirect/cmd/nsredirect")
	cmd := exec.Command(bin, "run", "--netns", ns.Path, "--redirect", "80=3210", "--cgroup", testenv.RootCgroup(t), "--pin-dir", pin)
	cmd.SysProcAttr = &syscall.SysProcAttr{Cloneflags: unix.CLONE_NEWCGROUP, UseCgroupFD: true, CgroupFD: fd}
	d := testenv.Start(t, cmd)
	d.WaitOutput(t, "nsredirect running", 20*time.Second)
	theirs, err1 := os.Readlink(filepath.Join("/proc", strconv.Itoa(d.Cmd.Process.Pid), "ns", "cgroup"))
	ours, err2 := os.Readlink("/proc/self/ns/cgroup")
	if err1 != nil || err2 != nil || theirs == ours {
		t.Fatalf("daemon not in a private cgroup namespace: %s (%v) vs ours %s (%v)", theirs, err1, ours, err2)
	}
	if got := curl(t, ns, "http://127.0.0.1/"); !strings.Contains(got, "demo-backend") {
		t.Errorf("curl http://127.0.0.1/ = %q, want the backend on :3210", got)
	}
}

// runBounded runs nsredirect to completion like testenv.Run, but a daemon
// that accepted what it should refuse is stopped (by its pid) after limit
// and reported as exit -1, so the test fails instead of hanging.
func runBounded(t *testing.T, limit time.Duration, args ...string) (int, string, string) {
	t.Helper()
	bin := testenv.Binary(t, "NSREDIRECT_BIN", "github.com/nsredirect/nsredirect/cmd/nsredirect")
	ctx, cancel := context.WithTimeout(context.Background(), limit)
	defer cancel()
	cmd := exec.CommandContext(ctx, bin, args...)
	cmd.Env = []string{"PATH=" + os.Getenv("PATH")}
	cmd.Cancel = func() error { return cmd.Process.Signal(syscall.SIGTERM) }
	cmd.WaitDelay = 5 * time.Second
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	if ctx.Err() != nil {
		return -1, stdout.String(), stderr.String()
	}
	if ee, ok := err.(*exec.ExitError); ok {
		return ee.ExitCode(), stdout.String(), stderr.String()
	} else if err != nil {
		t.Fatalf("run nsredirect: %v", err)
	}
	return 0, stdout.String(), stderr.String()
}

// TestCheckFollowsTheDaemonsCgroupRule: where `check --netns` needs the BPF
// probe (Linux < 5.14; forced here), it attaches it where the daemon
// attaches (loader.Cgroup2Root): a hybrid hierarchy through its unified/,
// a sub-cgroup refused with exit 2, as the daemon's --cgroup is.
func TestCheckFollowsTheDaemonsCgroupRule(t *testing.T) {
	pin := testenv.BPFFS(t)
	ns := testenv.NewNetns(t)
	testenv.Server(t, ns, ":3210")
	hybrid := hybridCgroup(t)
	sub := subCgroup(t)
	testenv.Daemon(t, pin, "run", "--netns", ns.Path, "--redirect", "80=3210", "--cgroup", hybrid, "--remove-on-exit")
	probe := []string{"NSREDIRECT_NETNS_COOKIE=bpf-probe"}
	if code, stdout, stderr := testenv.Run(t, probe, "check", "--netns", ns.Path, "--cgroup", hybrid, "--dial", "127.0.0.1:80", "--pin-dir", pin); code != 0 {
		t.Errorf("check --cgroup %s (hybrid) through the probe: exit %d\n%s%s", hybrid, code, stdout, stderr)
	}
	code, _, stderr := testenv.Run(t, probe, "check", "--netns", ns.Path, "--cgroup", sub, "--pin-dir", pin)
	if code != 2 || !strings.Contains(stderr, "sub-cgroup") {
		t.Errorf("check --cgroup %s (a sub-cgroup) through the probe: exit %d, %q; want exit 2 naming a sub-cgroup", sub, code, stderr)
	}
	if out, err := exec.Command(testenv.Tool(t, "bpftool"), "cgroup", "show", sub).CombinedOutput(); err != nil || strings.Contains(string(out), "nsr_") {
		t.Errorf("bpftool cgroup show %s: %v\n%s", sub, err, out)
	}
}
