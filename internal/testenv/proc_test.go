package testenv

import (
	"os/exec"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// TestWaitNotHeldByInheritedOutput: a child that inherits the output pipe
// and outlives the process must not keep Wait waiting for EOF (before
// WaitDelay it waited the whole 30 s of the child's sleep).
func TestWaitNotHeldByInheritedOutput(t *testing.T) {
	p := Start(t, exec.Command("sh", "-c", "sleep 30 & echo child $!"))
	p.WaitOutput(t, "child ", 5*time.Second)
	child, err := strconv.Atoi(strings.TrimSpace(strings.TrimPrefix(p.Output(), "child ")))
	if err != nil {
		t.Fatalf("child pid in %q: %v", p.Output(), err)
	}
	t.Cleanup(func() { _ = syscall.Kill(child, syscall.SIGKILL) })
	if code, err := p.Wait(20 * time.Second); err != nil || code != 0 {
		t.Fatalf("sh exited at once, its child holding the output pipe: Wait = %d, %v", code, err)
	}
}

// TestKernelState: what Kill reports of a task stuck in the kernel.
func TestKernelState(t *testing.T) {
	p := Start(t, exec.Command("sleep", "30"))
	pid := p.Cmd.Process.Pid
	WaitFor(t, "sleep asleep", 5*time.Second, func() bool { return strings.Contains(kernelState(pid), "State: S") })
	got := kernelState(pid)
	if !strings.Contains(got, "thread "+strconv.Itoa(pid)+" wchan ") {
		t.Errorf("kernelState(%d) = %q: no line for its main thread", pid, got)
	}
	p.Kill()
	if !p.Exited() {
		t.Errorf("Kill returned with pid %d still running", pid)
	}
}
