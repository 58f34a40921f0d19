package loader

// The flock of the pin directory, taken while the pinned state is changed
// or read, and the owner lock of each enrolled netns, which tells a live
// owner from a crashed one.

import (
	"errors"
	"fmt"
	"os"
	"time"

	"golang.org/x/sys/unix"
)

// dirLock is a flock on the pin directory, valid only while the directory
// it locked is still the one at its path.
type dirLock struct{ f *os.File }

// lockDir takes a flock of kind how (LOCK_EX or LOCK_SH) on dir. A directory
// removed by the last instance out while we waited is not ours to use: we
// retry on the new one.
func lockDir(dir string, how int, create bool) (*dirLock, error) {
	deadline := time.Now().Add(30 * time.Second)
	for {
		if create {
			if err := os.MkdirAll(dir, 0o700); err != nil {
				return nil, fmt.Errorf("create pin dir %s: %w", dir, err)
			}
		}
		f, err := os.OpenFile(dir, os.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
		if err != nil {
			return nil, err
		}
		if err := flockTimeout(f, how, deadline); err != nil {
			f.Close()
			return nil, fmt.Errorf("lock pin dir %s: %w", dir, err)
		}
		if sameFile(f, dir) {
			return &dirLock{f}, nil
		}
		f.Close()
	}
}

func (l *dirLock) unlock() {
	if l != nil && l.f != nil {
		_ = unix.Flock(int(l.f.Fd()), unix.LOCK_UN)
		l.f.Close()
	}
}

func flockTimeout(f *os.File, how int, deadline time.Time) error {
	for {
		err := unix.Flock(int(f.Fd()), how|unix.LOCK_NB)
		if !errors.Is(err, unix.EWOULDBLOCK) {
			return err
		}
		if time.Now().After(deadline) {
			return errorOf(ErrLockTimeout, "held by another nsredirect for over 30s")
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func sameFile(f *os.File, path string) bool {
	var a, b unix.Stat_t
	if unix.Fstat(int(f.Fd()), &a) != nil || unix.Stat(path, &b) != nil {
		return false
	}
	return a.Dev == b.Dev && a.Ino == b.Ino
}

func ownerPath(dir string, cookie uint64) string { return pins{dir}.owner(cookie) }

// claimOwner takes the owner lock of a netns. It fails with errHeld when a
// live process holds it. The lock dies with its holder, even on SIGKILL,
// in any pid namespace: that is how a crashed owner is told from a live one.
func claimOwner(dir string, cookie uint64) (*os.File, error) {
	p := ownerPath(dir, cookie)
	if err := os.MkdirAll(p, 0o700); err != nil {
		return nil, fmt.Errorf("create owner lock %s: %w", p, err)
	}
	f, err := os.OpenFile(p, os.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, err
	}
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		f.Close()
		if errors.Is(err, unix.EWOULDBLOCK) {
			return nil, errHeld
		}
		return nil, fmt.Errorf("lock %s: %w", p, err)
	}
	return f, nil
}

var errHeld = errors.New("owner lock held")

// ownerAlive reports whether a process holds the owner lock of cookie. It is
// called with the pin dir locked, so no one can be claiming it meanwhile.
func ownerAlive(dir string, cookie uint64) bool {
	f, err := os.OpenFile(ownerPath(dir, cookie), os.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return false
	}
	defer f.Close()
	if err := unix.Flock(int(f.Fd()), unix.LOCK_SH|unix.LOCK_NB); err != nil {
		return errors.Is(err, unix.EWOULDBLOCK)
	}
	_ = unix.Flock(int(f.Fd()), unix.LOCK_UN)
	return false
}
