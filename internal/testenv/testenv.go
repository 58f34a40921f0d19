// Package testenv gives privileged tests their own network namespaces,
// bpffs mount, servers and daemons, and removes every one of them with
// t.Cleanup, even when the test fails. Under CI=true a test that needs root
// or the kernel and cannot have them fails instead of skipping.
package testenv

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/nsredirect/nsredirect/internal/loader"
	"github.com/nsredirect/nsredirect/internal/netnsx"
)

// Privileged skips, or under CI=true fails, unless the test runs as root.
func Privileged(t testing.TB) {
	t.Helper()
	if os.Geteuid() == 0 {
		return
	}
	if os.Getenv("CI") == "true" {
		t.Fatal("this test needs root and the kernel; CI must run it (sudo make test)")
	}
	t.Skip("needs root: run `sudo make test`")
}

// Tool returns the path of an external program the test needs, failing
// under CI=true (where `make deps` must have installed it) and skipping
// elsewhere.
func Tool(t testing.TB, name string) string {
	t.Helper()
	p, err := exec.LookPath(name)
	if err == nil {
		return p
	}
	if os.Getenv("CI") == "true" {
		t.Fatalf("%s is not installed; `make deps` installs it", name)
	}
	t.Skipf("%s is not installed; run `sudo make deps`", name)
	return ""
}

