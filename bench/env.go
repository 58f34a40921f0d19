package main

import (
	"context"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/nsredirect/nsredirect/internal/netnsx"
)

var lookPath = exec.LookPath

// env owns everything the benchmark creates and removes it in reverse
// order, whatever happens.
type env struct {
	ctx      context.Context
	cfg      config
	pinDir   string
	cleanups []func()
	// daemonPID is the nsredirect daemon of the measurement under way.
	daemonPID int
	// daemonLog keeps the end of the last started daemon's log, for errors.
	daemonLog *tailBuffer
}

// tailBuffer keeps the last 4 KB written to it; safe for concurrent use.
type tailBuffer struct {
	mu sync.Mutex
	b  []byte
}

func (t *tailBuffer) Write(p []byte) (int, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.b = append(t.b, p...)
	if n := len(t.b) - 4096; n > 0 {
		t.b = append(t.b[:0], t.b[n:]...)
	}
	return len(p), nil
}

func (t *tailBuffer) String() string {
	if t == nil {
		return "(none)"
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	return string(t.b)
}

func newEnv(ctx context.Context, c config) *env {
	return &env{ctx: ctx, cfg: c}
}

func (e *env) onClose(f func()) { e.cleanups = append(e.cleanups, f) }

func (e *env) close() {
	for i := len(e.cleanups) - 1; i >= 0; i-- {
		e.cleanups[i]()
	}
	e.cleanups = nil
}

// bpffs mounts a private bpffs so the benchmark never shares pins with a
// daemon the machine runs.
func (e *env) bpffs() error {
	dir, err := os.MkdirTemp("", "nsr-bench-bpffs-")
	if err != nil {
		return err
	}
	if err := unix.Mount("bpf", dir, "bpf", 0, "mode=0700"); err != nil {
		os.Remove(dir)
		return fmt.Errorf("mount bpffs: %w", err)
	}
	e.onClose(func() {
		_ = unix.Unmount(dir, unix.MNT_DETACH)
		_ = os.Remove(dir)
	})
	e.pinDir = filepath.Join(dir, "nsredirect")
	return nil
}

// netns creates a namespace with lo up and a backend serving :3210.
func (e *env) netns(name string) (netnsx.Target, error) {
	if out, err := exec.Command("ip", "netns", "add", name).CombinedOutput(); err != nil {
		return netnsx.Target{}, fmt.Errorf("ip netns add %s: %v: %s", name, err, out)
	}
	e.onClose(func() { _ = exec.Command("ip", "netns", "del", name).Run() })
	if out, err := exec.Command("ip", "-n", name, "link", "set", "lo", "up").CombinedOutput(); err != nil {
		return netnsx.Target{}, fmt.Errorf("lo up in %s: %v: %s", name, err, out)
	}
	t, err := netnsx.ParseTarget("/run/netns/" + name)
	if err != nil {
		return t, err
	}
	backend, _ := filepath.Abs(e.cfg.backend)
	if _, err := e.start("ip", "netns", "exec", name, backend, "--listen", ":3210"); err != nil {
		return t, err
	}
	return t, waitDial(t, "127.0.0.1:3210")
}

// start runs a process until the benchmark ends; it is stopped by pid.
func (e *env) start(name string, args ...string) (*exec.Cmd, error) {
	return e.startTo(nil, name, args...)
}

// startTo is start with the process's stderr written to w (nil: dropped).
func (e *env) startTo(w io.Writer, name string, args ...string) (*exec.Cmd, error) {
	cmd := exec.Command(name, args...)
	cmd.Stdout, cmd.Stderr = nil, w
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start %s: %w", name, err)
	}
	done := make(chan struct{})
	go func() { _ = cmd.Wait(); close(done) }()
	stop := func() {
		select {
		case <-done:
			return
		default:
		}
		_ = cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-done:
		case <-time.After(5 * time.Second):
			_ = cmd.Process.Kill()
			<-done
		}
	}
	e.onClose(stop)
	return cmd, nil
}

