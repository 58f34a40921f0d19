package kube

import (
	"context"
	"sync"

	"github.com/nsredirect/nsredirect/internal/daemon"
)

// The step daemon.Run takes with a Controller as its source, one at a time,
// for the unit tests that look at what one step does (the Events it posts, a
// pod adopted on the next one). The end-to-end tests (e2e_test.go) run
// daemon.Run itself.

// reconciler takes the full desired set and says which targets are live:
// *daemon.Daemon, or recorder without a kernel.
type reconciler interface {
	Reconcile([]daemon.Target) error
	Serving() []string
}

// stepMu makes a step one: Reconciled reads the pods of the last Desired,
// which a concurrent step (pod events and a test's tick) would otherwise
// replace. daemon.Run takes its steps on one goroutine.
var stepMu sync.Mutex

// step is one reconcile of daemon.Run: Desired, Reconcile, and the
// Reconciled of the Controller's Policy.
func step(ctx context.Context, c *Controller, r reconciler) {
	stepMu.Lock()
	defer stepMu.Unlock()
	ts, _ := c.Desired(ctx)
	_ = r.Reconcile(ts) // per-target failures are the daemon's to log and count
	var failures map[string]error
	if f, ok := r.(interface{ Failures() map[string]error }); ok {
		failures = f.Failures()
	}
	c.Policy().Reconciled(ctx, ts, r.Serving(), failures)
}
