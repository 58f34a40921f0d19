package testenv

import (
	"sync"

	"github.com/nsredirect/nsredirect/internal/loader"
)

// FakeKernel is the loader side of a daemon (daemon.Kernel) without a
// kernel: it records what the daemon asks of it. Hold its lock to read the
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
