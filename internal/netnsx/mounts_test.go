package netnsx

import (
	"os"
	"path/filepath"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// TestWatchMounts: a bind mount of a netns is told apart from the paths
// that are not one (a symbolic link to it, a /proc/PID path), and its
// unmount and a new mount in its place are told on the watch; a closed
// watch tells nothing.
func TestWatchMounts(t *testing.T) {
	if os.Geteuid() != 0 {
		if os.Getenv("CI") == "true" {
			t.Fatal("needs root; CI runs as root")
		}
		t.Skip("mount and unshare -n need CAP_SYS_ADMIN; run as root")
	}
	dir := t.TempDir()
	file := filepath.Join(dir, "ns")
	if err := os.WriteFile(file, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	mount := func() {
		t.Helper()
		_, pidTarget := unshareSleep(t)
		if err := unix.Mount(pidTarget.Path, file, "", unix.MS_BIND, ""); err != nil {
			t.Fatalf("bind %s at %s: %v", pidTarget.Path, file, err)
		}
	}
	mount()
	t.Cleanup(func() {
		for unix.Unmount(file, unix.MNT_DETACH) == nil {
		}
	})
	tg := Target{Spec: file, Path: file}
	id, err := tg.Stat()
	if err != nil {
		t.Fatal(err)
	}
	if !tg.BindMount(id) {
		t.Errorf("%s (a bind mount of a netns) is not a BindMount", file)
	}
	link := filepath.Join(dir, "link")
	if err := os.Symlink(file, link); err != nil {
		t.Fatal(err)
	}
	if lt := (Target{Spec: link, Path: link}); lt.BindMount(id) {
		t.Error("a symbolic link to the bind mount is a BindMount")
	}
	cmd, pt := unshareSleep(t)
	pid, err := pt.Stat()
	if err != nil {
		t.Fatal(err)
	}
	if pt.BindMount(pid) {
		t.Errorf("the /proc path of process %d is a BindMount", cmd.Process.Pid)
	}

	told := make(chan struct{}, 16)
	w, err := WatchMounts(func() { told <- struct{}{} })
	if err != nil {
		t.Fatal(err)
	}
	defer w.Close()
	drain := func() {
		for {
			select {
			case <-told:
			case <-time.After(200 * time.Millisecond):
				return
			}
		}
	}
	drain() // the readiness the file had when the watch began, at most
	if w.Done() {
		t.Fatal("the watch ended by itself")
	}
	wait := func(what string) {
		t.Helper()
		select {
		case <-told:
		case <-time.After(10 * time.Second): // bounds a hang only
			t.Fatalf("%s was not told", what)
		}
	}
	if err := unix.Unmount(file, 0); err != nil {
		t.Fatal(err)
	}
	wait("the unmount")
	drain()
	mount()
	wait("the new mount")
	if now, err := tg.Stat(); err != nil || now == id {
		t.Errorf("the new mount's ID %+v (%v) is the old one's", now, err)
	}

	w.Close()
	drain()
	if err := unix.Unmount(file, 0); err != nil {
		t.Fatal(err)
	}
	select {
	case <-told:
		t.Fatal("a closed watch told a change")
	case <-time.After(200 * time.Millisecond):
	}
	if !w.Done() {
		t.Error("a closed watch is not Done")
	}
}
