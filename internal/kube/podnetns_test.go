package kube

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/nsredirect/nsredirect/internal/testenv"
)

const uid = "3f0c4a2e-8d1b-4b7a-9c55-0e2a6b1d7f90"

func TestCgroupNamesPod(t *testing.T) {
	under := strings.ReplaceAll(uid, "-", "_")
	for path, want := range map[string]bool{
		"/kubepods/burstable/pod" + uid + "/0123abcd": true,
		"/kubepods/pod" + uid + "/0123abcd":           true, // guaranteed QoS
		"/kubepods/besteffort/pod" + uid:              true,
		"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod" + under + ".slice/cri-containerd-0123.scope": true,
		"/kubepods.slice/kubepods-pod" + under + ".slice/crio-0123.scope":                                              true,
		"/kubepods/burstable/pod" + uid + "x/0123":                                                                     false,
		"/kubepods/burstable/pod3f0c4a2e-8d1b-4b7a-9c55-0e2a6b1d7f91/0123":                                             false,
		"/user.slice/pod" + under + ".slice":                                                                           false,
		"/":                                                                                                            false,
	} {
		if got := podOfCgroup(path) == uid; got != want {
			t.Errorf("podOfCgroup(%q) == %s: %v, want %v", path, uid, got, want)
		}
	}
}

