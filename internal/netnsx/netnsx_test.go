package netnsx

import (
	"errors"
	"os"
	"path/filepath"
	"testing"
)

func TestParseTarget(t *testing.T) {
	for in, want := range map[string]string{
		"self":           "/proc/self/ns/net",
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

// Resolve enters the namespace on a throwaway thread: the caller's own
// namespace is unchanged, and resolving our own netns gives our own cookie.
func TestResolveSelf(t *testing.T) {
	if os.Geteuid() != 0 {
		if os.Getenv("CI") == "true" {
			t.Fatal("needs root; CI runs as root")
		}
		t.Skip("entering a netns needs CAP_SYS_ADMIN; run as root")
	}
	self, _ := ParseTarget("self")
	want, err := SelfCookie()
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 20; i++ {
		got, id, err := self.Resolve()
		if err != nil || got != want || id.Ino == 0 {
			t.Fatalf("Resolve(self) = %d, %+v, %v; want cookie %d", got, id, err, want)
		}
	}
	if after, _ := SelfCookie(); after != want {
		t.Fatalf("caller's netns changed: cookie %d -> %d", want, after)
	}
}
