package netnsx

import (
	"errors"
	"os"
	"path/filepath"
	"runtime"
	"testing"

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
