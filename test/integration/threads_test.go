package integration

import (
	"fmt"
	"os"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/nsredirect/nsredirect/internal/testenv"
)

// TestDaemonHoldsNoTargetNetns: no thread of a daemon stays in a target's
// netns once it has read the cookie there. The Go runtime cannot end the
// main thread: a goroutine locked to it that exits inside a namespace
// (netnsx.Do) leaves it parked there for the process's life, which would
// keep a dead container's netns alive and make it look reachable.
func TestDaemonHoldsNoTargetNetns(t *testing.T) {
	pin := testenv.BPFFS(t)
	ns := testenv.NewNetns(t)
	testenv.Server(t, ns, ":3210")
	var st unix.Stat_t
	if err := unix.Stat(ns.Path, &st); err != nil {
		t.Fatal(err)
	}
	target := fmt.Sprintf("net:[%d]", st.Ino)
	// One P: the goroutine a netnsx.Do starts then runs on the thread that
	// waits for it, the main one when the caller is the main goroutine.
	t.Setenv("GOMAXPROCS", "1")
	d := testenv.Daemon(t, pin, "run", "--netns", ns.Path, "--redirect", "80=3210", "--remove-on-exit")
	pid := d.Cmd.Process.Pid
	// Each cookie read is a short-lived thread; one still there after
	// several resyncs (each re-resolves) is parked for good.
	held := map[string]int{}
	for range 20 {
		tasks, err := os.ReadDir(fmt.Sprintf("/proc/%d/task", pid))
		if err != nil {
			t.Fatal(err)
		}
		for _, task := range tasks {
			link, err := os.Readlink(filepath.Join(fmt.Sprintf("/proc/%d/task", pid), task.Name(), "ns", "net"))
			if err == nil && link == target {
				held[task.Name()]++
			}
		}
		time.Sleep(150 * time.Millisecond)
	}
	for tid, n := range held {
		if n >= 10 {
			t.Errorf("thread %s of the daemon (pid %d) sat in the target netns %s in %d of 20 looks over 3 s", tid, pid, target, n)
		}
	}
	if err := d.Stop(syscall.SIGTERM, 5*time.Second); err != nil {
		t.Fatal(err)
	}
}
