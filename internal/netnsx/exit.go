package netnsx

import (
	"fmt"
	"os"
	"strconv"
	"strings"
	"sync/atomic"

	"golang.org/x/sys/unix"
)

// ExitWatch tells when the process a /proc/PID/ns/net target goes through
// exits, through a pidfd (Linux 5.3) in the Go runtime's poller: no thread,
// no timer, nothing runs until the process exits. A target watched so
// needs no probe; Done says when one is needed again.
type ExitWatch struct {
	f    *os.File
	done atomic.Bool
}

// WatchExit calls exited once, on a goroutine of its own, when the process
// the target's path goes through exits, if that process is still the one id
// was read from. It returns (nil, nil) for a path that is not a process of
// this pid namespace (a bind mount, or another proc root such as a host
// /proc mounted into a pod: those pids are not ours to open), and an error
// when the process cannot be watched (gone or another one already, or no
// pidfd_open): the caller probes such a target instead.
func (t Target) WatchExit(id ID, exited func()) (*ExitWatch, error) {
	dir := procDir(t.Path)
	pidText, ok := strings.CutPrefix(dir, "/proc/")
	if !ok || strings.Contains(pidText, "/") || id.ProcIno == 0 {
		return nil, nil
	}
	pid, err := strconv.Atoi(pidText)
	if err != nil {
		return nil, nil
	}
	fd, err := unix.PidfdOpen(pid, 0)
	if err != nil {
		return nil, fmt.Errorf("pidfd_open(%d): %w", pid, err)
	}
	// The pid may belong to another process since id was read: the pidfd
	// must be of that one. (If it exits from here on, the pidfd says so.)
	if ino, start, err := starts.of(dir); err != nil || ino != id.ProcIno || start != id.Start {
		unix.Close(fd)
		return nil, fmt.Errorf("%s is no longer the process its netns was read through", dir)
	}
	if err := unix.SetNonblock(fd, true); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("pidfd of %d: %w", pid, err)
	}
	w := &ExitWatch{f: os.NewFile(uintptr(fd), "pidfd:"+dir)}
	rc, err := w.f.SyscallConn()
	if err != nil {
		w.f.Close()
		return nil, fmt.Errorf("pidfd of %d: %w", pid, err)
	}
	go func() {
		// A pidfd is readable once its process has exited. Read returns
		// then, or with an error when the watch is closed (or the fd could
		// not join the poller, or poll fails: then Done, and the target is
		// probed).
		var pollErr error
		err := rc.Read(func(fd uintptr) bool {
			var ready bool
			ready, pollErr = pidfdReadable(int(fd))
			return ready || pollErr != nil
		})
		w.done.Store(true)
		if err == nil && pollErr == nil {
			exited()
		}
	}()
	return w, nil
}

// pidfdReadable asks, without waiting, whether the pidfd fd is readable:
// its process has exited. A signal during poll(2) (EINTR, which even a zero
// timeout returns when one is pending, as the Go runtime's preemption
// signals often are) is no answer: it asks again.
func pidfdReadable(fd int) (bool, error) {
	for {
		p := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}
		n, err := poll(p, 0)
		if err == unix.EINTR {
			continue
		}
		return n > 0, err
	}
}

// poll is poll(2); a variable, so a test can put the interruptions in.
var poll = unix.Poll

// Done reports whether the watch has ended (the process exited, the watch
// was closed, or it could not wait): the target needs looking at again.
func (w *ExitWatch) Done() bool { return w == nil || w.done.Load() }

// Close ends the watch. exited may still run once if the process exited
// just before (a spurious look, nothing more). A nil watch is fine.
func (w *ExitWatch) Close() {
	if w != nil {
		w.f.Close()
	}
}
