package netnsx

import (
	"errors"
	"strings"
	"testing"
)

func TestReleaseAtLeast(t *testing.T) {
	for release, want := range map[string]bool{
		"6.18.44-fc-v1045": true, "6.18": true, "6.19.0": true, "7.0.1": true, "10.2": true,
		"6.17.9": false, "6.12.57+deb13-amd64": false, "6.1.0-30-amd64": false, "5.10.0-33-amd64": false,
		"": false, "6": false, "x.y": false,
	} {
		if got := releaseAtLeast(release, [2]int{6, 18}); got != want {
			t.Errorf("releaseAtLeast(%q, 6.18) = %v, want %v", release, got, want)
		}
	}
}

// With no host process visible (the proc root of a container's own pid
// namespace) and init_net's fixed inode not to be relied on, FindHost says
// why it cannot tell. (The daemon's refusal: daemon's
// TestHostNetnsUnknownFailsClosed.)
func TestFindHostUnknownSaysWhy(t *testing.T) {
	root := t.TempDir() // no 1/, no 2/: nothing of the host visible
	_, err := FindHost(root, HostOptions{IgnoreFixedInode: true})
	if !errors.Is(err, ErrHostUnknown) || !strings.Contains(err.Error(), "no process of the host is visible") {
		t.Errorf("FindHost(empty proc) = %v; want ErrHostUnknown saying nothing is visible", err)
	}
}