// Binary returns the path in env var key (NSREDIRECT_BIN, DEMO_BACKEND_BIN;
// the Makefile sets both), or builds pkg. A build goes to one directory
// that every test process reuses (os.TempDir()/nsredirect-test-bin), not a
// new one per process: nothing tells a test binary when the last test that
// needs the program is done, so a directory per process would be left
// behind by each. Each build lands there by rename, so a process still
// running the previous build keeps it.
func Binary(t testing.TB, key, pkg string) string {
	t.Helper()
	if p := os.Getenv(key); p != "" {
		return p
	}
	buildMu.Lock()
	defer buildMu.Unlock()
	if p, ok := built[pkg]; ok {
		return p
	}
	dir := filepath.Join(os.TempDir(), "nsredirect-test-bin")
	if err := os.MkdirAll(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	out := filepath.Join(dir, filepath.Base(pkg))
	tmp := fmt.Sprintf("%s.%d", out, os.Getpid())
	cmd := exec.Command("go", "build", "-o", tmp, pkg)
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if b, err := cmd.CombinedOutput(); err != nil {
		os.Remove(tmp)
		t.Fatalf("build %s: %v\n%s", pkg, err, b)
	}
	if err := os.Rename(tmp, out); err != nil {
		os.Remove(tmp)
		t.Fatal(err)
	}
	built[pkg] = out
	return out
}

var (
	buildMu sync.Mutex
	built   = map[string]string{}
)

// Name returns a short unique name with prefix, for netns and dirs.
func Name(prefix string) string {
	b := make([]byte, 4)
	_, _ = rand.Read(b)
	return prefix + hex.EncodeToString(b)
}

// Netns is a named network namespace at /run/netns/Name with lo up.
type Netns struct {
	Name string
	Path string
}

// Target is the netnsx target of the namespace.
func (n Netns) Target() netnsx.Target {
	t, _ := netnsx.ParseTarget(n.Path)
	return t
}

// NewNetns creates a network namespace and deletes it at cleanup.
func NewNetns(t testing.TB) Netns {
	t.Helper()
	Privileged(t)
	name := Name("nsrt-")
	errc := make(chan error, 1)
	go func() {
		// This thread ends up in the new netns; never unlocked, so the
		// runtime discards it.
		runtime.LockOSThread()
		h, err := netns.NewNamed(name)
		if err != nil {
			errc <- err
			return
		}
		defer h.Close()
		lo, err := netlink.LinkByName("lo")
		if err == nil {
			err = netlink.LinkSetUp(lo)
		}
		errc <- err
	}()
	if err := <-errc; err != nil {
		_ = netns.DeleteNamed(name)
		t.Fatalf("create netns %s: %v", name, err)
	}
	n := Netns{Name: name, Path: filepath.Join("/run/netns", name)}
	t.Cleanup(func() {
		if _, err := os.Stat(n.Path); os.IsNotExist(err) {
			return // the test deleted it
		}
		if err := netns.DeleteNamed(name); err != nil {
			t.Errorf("delete netns %s: %v", name, err)
		}
	})
	return n
}

// Delete removes the namespace's name now, as `ip netns del` does; the
// namespace dies when nothing else holds it.
func (n Netns) Delete(t testing.TB) {
	t.Helper()
	if err := netns.DeleteNamed(n.Name); err != nil {
		t.Fatalf("delete netns %s: %v", n.Name, err)
	}
}

// Cookie reads the netns cookie of n, as the daemon does (see Cookies).
func (n Netns) Cookie(t testing.TB) uint64 {
	t.Helper()
	c, _, err := n.Target().ResolveWith(Cookies(t))
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// Cookies reads netns cookies the way the daemon would on this kernel:
// getsockopt(SO_NETNS_COOKIE) from 5.14, the loader's BPF probe before, or
// the probe anywhere under NSREDIRECT_NETNS_COOKIE=bpf-probe (which the
// daemons the test starts inherit too). Use it with Target.ResolveWith.
func Cookies(t testing.TB) netnsx.CookieReader {
	t.Helper()
	Privileged(t)
	src, err := loader.NewCookieSource(RootCgroup(t), os.Getenv("NSREDIRECT_NETNS_COOKIE") == loader.CookieBPFProbe)
	if err != nil {
		t.Fatalf("netns cookie source: %v", err)
	}
	t.Cleanup(func() { _ = src.Close() })
	return src.Read
}

// Command builds cmd to run inside n (through `ip netns exec`), so foreign
// clients run exactly as a user's would.
func (n Netns) Command(ctx context.Context, name string, args ...string) *exec.Cmd {
	return exec.CommandContext(ctx, "ip", append([]string{"netns", "exec", n.Name, name}, args...)...)
}

// Dial connects from inside n with a Go client and returns the peer address
// getpeername() reports.
func (n Netns) Dial(network, addr string) (string, error) {
	return DialIn(n.Target(), network, addr, 2*time.Second)
}

// DialIn connects from inside target and returns the peer address
// getpeername() reports there.
func DialIn(target netnsx.Target, network, addr string, timeout time.Duration) (string, error) {
	var peer string
	err := target.Do(func() error {
		c, err := net.DialTimeout(network, addr, timeout)
		if err != nil {
			return err
		}
		defer c.Close()
		peer = c.RemoteAddr().String()
		return nil
	})
	return peer, err
}

// BPFFS mounts a private bpffs for the test and returns a pin dir on it;
// unmounted (and so emptied) at cleanup.
func BPFFS(t testing.TB) string {
	t.Helper()
	Privileged(t)
	mnt, err := os.MkdirTemp("", "nsr-bpffs-")
	if err != nil {
		t.Fatal(err)
	}
	if err := unix.Mount("bpf", mnt, "bpf", 0, "mode=0700"); err != nil {
		t.Fatalf("mount bpffs at %s: %v", mnt, err)
	}
	t.Cleanup(func() {
		if err := unix.Unmount(mnt, unix.MNT_DETACH); err != nil {
			t.Errorf("unmount %s: %v", mnt, err)
		}
		_ = os.Remove(mnt)
	})
	return filepath.Join(mnt, "nsredirect")
}

// Proc is a process started by a test; it is ended (by its pid) at cleanup.
type Proc struct {
	Cmd  *exec.Cmd
	out  *syncBuffer
	done chan struct{}
	err  error
}

// Start runs cmd, capturing its output, and stops it at cleanup.
func Start(t testing.TB, cmd *exec.Cmd) *Proc {
	t.Helper()
	p := &Proc{Cmd: cmd, out: &syncBuffer{}, done: make(chan struct{})}
	cmd.Stdout = p.out
	cmd.Stderr = p.out
	// A child that inherited the output pipe and outlives the process
	// would otherwise keep Wait (and every Stop) waiting for EOF.
	cmd.WaitDelay = 5 * time.Second
	// No Pdeathsig: it fires when the forking OS thread exits, and threads
	// that entered a netns are discarded on purpose (netnsx.Target.Do).
	if err := cmd.Start(); err != nil {
		t.Fatalf("start %s: %v", cmd.Path, err)
	}
	go func() {
		p.err = cmd.Wait()
		close(p.done)
	}()
	t.Cleanup(func() {
		p.Stop(syscall.SIGTERM, 5*time.Second)
		if t.Failed() {
			t.Logf("output of %s:\n%s", strings.Join(cmd.Args, " "), p.Output())
		}
	})
	return p
}

// Stop signals the process and waits up to timeout, then SIGKILLs it. It
// returns the exit error (nil for exit 0).
func (p *Proc) Stop(sig syscall.Signal, timeout time.Duration) error {
	select {
	case <-p.done:
		return p.err
	default:
	}
	_ = p.Cmd.Process.Signal(sig)
	select {
	case <-p.done:
	case <-time.After(timeout):
		p.Kill()
	}
	return p.err
}

// killBound is how long a SIGKILLed process may take to be gone. Only a
// task stuck in the kernel takes longer.
const killBound = 30 * time.Second

// Kill ends the process with SIGKILL and waits for it. A process still
// there killBound later is stuck in the kernel: Kill panics with its
// kernel stack, naming the test, rather than waiting until the binary's
// -test.timeout (or a qemu guest's) ends everything with no word of why.
func (p *Proc) Kill() {
	_ = p.Cmd.Process.Kill()
	select {
	case <-p.done:
	case <-time.After(killBound):
		pid := p.Cmd.Process.Pid
		panic(fmt.Sprintf("pid %d (%s) still there %s after SIGKILL: %s", pid, p.Cmd.Args[0], killBound, kernelState(pid)))
	}
}

// kernelState is where a task waits in the kernel: its state, wchan and
// the kernel stacks of its threads, as /proc shows them to root.
func kernelState(pid int) string {
	var b strings.Builder
	if st, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid)); err == nil {
		for _, l := range strings.Split(string(st), "\n") {
			if strings.HasPrefix(l, "State:") {
				b.WriteString(strings.Join(strings.Fields(l), " "))
			}
		}
	}
	tasks, _ := filepath.Glob(fmt.Sprintf("/proc/%d/task/*", pid))
	for _, task := range tasks {
		wchan, _ := os.ReadFile(filepath.Join(task, "wchan"))
		stack, _ := os.ReadFile(filepath.Join(task, "stack"))
		fmt.Fprintf(&b, "; thread %s wchan %s stack %s", filepath.Base(task), wchan, strings.Join(strings.Fields(string(stack)), " "))
	}
	return b.String()
}

