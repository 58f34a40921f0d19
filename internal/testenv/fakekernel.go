package testenv

import (
	"sync"

	"github.com/nsredirect/nsredirect/internal/loader"
	"github.com/nsredirect/nsredirect/internal/metrics"
)

// FakeKernel is the loader side of a daemon (daemon.Kernel, and the
// daemon.Attached that daemon.Run drives) without a kernel: it records what
// the daemon asks of it; its pinned state is always intact, has nothing to
// heal and no records of predecessors. Hold its lock to read the
// maps while a daemon runs.
type FakeKernel struct {
	sync.Mutex
	Enrolled map[uint64]loader.Enrollment // by netns cookie
	Released map[uint64]bool
	Fail     map[string]error // what Enroll returns, by enrollment name
}

// NewFakeKernel returns a FakeKernel with nothing enrolled.
func NewFakeKernel() *FakeKernel {
	return &FakeKernel{Enrolled: map[uint64]loader.Enrollment{}, Released: map[uint64]bool{}, Fail: map[string]error{}}
}

// Enroll records e, unless Fail names it.
func (k *FakeKernel) Enroll(e loader.Enrollment) error {
	k.Lock()
	defer k.Unlock()
	if err := k.Fail[e.Name]; err != nil {
		return err
	}
	k.Enrolled[e.Cookie] = e
	return nil
}

// Unenroll forgets cookie c.
func (k *FakeKernel) Unenroll(c uint64) error {
	k.Lock()
	defer k.Unlock()
	delete(k.Enrolled, c)
	return nil
}

// Release records that the daemon gave up ownership of c.
func (k *FakeKernel) Release(c uint64) {
	k.Lock()
	defer k.Unlock()
	k.Released[c] = true
}

// Redirects reports no redirects yet for each of n rules.
func (k *FakeKernel) Redirects(_ uint64, n int) []uint64 { return make([]uint64, n) }

// Intact: nothing can be removed from under it.
func (k *FakeKernel) Intact() error { return nil }

// Heal finds nothing to repair.
func (k *FakeKernel) Heal(string) ([]string, error) { return nil, nil }

// Fill reports no maps.
func (k *FakeKernel) Fill() ([]metrics.MapFill, error) { return nil, nil }

// PeerStorageFailures reports none.
func (k *FakeKernel) PeerStorageFailures() (uint64, error) { return 0, nil }

// Records reports no records of predecessors.
func (k *FakeKernel) Records() ([]loader.Record, error) { return nil, nil }

// RemoveWhere has no records to remove.
func (k *FakeKernel) RemoveWhere(func(loader.Record) bool) ([]loader.Record, error) { return nil, nil }

// RemoveAllIfUnused has nothing pinned to remove.
func (k *FakeKernel) RemoveAllIfUnused() (bool, error) { return true, nil }

// StartupRepairs: nothing was repaired at start.
func (k *FakeKernel) StartupRepairs() []string { return nil }

// Close releases nothing.
func (k *FakeKernel) Close() error { return nil }
