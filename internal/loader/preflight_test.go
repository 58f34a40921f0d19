package loader

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/sirupsen/logrus"
	logrustest "github.com/sirupsen/logrus/hooks/test"
	"golang.org/x/sys/unix"
)

func TestFindCgroup2(t *testing.T) {
	dir := t.TempDir()
	write := func(s string) string {
		p := filepath.Join(dir, "mountinfo")
		if err := os.WriteFile(p, []byte(s), 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	hybrid := `25 30 0:23 / /sys rw,nosuid shared:7 - sysfs sysfs rw
33 25 0:28 / /sys/fs/cgroup ro,nosuid shared:9 - tmpfs tmpfs ro,mode=755
34 33 0:29 / /sys/fs/cgroup/unified rw,nosuid shared:10 - cgroup2 cgroup2 rw,nsdelegate
35 33 0:30 / /sys/fs/cgroup/systemd rw,nosuid shared:11 - cgroup cgroup rw,xattr,name=systemd
`
	if got, err := FindCgroup2(write(hybrid)); err != nil || got != "/sys/fs/cgroup/unified" {
		t.Errorf("hybrid: %q, %v", got, err)
	}
	unified := "29 23 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw\n"
	if got, err := FindCgroup2(write(unified)); err != nil || got != "/sys/fs/cgroup" {
		t.Errorf("unified: %q, %v", got, err)
	}
	spaced := "29 23 0:26 / /mnt/my\\040cgroup rw - cgroup2 none rw\n"
	if got, _ := FindCgroup2(write(spaced)); got != "/mnt/my cgroup" {
		t.Errorf("escaped mount point: %q", got)
	}
	if _, err := FindCgroup2(write("35 33 0:30 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu\n")); !errors.Is(err, ErrEnvironment) {
		t.Errorf("no cgroup2: %v", err)
	}
}

func TestEnsureBPFFSRefusesRelativeAndNonBPF(t *testing.T) {
	if err := EnsureBPFFS("relative/dir"); !errors.Is(err, ErrEnvironment) {
		t.Errorf("relative: %v", err)
	}
	if err := EnsureBPFFS(filepath.Join(t.TempDir(), "nsredirect")); !errors.Is(err, ErrEnvironment) {
		t.Errorf("tmpfs parent: %v", err)
	}
	if err := CheckCgroup2(t.TempDir()); !errors.Is(err, ErrEnvironment) {
		t.Errorf("CheckCgroup2 on a plain dir: %v", err)
	}
}

// A missing feature is one line naming it with the version that added it and
// the version nsredirect needs; the probes after it are not run.
func TestCheckProbesNamesFirstMissingFeature(t *testing.T) {
	ran := 0
	probes := []kernelProbe{
		{"present (Linux >= 4.17)", func() error { ran++; return nil }},
		{"cgroup/getpeername4 and getpeername6 hooks (Linux >= 5.8)", func() error { ran++; return fmt.Errorf("load: %w", ebpf.ErrNotSupported) }},
		{"never probed", func() error { ran++; return nil }},
	}
	err := checkProbes(probes)
	if !errors.Is(err, ErrEnvironment) || ran != 2 {
		t.Fatalf("checkProbes = %v after %d probes; want ErrEnvironment after 2", err, ran)
	}
	msg := err.Error()
	for _, want := range []string{"lacks cgroup/getpeername4 and getpeername6 hooks (Linux >= 5.8)", "needs Linux >= 5.9", "(Linux "} {
		if !strings.Contains(msg, want) {
			t.Errorf("%q lacks %q", msg, want)
		}
	}
	if strings.Contains(msg, "\n") {
		t.Errorf("not one line: %q", msg)
	}
	if err := checkProbes([]kernelProbe{{"x", func() error { return unix.EPERM }}}); !errors.Is(err, ErrEnvironment) || !strings.Contains(err.Error(), "permission denied") {
		t.Errorf("EPERM: %v", err)
	}
	if err := checkProbes(probes[:1]); err != nil {
		t.Errorf("all present: %v", err)
	}
}

// subCgroup returns a cgroup below the cgroup2 root: an existing one, or one
// it creates (and removes) when it may.
func subCgroup(t *testing.T, root string) string {
	t.Helper()
	entries, err := os.ReadDir(root)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range entries {
		if e.IsDir() {
			return filepath.Join(root, e.Name())
		}
	}
	if os.Geteuid() != 0 {
		t.Skip("no sub-cgroup of the cgroup2 root exists and creating one needs root")
	}
	dir := filepath.Join(root, fmt.Sprintf("nsr-test-%d", os.Getpid()))
	if err := os.Mkdir(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := unix.Rmdir(dir); err != nil {
			t.Errorf("remove %s: %v", dir, err)
		}
	})
	return dir
}

// The cgroup2 root is accepted, through any path that reaches it; a
// sub-cgroup passes the filesystem-type check but is refused, naming it: its
// programs would miss every connect outside it.
func TestCheckCgroup2RefusesSubCgroup(t *testing.T) {
	root, err := FindCgroup2("/proc/self/mountinfo")
	if err != nil {
		t.Skipf("no cgroup2 mounted: %v", err)
	}
	if err := CheckCgroup2(root); err != nil {
		t.Fatalf("CheckCgroup2(%s), the cgroup2 mount: %v", root, err)
	}
	link := filepath.Join(t.TempDir(), "elsewhere")
	if err := os.Symlink(root, link); err != nil {
		t.Fatal(err)
	}
	if err := CheckCgroup2(link); err != nil {
		t.Errorf("CheckCgroup2(%s), the root by another path: %v", link, err)
	}
	sub := subCgroup(t, root)
	err = CheckCgroup2(sub)
	if !errors.Is(err, ErrEnvironment) || !strings.Contains(err.Error(), sub) || !strings.Contains(err.Error(), "sub-cgroup") {
		t.Errorf("CheckCgroup2(%s), a sub-cgroup: %v; want ErrEnvironment naming it as a sub-cgroup", sub, err)
	}
	if _, err := Cgroup2Root(sub, "/proc/self/mountinfo", logrus.New()); !errors.Is(err, ErrEnvironment) {
		t.Errorf("Cgroup2Root(%s), a sub-cgroup: %v; want ErrEnvironment", sub, err)
	}
	if err := CheckCgroup2(filepath.Join(root, "cgroup.procs")); !errors.Is(err, ErrEnvironment) {
		t.Errorf("CheckCgroup2 on a file of the root: %v", err)
	}
}

// One rule for every mode: a path that is not cgroup2 but whose unified/ is
// (a hybrid host's /sys/fs/cgroup, bound whole into a container) is used
// through unified/, and logged; an empty path is the first cgroup2 mount.
func TestCgroup2RootHybridFallsBackToUnified(t *testing.T) {
	root, err := FindCgroup2("/proc/self/mountinfo")
	if err != nil {
		t.Skipf("no cgroup2 mounted: %v", err)
	}
	hybrid := t.TempDir()
	if err := os.Symlink(root, filepath.Join(hybrid, "unified")); err != nil {
		t.Fatal(err)
	}
	log, hook := logrustest.NewNullLogger()
	got, err := Cgroup2Root(hybrid, "/proc/self/mountinfo", log)
	if want := filepath.Join(hybrid, "unified"); err != nil || got != want {
		t.Fatalf("Cgroup2Root(%s) = %q, %v; want %q", hybrid, got, err, want)
	}
	if e := hook.LastEntry(); e == nil || !strings.Contains(e.Message, "hybrid") || e.Data["attach_at"] != got {
		t.Errorf("the fallback was not logged: %v", hook.AllEntries())
	}
	hook.Reset()
	if got, err := Cgroup2Root(root, "/proc/self/mountinfo", log); err != nil || got != root || len(hook.AllEntries()) != 0 {
		t.Errorf("Cgroup2Root(%s) = %q, %v (log %v); want it unchanged, nothing logged", root, got, err, hook.AllEntries())
	}
	if got, err := Cgroup2Root("", "/proc/self/mountinfo", log); err != nil || got != root {
		t.Errorf("Cgroup2Root(\"\") = %q, %v; want %q", got, err, root)
	}
	plain := t.TempDir()
	if _, err := Cgroup2Root(plain, "/proc/self/mountinfo", log); !errors.Is(err, ErrEnvironment) || !strings.Contains(err.Error(), plain) {
		t.Errorf("Cgroup2Root(%s), no cgroup2 anywhere: %v", plain, err)
	}
}

// askedKernel answers the probes' queries as a kernel that has everything
// but the attach types in lacks, and records the attach types asked for.
type askedKernel struct {
	lacks map[ebpf.AttachType]bool
	asked map[ebpf.AttachType]bool
}

func (k *askedKernel) queries() kernelQueries {
	return kernelQueries{
		progType: func(ebpf.ProgramType) error { return nil },
		mapType:  func(ebpf.MapType) error { return nil },
		helper:   func(ebpf.ProgramType, asm.BuiltinFunc) error { return nil },
		hook: func(at ebpf.AttachType) error {
			k.asked[at] = true
			if k.lacks[at] {
				return fmt.Errorf("load a %s program: %w", at, ebpf.ErrNotSupported)
			}
			return nil
		},
	}
}

// The probes ask for both recvmsg hooks the UDP rules attach and for the
// sock_release hook, and a kernel that lacks one is refused with one line
// naming it (and the version that added it), not a load error when the
// first UDP rule comes or at attach.
func TestKernelProbesNameMissingHooks(t *testing.T) {
	all := &askedKernel{asked: map[ebpf.AttachType]bool{}}
	if err := checkProbes(kernelProbes(all.queries())); err != nil {
		t.Fatalf("a kernel with every feature: %v", err)
	}
	for _, at := range []ebpf.AttachType{ebpf.AttachCGroupUDP4Recvmsg, ebpf.AttachCGroupUDP6Recvmsg, ebpf.AttachCgroupInet4GetPeername, ebpf.AttachCgroupInet6GetPeername, ebpf.AttachCgroupInetSockRelease} {
		if !all.asked[at] {
			t.Errorf("the probes never ask for the %s hook (asked: %v)", at, all.asked)
		}
	}
	named := map[ebpf.AttachType]string{
		ebpf.AttachCGroupUDP4Recvmsg:     "lacks cgroup/recvmsg4 and recvmsg6 hooks for UDP (Linux >= 5.2)",
		ebpf.AttachCGroupUDP6Recvmsg:     "lacks cgroup/recvmsg4 and recvmsg6 hooks for UDP (Linux >= 5.2)",
		ebpf.AttachCgroupInetSockRelease: "lacks cgroup/sock_release hook (Linux >= 5.9)",
	}
	for at, what := range named {
		k := &askedKernel{lacks: map[ebpf.AttachType]bool{at: true}, asked: map[ebpf.AttachType]bool{}}
		err := checkProbes(kernelProbes(k.queries()))
		if !errors.Is(err, ErrEnvironment) {
			t.Fatalf("a kernel without %s: %v; want ErrEnvironment", at, err)
		}
		msg := err.Error()
		for _, want := range []string{what, "needs Linux >= 5.9"} {
			if !strings.Contains(msg, want) {
				t.Errorf("a kernel without %s: %q lacks %q", at, msg, want)
			}
		}
		if strings.Contains(msg, "\n") {
			t.Errorf("a kernel without %s: not one line: %q", at, msg)
		}
	}
}

// On this kernel the real probes pass (the minimum is 5.9; CI's kernels
// are newer), each one loading what it names.
func TestKernelProbesPassHere(t *testing.T) {
	if os.Geteuid() != 0 {
		if os.Getenv("CI") == "true" {
			t.Fatal("needs root to load probe programs")
		}
		t.Skip("needs root to load probe programs")
	}
	if err := CheckKernel(); err != nil {
		t.Fatalf("CheckKernel on %s: %v", kernelRelease(), err)
	}
}
