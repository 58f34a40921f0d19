package loader

import (
	"errors"
	"os"
	"path/filepath"
	"testing"
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