// Exited reports whether the process has ended.
func (p *Proc) Exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// Wait waits for the process to end and returns its exit code.
func (p *Proc) Wait(timeout time.Duration) (int, error) {
	select {
	case <-p.done:
	case <-time.After(timeout):
		return -1, fmt.Errorf("still running after %s", timeout)
	}
	return p.Cmd.ProcessState.ExitCode(), nil
}

// Output is what the process printed so far.
func (p *Proc) Output() string { return p.out.String() }

// WaitOutput waits until the output contains s.
func (p *Proc) WaitOutput(t testing.TB, s string, timeout time.Duration) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !strings.Contains(p.Output(), s) {
		if p.Exited() {
			t.Fatalf("%s exited before printing %q:\n%s", p.Cmd.Args[0], s, p.Output())
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s did not print %q within %s:\n%s", p.Cmd.Args[0], s, timeout, p.Output())
		}
		time.Sleep(10 * time.Millisecond)
	}
}

type syncBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// Server starts the demo backend inside n on addr (":3210" serves both
// 127.0.0.1 and ::1) and waits until it serves.
func Server(t testing.TB, n Netns, addr string) *Proc {
	t.Helper()
	bin := Binary(t, "DEMO_BACKEND_BIN", "github.com/nsredirect/nsredirect/cmd/demo-backend")
	p := Start(t, n.Command(context.Background(), bin, "--listen", addr))
	// A readiness bound, not a speed limit: the first start of a freshly
	// built binary under qemu without KVM (make test-kernels) can take >10s.
	p.WaitOutput(t, "serving on", 30*time.Second)
	return p
}

// Daemon runs `nsredirect ARGS...` with pin dir pinDir and waits until it
// reports running.
func Daemon(t testing.TB, pinDir string, args ...string) *Proc {
	t.Helper()
	p := StartNsredirect(t, pinDir, args...)
	p.WaitOutput(t, "nsredirect running", 20*time.Second)
	return p
}

// StartNsredirect starts nsredirect without waiting.
func StartNsredirect(t testing.TB, pinDir string, args ...string) *Proc {
	t.Helper()
	bin := Binary(t, "NSREDIRECT_BIN", "github.com/nsredirect/nsredirect/cmd/nsredirect")
	return Start(t, exec.Command(bin, append(args, "--pin-dir", pinDir)...))
}

// Run runs nsredirect to completion and returns its exit code and output.
func Run(t testing.TB, env []string, args ...string) (int, string, string) {
	t.Helper()
	bin := Binary(t, "NSREDIRECT_BIN", "github.com/nsredirect/nsredirect/cmd/nsredirect")
	cmd := exec.Command(bin, args...)
	cmd.Env = env
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	code := 0
	if err != nil {
		ee, ok := err.(*exec.ExitError)
		if !ok {
			t.Fatalf("run nsredirect: %v", err)
		}
		code = ee.ExitCode()
	}
	return code, stdout.String(), stderr.String()
}

// RootCgroup is the cgroup2 mount the daemon attaches at.
func RootCgroup(t testing.TB) string {
	t.Helper()
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		for i, fld := range fields {
			if fld == "-" && i+1 < len(fields) && fields[i+1] == "cgroup2" {
				return fields[4]
			}
		}
	}
	t.Fatal("no cgroup2 mount")
	return ""
}

// AttachedProgs lists the names of programs attached at the cgroup2 root
// whose name starts with prefix (ours: "nsr_"), using bpftool as an outside
// witness.
func AttachedProgs(t testing.TB, prefix string) []string {
	t.Helper()
	bpftool := Tool(t, "bpftool")
	out, err := exec.Command(bpftool, "cgroup", "show", RootCgroup(t)).CombinedOutput()
	if err != nil {
		t.Fatalf("bpftool cgroup show: %v\n%s", err, out)
	}
	var names []string
	for _, line := range strings.Split(string(out), "\n") {
		f := strings.Fields(line)
		if len(f) >= 4 && strings.HasPrefix(f[len(f)-1], prefix) {
			names = append(names, f[len(f)-1])
		}
	}
	return names
}

// ReadAll reads an HTTP-ish reply from c until EOF.
func ReadAll(r io.Reader) string {
	b, _ := io.ReadAll(io.LimitReader(r, 1<<20))
	return string(b)
}
