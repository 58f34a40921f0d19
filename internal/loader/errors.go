package loader

import (
	"errors"
	"fmt"
)

// The errors a caller branches on. They say what is wrong; what a user
// should do about it is said where the user is (internal/cli).
var (
	// ErrBusy is returned by Enroll when a live process already serves the
	// netns.
	ErrBusy = errors.New("netns is already served by another nsredirect")
	// ErrNotPinned means there is no pinned state at the pin dir.
	ErrNotPinned = errors.New("nothing pinned")
	// ErrIncompatible: a pinned map was made by an nsredirect whose maps
	// differ from this build's.
	ErrIncompatible = errors.New("pinned state made by an incompatible nsredirect")
	// ErrOlderLayout: the pinned state has an older layout, which only a
	// daemon (Attach) migrates.
	ErrOlderLayout = errors.New("pinned state of an older layout")
	// ErrOtherCgroup: a pinned link is attached to another cgroup than the
	// one asked for.
	ErrOtherCgroup = errors.New("pinned link attached to another cgroup")
	// ErrStateRemoved: the pinned state was removed from under a daemon
	// that holds it open.
	ErrStateRemoved = errors.New("pinned state removed from under this daemon")
	// ErrLockTimeout: another process held the pin dir's lock too long.
	ErrLockTimeout = errors.New("pin dir lock held too long")
	// ErrNotLive: an enrollment's entries or the programs are not all in
	// the kernel.
	ErrNotLive = errors.New("enrollment not live")
	// ErrRecordTooLarge: an enrollment's record does not fit the record map's
	// value (its name or its rules are too long).
	ErrRecordTooLarge = errors.New("enrollment record too large")
)

// MapFullError is returned when a map of the pinned state has no room for
// one more entry.
type MapFullError struct {
	Map      string // rule, counter, enrollment
	Capacity int
	Unit     string // what Capacity counts: entries, netns
}

func (e *MapFullError) Error() string {
	return fmt.Sprintf("%s map is full (%d %s)", e.Map, e.Capacity, e.Unit)
}

// kindError is an error with a text of its own that errors.Is matches to
// one of the sentinels above.
type kindError struct {
	kind error
	msg  string
}

func errorOf(kind error, format string, args ...any) error {
	return &kindError{kind: kind, msg: fmt.Sprintf(format, args...)}
}

func (e *kindError) Error() string { return e.msg }
func (e *kindError) Unwrap() error { return e.kind }
