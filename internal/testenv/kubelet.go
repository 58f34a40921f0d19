package testenv

import (
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"
)

// KubePods makes a unique directory under the cgroup2 mount to hold
// kubelet-shaped pod cgroups (<it>/burstable/pod<UID>/<container>), and
// removes it with everything under it, children first, at cleanup: after
// the processes the test moved in are stopped, since cleanups run last in,
// first out.
func KubePods(t testing.TB) string {
	t.Helper()
	Privileged(t)
	top := filepath.Join(RootCgroup(t), Name("kubepods-test-"))
	if err := os.Mkdir(top, 0o755); err != nil {
		t.Fatalf("create cgroup %s: %v", top, err)
	}
	t.Cleanup(func() {
		var dirs []string
		_ = filepath.WalkDir(top, func(p string, d os.DirEntry, err error) error {
			if err == nil && d.IsDir() {
				dirs = append(dirs, p)
			}
			return nil
		})
		slices.Reverse(dirs)
		for _, d := range dirs {
			// A cgroup is removable once its last process has exited.
			for i := 0; i < 100 && os.Remove(d) != nil; i++ {
				time.Sleep(20 * time.Millisecond)
			}
			if _, err := os.Stat(d); err == nil {
				t.Errorf("cgroup %s not removed", d)
			}
		}
	})
	return top
}

// Sandbox is a pod's network namespace with a real process in it.
type Sandbox struct {
	Netns Netns
	Proc  *Proc
}

// PodSandbox starts the demo backend on :3210 in a new netns and moves it
// into the cgroup of container ctr of pod uid under top (KubePods), as
// kubelet would place a pod's first process.
func PodSandbox(t testing.TB, top, uid, ctr string) Sandbox {
	t.Helper()
	dir := filepath.Join(top, "burstable", "pod"+uid, ctr)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatalf("create kubelet-shaped cgroup: %v", err)
	}
	ns := NewNetns(t)
	proc := Server(t, ns, ":3210")
	// Server waited for the backend to print, so `ip netns exec` has
	// exec'd it: the pid is the backend, inside ns.
	if err := os.WriteFile(filepath.Join(dir, "cgroup.procs"), []byte(fmt.Sprint(proc.Cmd.Process.Pid)), 0o644); err != nil {
		t.Fatalf("move pid %d into %s: %v", proc.Cmd.Process.Pid, dir, err)
	}
	return Sandbox{Netns: ns, Proc: proc}
}