// stopNow stops a process started with start before the benchmark ends.
func stopNow(cmd *exec.Cmd) {
	_ = cmd.Process.Signal(syscall.SIGTERM)
	for i := 0; i < 500; i++ {
		if cmd.ProcessState != nil || syscall.Kill(cmd.Process.Pid, 0) != nil {
			return
		}
		time.Sleep(10 * time.Millisecond)
	}
	_ = cmd.Process.Kill()
}

// waitDial waits until addr accepts connections from inside t.
func waitDial(t netnsx.Target, addr string) error {
	deadline := time.Now().Add(10 * time.Second)
	for {
		err := t.Do(func() error {
			c, err := net.DialTimeout("tcp", addr, 200*time.Millisecond)
			if err == nil {
				c.Close()
			}
			return err
		})
		if err == nil {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%s in %s never accepted: %w", addr, t, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// A path is one way to make FROM reach TO inside a namespace. setup returns
// the function that takes it down again.
type path struct {
	name  string
	setup func(e *env, ns netnsx.Target, nsName string, from, to int) (func(), error)
}

var paths = []path{
	{"direct", func(*env, netnsx.Target, string, int, int) (func(), error) { return func() {}, nil }},
	{"nsredirect", func(e *env, ns netnsx.Target, _ string, from, to int) (func(), error) {
		bin, _ := filepath.Abs(e.cfg.nsredirect)
		cmd, err := e.start(bin, "run", "--netns", ns.Path, "--redirect", fmt.Sprintf("%d=%d", from, to), "--pin-dir", e.pinDir, "--log-level", "warn", "--remove-on-exit")
		if err != nil {
			return nil, err
		}
		deadline := time.Now().Add(10 * time.Second)
		for exec.Command(bin, "check", "--netns", ns.Path, "--pin-dir", e.pinDir).Run() != nil {
			if time.Now().After(deadline) {
				stopNow(cmd)
				return nil, fmt.Errorf("nsredirect did not become live in %s", ns)
			}
			time.Sleep(20 * time.Millisecond)
		}
		e.daemonPID = cmd.Process.Pid
		return func() { stopNow(cmd) }, nil
	}},
	{"socat", func(e *env, ns netnsx.Target, nsName string, from, to int) (func(), error) {
		cmd, err := e.start("ip", "netns", "exec", nsName, "socat",
			fmt.Sprintf("TCP-LISTEN:%d,fork,reuseaddr", from), fmt.Sprintf("TCP:127.0.0.1:%d", to))
		if err != nil {
			return nil, err
		}
		if err := waitDial(ns, fmt.Sprintf("127.0.0.1:%d", from)); err != nil {
			stopNow(cmd)
			return nil, err
		}
		return func() { stopNow(cmd) }, nil
	}},
	{"iptables", func(e *env, _ netnsx.Target, nsName string, from, to int) (func(), error) {
		rule := []string{"-t", "nat", "OUTPUT", "-p", "tcp", "-d", "127.0.0.1", "--dport", strconv.Itoa(from), "-j", "REDIRECT", "--to-ports", strconv.Itoa(to)}
		ipt := func(op string) error {
			args := append([]string{"netns", "exec", nsName, "iptables", "-w", rule[0], rule[1], op}, rule[2:]...)
			if out, err := exec.Command("ip", args...).CombinedOutput(); err != nil {
				return fmt.Errorf("iptables %s: %v: %s", op, err, strings.TrimSpace(string(out)))
			}
			return nil
		}
		if err := ipt("-A"); err != nil {
			return nil, err
		}
		return func() { _ = ipt("-D") }, nil
	}},
}

func rssKB(pid int) int {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0
	}
	for _, line := range strings.Split(string(b), "\n") {
		if f := strings.Fields(line); len(f) >= 2 && f[0] == "VmRSS:" {
			n, _ := strconv.Atoi(f[1])
			return n
		}
	}
	return 0
}

// busyJiffies reads the machine's non-idle CPU time from /proc/stat.
func busyJiffies() (busy uint64) {
	b, err := os.ReadFile("/proc/stat")
	if err != nil {
		return 0
	}
	f := strings.Fields(strings.SplitN(string(b), "\n", 2)[0])
	for i, v := range f[1:] {
		n, _ := strconv.ParseUint(v, 10, 64)
		if i != 3 && i != 4 { // idle, iowait
			busy += n
		}
	}
	return busy
}
