package netnsx

import (
	"fmt"
	"os"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"
)

// MountWatch tells when the mount table of the daemon's mount namespace
// changes: the kernel marks /proc/self/mountinfo readable with an error
// then (poll(2): POLLERR|POLLPRI), and the Go runtime's poller waits for
// that, as for a pidfd (ExitWatch): no thread, no timer, nothing runs until
// a mount or unmount. A bind-mount target (see BindMount) leads to another
// namespace only after an unmount and a mount, so one MountWatch replaces
// the probe of every such target.
type MountWatch struct {
	f    *os.File
	done atomic.Bool
}

// WatchMounts calls changed, on a goroutine of its own, after each change
// of the mount table (several changes may be told once; the first call may
// come with no change). It fails when the runtime cannot wait on
// mountinfo; the caller probes its targets then.
func WatchMounts(changed func()) (*MountWatch, error) {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return nil, fmt.Errorf("watch the mount table: %w", err)
	}
	rc, err := f.SyscallConn()
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("watch the mount table: %w", err)
	}
	// A file the runtime's poller cannot wait on has no deadlines.
	if err := f.SetReadDeadline(time.Time{}); err != nil {
		f.Close()
		return nil, fmt.Errorf("watch the mount table: %w", err)
	}
	w := &MountWatch{f: f}
	go func() {
		defer w.done.Store(true)
		for {
			// The poller is edge-triggered: each return after the first
			// call of fn is a wake-up of the mount table's wait queue, or,
			// once, the readiness the file had when the watch began (a
			// look at no change, which also covers a change between the
			// caller's last look and the start of the watch).
			waited := false
			err := rc.Read(func(uintptr) bool {
				if !waited {
					waited = true
					return false
				}
				return true
			})
			if err != nil {
				return // closed
			}
			changed()
		}
	}()
	return w, nil
}

// Done reports whether the watch has ended (closed, or it could not wait):
// its targets need probing again.
func (w *MountWatch) Done() bool { return w == nil || w.done.Load() }

// Close ends the watch. A nil watch is fine.
func (w *MountWatch) Close() {
	if w != nil {
		w.f.Close()
	}
}

// BindMount reports whether t's path is itself a bind mount of the
// namespace id was read from (/run/netns/NAME, /var/run/docker/netns/ID),
// not a /proc/PID/ns/net path or a symbolic link: what such a path leads to
// changes only by an unmount and a mount, which a MountWatch sees. (A
// symbolic link among its parent directories could be re-pointed with no
// mount: the daemon's full resync, every ten, still looks at each target.)
func (t Target) BindMount(id ID) bool {
	if procDir(t.Path) != "" || t.Path == selfPath {
		return false
	}
	var st unix.Stat_t
	if err := unix.Lstat(t.Path, &st); err != nil {
		return false
	}
	return st.Mode&unix.S_IFMT != unix.S_IFLNK && st.Dev == id.Dev && st.Ino == id.Ino
}