// fakeProc writes a /proc-like tree: pid -> cgroup file contents.
func fakeProc(t *testing.T, procs map[int]string) string {
	root := t.TempDir()
	for pid, cg := range procs {
		dir := filepath.Join(root, fmt.Sprint(pid))
		if err := os.MkdirAll(dir, 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dir, "cgroup"), []byte(cg), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.MkdirAll(filepath.Join(root, "self"), 0o755); err != nil {
		t.Fatal(err)
	}
	return root
}

func TestPodNetnsOnFakeProc(t *testing.T) {
	root := fakeProc(t, map[int]string{
		1:   "0::/init.scope\n",
		900: "12:memory:/kubepods/burstable/pod" + uid + "/app\n0::/kubepods/burstable/pod" + uid + "/app\n",
		450: "0::/kubepods/burstable/pod" + uid + "/pause\n",
		77:  "0::/kubepods/burstable/pod11111111-2222-3333-4444-555555555555/x\n",
	})
	target, pid, err := PodNetns(root, uid)
	if err != nil || pid != 450 || target.Path != filepath.Join(root, "450", "ns", "net") {
		t.Errorf("PodNetns = %+v, %d, %v; want the lowest pid of the pod, 450", target, pid, err)
	}
	if _, _, err := PodNetns(root, "99999999-2222-3333-4444-555555555555"); !errors.Is(err, ErrNoPodProcess) {
		t.Errorf("absent pod: %v", err)
	}
	for _, bad := range []string{"", "../../etc", "pod" + uid, uid + "/x"} {
		if _, _, err := PodNetns(root, bad); err == nil || !strings.Contains(err.Error(), "not a UID") {
			t.Errorf("PodNetns(%q) = %v; want refused", bad, err)
		}
	}
	if _, _, err := PodNetns(filepath.Join(root, "missing"), uid); err == nil || !strings.Contains(err.Error(), "--proc") {
		t.Errorf("missing proc root: %v", err)
	}
}

// TestPodNetnsRealCgroup places a real process, inside a real netns, in a
// cgroup shaped like kubelet's under the cgroup2 mount, and finds that
// netns through the real /proc.
func TestPodNetnsRealCgroup(t *testing.T) {
	ns := testenv.NewNetns(t)
	cgRoot := testenv.RootCgroup(t)
	podDir := filepath.Join(cgRoot, testenv.Name("kubepods-test-"), "burstable", "pod"+uid)
	ctrDir := filepath.Join(podDir, "0123abcd")
	if err := os.MkdirAll(ctrDir, 0o755); err != nil {
		t.Fatalf("create kubelet-shaped cgroup: %v", err)
	}
	t.Cleanup(func() {
		// Children first; a cgroup dir is removable once it has no process.
		for _, d := range []string{ctrDir, podDir, filepath.Dir(podDir), filepath.Dir(filepath.Dir(podDir))} {
			for i := 0; i < 50 && os.Remove(d) != nil; i++ {
				time.Sleep(20 * time.Millisecond)
			}
		}
	})
	sleeper := testenv.Start(t, ns.Command(t.Context(), "sleep", "60"))
	// ip netns exec enters the netns, then execs sleep in place: once the
	// pid runs sleep, it is in the netns.
	pid := sleeper.Cmd.Process.Pid
	deadline := time.Now().Add(5 * time.Second)
	for exe, _ := os.Readlink(fmt.Sprintf("/proc/%d/exe", pid)); !strings.HasSuffix(exe, "/sleep"); exe, _ = os.Readlink(fmt.Sprintf("/proc/%d/exe", pid)) {
		if time.Now().After(deadline) {
			t.Fatalf("pid %d never ran sleep (exe %q)", pid, exe)
		}
		time.Sleep(5 * time.Millisecond)
	}
	if err := os.WriteFile(filepath.Join(ctrDir, "cgroup.procs"), []byte(fmt.Sprint(pid)), 0o644); err != nil {
		t.Fatalf("move pid %d into %s: %v", pid, ctrDir, err)
	}
	t.Cleanup(sleeper.Kill)

	target, found, err := PodNetns("/proc", uid)
	if err != nil {
		t.Fatal(err)
	}
	if found != pid {
		t.Errorf("found pid %d, want %d", found, pid)
	}
	cookie, _, err := target.ResolveWith(testenv.Cookies(t))
	if err != nil {
		t.Fatal(err)
	}
	if want := ns.Cookie(t); cookie != want {
		t.Errorf("pod netns cookie %d, want the test netns's %d", cookie, want)
	}
}

// TestScanReadsEachProcessOnce: a resync does not read the cgroup of a
// process it has read before (issue 14: reading every /proc/PID/cgroup once
// a second was a tenth of a core at 5,000 processes), but a pid reused by a
// new process (a new /proc/PID inode) is read again.
func TestScanReadsEachProcessOnce(t *testing.T) {
	const other = "99999999-2222-3333-4444-555555555555"
	cgOf := func(u string) string { return "0::/kubepods/burstable/pod" + u + "/c\n" }
	root := fakeProc(t, map[int]string{1: "0::/init.scope\n", 100: cgOf(uid)})
	dir := filepath.Join(root, "100")
	withNetns := func(dir string) {
		if err := os.MkdirAll(filepath.Join(dir, "ns"), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.Symlink("/proc/self/ns/net", filepath.Join(dir, "ns", "net")); err != nil {
			t.Fatal(err)
		}
	}
	withNetns(dir)
	netnsOf := func(u string) (int, error) {
		pods, err := ScanPods(root)
		if err != nil {
			t.Fatal(err)
		}
		_, pid, err := pods.Netns(u)
		return pid, err
	}
	if pid, err := netnsOf(uid); err != nil || pid != 100 {
		t.Fatalf("first scan: pid %d, %v; want 100", pid, err)
	}
	// The same process (same directory): its cgroup is not read again.
	if err := os.WriteFile(filepath.Join(dir, "cgroup"), []byte(cgOf(other)), 0o644); err != nil {
		t.Fatal(err)
	}
	if pid, err := netnsOf(uid); err != nil || pid != 100 {
		t.Errorf("second scan: pid %d, %v; want 100 from the cache, with no new read of its cgroup", pid, err)
	}
	// A new process with the same pid: a new directory, read again.
	fresh := filepath.Join(root, "100.new")
	if err := os.MkdirAll(fresh, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(fresh, "cgroup"), []byte(cgOf(other)), 0o644); err != nil {
		t.Fatal(err)
	}
	withNetns(fresh)
	if err := os.RemoveAll(dir); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(fresh, dir); err != nil {
		t.Fatal(err)
	}
	if _, err := netnsOf(uid); !errors.Is(err, ErrNoPodProcess) {
		t.Errorf("after pid 100 was reused outside the pod: %v; want ErrNoPodProcess", err)
	}
	if pid, err := netnsOf(other); err != nil || pid != 100 {
		t.Errorf("the new pid 100: pid %d, %v; want it found in pod %s", pid, err, other)
	}
}
