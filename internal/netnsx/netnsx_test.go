package netnsx

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

func TestParseTarget(t *testing.T) {
	for in, want := range map[string]string{
		"self":           "/proc/thread-self/ns/net",
		"pid:1":          "/proc/1/ns/net",
		"pid:4242":       "/proc/4242/ns/net",
		"/run/netns/x":   "/run/netns/x",
		"/proc/7/ns/net": "/proc/7/ns/net",
	} {
		got, err := ParseTarget(in)
		if err != nil || got.Path != want || got.Spec != in {
			t.Errorf("ParseTarget(%q) = %+v, %v; want path %s", in, got, err, want)
		}
	}
	for _, bad := range []string{"", "pid:", "pid:0", "pid:-3", "pid:x", "pid:99999999999", "netns", "run/netns/x", "SELF"} {
		if _, err := ParseTarget(bad); !errors.Is(err, ErrTarget) {
			t.Errorf("ParseTarget(%q) = %v, want ErrTarget", bad, err)
		}
	}
}

func TestResolveRefusesMissingAndNonNetns(t *testing.T) {
	notNetns := filepath.Join(t.TempDir(), "file")
	if err := os.WriteFile(notNetns, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	for _, path := range []string{"/nonexistent/netns", notNetns, t.TempDir()} {
		tg, _ := ParseTarget(path)
		if _, _, err := tg.Resolve(); !errors.Is(err, ErrTarget) {
			t.Errorf("Resolve(%s) = %v, want ErrTarget", path, err)
		}
	}
}

// ResolveWith runs the reader on a throwaway thread inside the namespace: the
// caller's own thread is unchanged. The reader here returns the namespace
// inode its thread sees, so this holds on kernels without SO_NETNS_COOKIE.
func TestResolveWithReadsInsideAndLeavesCallerAlone(t *testing.T) {
	if os.Geteuid() != 0 {
		if os.Getenv("CI") == "true" {
			t.Fatal("needs root; CI runs as root")
		}
		t.Skip("entering a netns needs CAP_SYS_ADMIN; run as root")
	}
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	threadIno := func() (uint64, error) {
		var st unix.Stat_t
		err := unix.Stat("/proc/thread-self/ns/net", &st)
		return st.Ino, err
	}
	before, err := threadIno()
	if err != nil {
		t.Fatal(err)
	}
	self, _ := ParseTarget("self")
	for i := 0; i < 20; i++ {
		got, id, err := self.ResolveWith(threadIno)
		if err != nil || got != before || id.Ino != before {
			t.Fatalf("ResolveWith(self) = %d, %+v, %v; want netns inode %d from inside", got, id, err, before)
		}
	}
	if after, _ := threadIno(); after != before {
		t.Fatalf("caller's netns changed: inode %d -> %d", before, after)
	}
	failing := errors.New("no cookie here")
	if _, _, err := self.ResolveWith(func() (uint64, error) { return 0, failing }); !errors.Is(err, failing) {
		t.Fatalf("a failing reader: %v, want it wrapped", err)
	}
}

// A namespace that only a process keeps alive (no fd, no bind mount: a
// container's, before its runtime pins it) has the same ID on every look,
// though the kernel makes a new nsfs inode object, with a new change time,
// each time; a new namespace under the same path, or a reused pid, does not.
func TestStatStableForUnheldNetns(t *testing.T) {
	if os.Geteuid() != 0 {
		if os.Getenv("CI") == "true" {
			t.Fatal("needs root; CI runs as root")
		}
		t.Skip("unshare -n needs CAP_SYS_ADMIN; run as root")
	}
	first, tg := unshareSleep(t)
	id, err := tg.Stat()
	if err != nil {
		t.Fatal(err)
	}
	var host unix.Stat_t
	if err := unix.Stat("/proc/self/ns/net", &host); err != nil {
		t.Fatal(err)
	}
	if id.Ino == host.Ino {
		t.Fatal("unshare --net did not make a new netns")
	}
	ctimes := map[unix.Timespec]bool{}
	for i := 0; i < 5; i++ {
		// Let the clock move on: the change time of a fresh inode object
		// is the time of the look.
		time.Sleep(20 * time.Millisecond)
		var st unix.Stat_t
		if err := unix.Stat(tg.Path, &st); err == nil {
			ctimes[st.Ctim] = true
		}
		again, err := tg.Stat()
		if err != nil || again != id {
			t.Fatalf("look %d: ID %+v, %v; want %+v", i, again, err, id)
		}
		_, resolved, err := tg.ResolveWith(func() (uint64, error) { return 0, nil })
		if err != nil || resolved != id {
			t.Fatalf("look %d: ResolveWith ID %+v, %v; want %+v", i, resolved, err, id)
		}
	}
	t.Logf("raw nsfs change times seen over 5 looks: %d distinct", len(ctimes))

	if tg.Changed(id) {
		t.Fatalf("Changed(%+v) while the process lives", id)
	}
	if id.ProcIno == 0 || id.Start == 0 {
		t.Fatalf("ID %+v of a /proc/PID/ns/net path has no process identity", id)
	}

	// The process and its namespace go; a new one is a new ID even where the
	// kernel hands out the same inode number again.
	_ = first.Process.Kill()
	_ = first.Wait()
	if !tg.Changed(id) {
		t.Fatalf("Changed(%+v) is false after the process exited", id)
	}
	_, tg2 := unshareSleep(t)
	id2, err := tg2.Stat()
	if err != nil {
		t.Fatal(err)
	}
	if id2 == id {
		t.Fatalf("a new netns has the old one's ID %+v", id)
	}
}

func TestProcStartSkipsOddCommandNames(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "42")
	if err := os.Mkdir(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	stat := "42 (a) b (c)) S 1 42 42 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 1000 100"
	if err := os.WriteFile(filepath.Join(dir, "stat"), []byte(stat), 0o600); err != nil {
		t.Fatal(err)
	}
	if got, err := ProcStart(dir); err != nil || got != 987654 {
		t.Fatalf("ProcStart = %d, %v; want 987654", got, err)
	}
	if err := os.WriteFile(filepath.Join(dir, "stat"), []byte("42 (x"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := ProcStart(dir); err == nil {
		t.Fatal("ProcStart of a truncated stat: no error")
	}
}

// A look at a /proc/PID/ns/net target reads PID/stat once per process: the
// start time is kept while PROC/PID keeps its inode number, and read again
// for a new PROC/PID (a new process under a reused pid).
func TestStartTimeReadOncePerProcess(t *testing.T) {
	root := t.TempDir()
	dir := filepath.Join(root, "4242")
	mk := func(start int) {
		t.Helper()
		if err := os.MkdirAll(filepath.Join(dir, "ns"), 0o700); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dir, "ns", "net"), nil, 0o600); err != nil {
			t.Fatal(err)
		}
		setStart(t, dir, start)
	}
	mk(1000)
	tg, err := ParseTarget(filepath.Join(dir, "ns", "net"))
	if err != nil {
		t.Fatal(err)
	}
	id, err := tg.Stat()
	if err != nil || id.Start != 1000 || id.ProcIno == 0 {
		t.Fatalf("Stat = %+v, %v; want start 1000 and the inode of %s", id, err, dir)
	}
	setStart(t, dir, 2000) // not read again: same directory, same process
	if again, err := tg.Stat(); err != nil || again != id {
		t.Fatalf("second look = %+v, %v; want %+v (from the cache)", again, err, id)
	}
	if tg.Changed(id) {
		t.Fatal("Changed while the process directory is the same")
	}

	// A new process under the same pid: a new directory inode.
	// The old directory is kept (renamed), so its inode number stays taken.
	if err := os.Rename(dir, filepath.Join(root, "old")); err != nil {
		t.Fatal(err)
	}
	mk(3000)
	if !tg.Changed(id) {
		t.Fatal("Changed is false for a new process directory")
	}
	if again, err := tg.Stat(); err != nil || again.Start != 3000 {
		t.Fatalf("look at the new process = %+v, %v; want start 3000", again, err)
	}
	if err := os.RemoveAll(dir); err != nil {
		t.Fatal(err)
	}
	if !tg.Changed(id) {
		t.Fatal("Changed is false for a process gone")
	}
}

func TestProcDir(t *testing.T) {
	for path, want := range map[string]string{
		"/proc/12/ns/net":       "/proc/12",
		"/host/proc/7/ns/net":   "/host/proc/7",
		"/proc/self/ns/net":     "",
		"/proc/12/ns/mnt":       "",
		"/run/netns/a":          "",
		"/proc//ns/net":         "",
		"12/ns/net":             "",
		"/proc/1a/ns/net":       "",
		"/proc/thread-self/net": "",
	} {
		if got := procDir(path); got != want {
			t.Errorf("procDir(%q) = %q, want %q", path, got, want)
		}
	}
}

func setStart(t *testing.T, dir string, start int) {
	t.Helper()
	stat := fmt.Sprintf("4242 (x) S 1 4242 4242 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 %d 1000 100", start)
	if err := os.WriteFile(filepath.Join(dir, "stat"), []byte(stat), 0o600); err != nil {
		t.Fatal(err)
	}
}

// WatchExit: the exit of the process a /proc/PID/ns/net target goes through
// is told with no polling; a closed watch says nothing; paths that are not
// this pid namespace's processes are not watched.
func TestWatchExit(t *testing.T) {
	if os.Geteuid() != 0 {
		if os.Getenv("CI") == "true" {
			t.Fatal("needs root; CI runs as root")
		}
		t.Skip("unshare -n needs CAP_SYS_ADMIN; run as root")
	}
	start := func() (*exec.Cmd, Target, ID) {
		t.Helper()
		cmd, tg := unshareSleep(t)
		id, err := tg.Stat()
		if err != nil {
			t.Fatal(err)
		}
		return cmd, tg, id
	}
	cmd, tg, id := start()
	exited := make(chan struct{}, 1)
	w, err := tg.WatchExit(id, func() { exited <- struct{}{} })
	if err != nil || w == nil {
		t.Fatalf("WatchExit = %v, %v; want a watch", w, err)
	}
	defer w.Close()
	select {
	case <-exited:
		t.Fatal("exit told while the process lives")
	case <-time.After(100 * time.Millisecond):
	}
	if w.Done() {
		t.Fatal("Done while the process lives")
	}
	_ = cmd.Process.Kill()
	select {
	case <-exited:
	case <-time.After(10 * time.Second): // bounds a hang only
		t.Fatal("the exit of the process was not told")
	}
	if !w.Done() {
		t.Fatal("not Done after the exit")
	}
	_ = cmd.Wait() // reaped: the pid is free now

	// Closed first: nothing is told.
	cmd2, tg2, id2 := start()
	quiet := make(chan struct{}, 1)
	w2, err := tg2.WatchExit(id2, func() { quiet <- struct{}{} })
	if err != nil || w2 == nil {
		t.Fatalf("WatchExit = %v, %v; want a watch", w2, err)
	}
	w2.Close()
	_ = cmd2.Process.Kill()
	_ = cmd2.Wait()
	select {
	case <-quiet:
		t.Fatal("a closed watch told an exit")
	case <-time.After(200 * time.Millisecond):
	}

	// Gone before the watch: refused, so the caller probes. (A zombie not
	// yet reaped is watched, and told at once.)
	if w, err := tg.WatchExit(id, func() {}); err == nil || w != nil {
		t.Errorf("WatchExit of an exited process = %v, %v; want an error", w, err)
	}
	// Not ours to open: a host /proc mounted elsewhere, a bind mount.
	for _, p := range []string{"/host/proc/1/ns/net", "/run/netns/x"} {
		if w, err := (Target{Spec: p, Path: p}).WatchExit(ID{ProcIno: 1}, func() {}); w != nil || err != nil {
			t.Errorf("WatchExit(%s) = %v, %v; want no watch and no error", p, w, err)
		}
	}
}

// TestWatchExitInterruptedPoll: a signal that interrupts the watch's
// poll(2) (EINTR, as the Go runtime's preemption signals do, often under
// load or emulation) is not the process's exit. Before the fix, an EINTR
// was taken for readiness and the exit told while the process lived (seen
// as TestExitOfWatchedProcessTold failing on arm64 under qemu).
func TestWatchExitInterruptedPoll(t *testing.T) {
	if os.Geteuid() != 0 {
		if os.Getenv("CI") == "true" {
			t.Fatal("needs root; CI runs as root")
		}
		t.Skip("unshare -n needs CAP_SYS_ADMIN; run as root")
	}
	cmd, tg := unshareSleep(t)
	id, err := tg.Stat()
	if err != nil {
		t.Fatal(err)
	}
	var calls atomic.Int32
	polled := make(chan struct{}, 1)
	poll = func(fds []unix.PollFd, timeout int) (int, error) {
		n := calls.Add(1)
		if n <= 3 {
			return -1, unix.EINTR
		}
		defer func() {
			select {
			case polled <- struct{}{}:
			default:
			}
		}()
		return unix.Poll(fds, timeout)
	}
	defer func() { poll = unix.Poll }()
	exited := make(chan struct{}, 1)
	w, err := tg.WatchExit(id, func() { exited <- struct{}{} })
	if err != nil || w == nil {
		t.Fatalf("WatchExit = %v, %v; want a watch", w, err)
	}
	defer w.Close()
	select {
	case <-exited:
		t.Fatal("an interrupted poll was told as the exit of a live process")
	case <-polled: // past the interruptions, a real answer given
	case <-time.After(10 * time.Second): // bounds a hang only
		t.Fatal("the watch never polled past the interruptions")
	}
	select {
	case <-exited:
		t.Fatal("an interrupted poll was told as the exit of a live process")
	default:
	}
	if w.Done() {
		t.Fatal("Done while the process lives")
	}
	_ = cmd.Process.Kill()
	select {
	case <-exited:
	case <-time.After(10 * time.Second): // bounds a hang only
		t.Fatal("the exit of the process was not told")
	}
	_ = cmd.Wait()
}

// unshareSleep starts `sleep 60` in a netns of its own (unshare --net) and
// returns it once it runs there, with its pid:N target; ended at cleanup.
func unshareSleep(t *testing.T) (*exec.Cmd, Target) {
	t.Helper()
	cmd := exec.Command("unshare", "--net", "sleep", "60")
	if err := cmd.Start(); err != nil {
		t.Fatalf("unshare --net sleep: %v", err)
	}
	t.Cleanup(func() { _ = cmd.Process.Kill(); _ = cmd.Wait() })
	tg, err := ParseTarget(fmt.Sprintf("pid:%d", cmd.Process.Pid))
	if err != nil {
		t.Fatal(err)
	}
	// unshare execs sleep once the namespace is made.
	deadline := time.Now().Add(10 * time.Second)
	for {
		comm, _ := os.ReadFile(fmt.Sprintf("/proc/%d/comm", cmd.Process.Pid))
		if strings.TrimSpace(string(comm)) == "sleep" {
			return cmd, tg
		}
		if time.Now().After(deadline) {
			t.Fatal("unshare did not exec sleep within 10s")
		}
		time.Sleep(5 * time.Millisecond)
	}
}
