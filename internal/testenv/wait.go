package testenv

import (
	"context"
	"fmt"
	"os"
	"strings"
	"testing"
	"time"
)

// WaitFor polls ok until it holds and returns how long that took; within
// only caps a hang, failing the test with what was awaited.
func WaitFor(t testing.TB, what string, within time.Duration, ok func() bool) time.Duration {
	t.Helper()
	start := time.Now()
	for !ok() {
		if time.Since(start) > within {
			t.Fatalf("timed out after %s waiting for %s", within, what)
		}
		time.Sleep(10 * time.Millisecond)
	}
	return time.Since(start)
}

// Sleeper starts `sleep 60` inside n and returns it once the process is in
// there (`ip netns exec` enters n, then execs sleep in place): a process
// whose /proc/PID/ns/net leads to n, ended at cleanup.
func Sleeper(t testing.TB, n Netns) *Proc {
	t.Helper()
	p := Start(t, n.Command(context.Background(), "sleep", "60"))
	pid := p.Cmd.Process.Pid
	WaitFor(t, "the sleep to enter the netns", 10*time.Second, func() bool {
		exe, _ := os.Readlink(fmt.Sprintf("/proc/%d/exe", pid))
		return strings.HasSuffix(exe, "/sleep")
	})
	return p
}
