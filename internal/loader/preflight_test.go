package loader

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/cilium/ebpf"
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
	for _, want := range []string{"lacks cgroup/getpeername4 and getpeername6 hooks (Linux >= 5.8)", "needs Linux >= 5.8", "(Linux "} {
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
