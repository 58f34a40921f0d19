// Package daemon decides what the kernel should redirect. Every discovery
// mode (flags, Docker, Kubernetes) hands it the full desired set of targets;
// Reconcile resolves each target's netns and enrolls, updates or removes
// rules through the loader. It is the one path into the kernel.
package daemon

import (
	"errors"
	"fmt"
	"sort"
	"strings"
	"sync"

	"github.com/sirupsen/logrus"

	"github.com/nsredirect/nsredirect/internal/loader"
	"github.com/nsredirect/nsredirect/internal/metrics"
	"github.com/nsredirect/nsredirect/internal/netnsx"
	"github.com/nsredirect/nsredirect/internal/rule"
)

// Target is one netns that should have rules.
type Target struct {
	// Name labels it in logs, status and metrics, and identifies it across
	// reconciles: a target whose netns changes under the same name (a
	// restarted container) is moved to the new netns.
	Name  string
	Netns netnsx.Target
	Rules []rule.Rule
	// Err, when set, says why the source could not describe the target (a
	// Docker label that does not parse): it is never enrolled, and the
	// error is logged and counted like a failed enrollment.
	Err error
}

// Kernel is what the daemon needs of the loader.
type Kernel interface {
	Enroll(loader.Enrollment) error
	Unenroll(cookie uint64) error
	Release(cookie uint64)
	Redirects(cookie uint64, rules int) []uint64
}

type live struct {
	target Target
	cookie uint64
	id     netnsx.ID
	specs  string
}

// Daemon tracks the targets one process serves.
type Daemon struct {
	kernel Kernel
	owner  string
	log    logrus.FieldLogger

	// cookies reads a netns cookie from inside it: netnsx.SockoptCookie,
	// or the loader's BPF probe on kernels before 5.14.
	cookies netnsx.CookieReader

	// waitOwners: see WaitForOwners.
	waitOwners bool

	mu      sync.Mutex
	desired []Target
	live    map[string]*live
	failing map[string]string // name -> last error, so each is logged once
	errors  map[string]uint64
	held    map[string]bool // desired targets another live nsredirect serves
}

// Option changes how a Daemon treats its targets.
type Option func(*Daemon)

// WaitForOwners makes a target that another live nsredirect serves (the
// loader's ErrBusy) a wait, not a failure: it is not counted as an error,
// it counts as served for Ready, and it is adopted on the first reconcile
// after the owner lets go. A DaemonSet rollout starts the new daemon while
// the old one still serves every pod; the new one must become ready then.
func WaitForOwners() Option { return func(d *Daemon) { d.waitOwners = true } }

// New returns a daemon that enrolls through kernel, reading each target's
// netns cookie with cookies (the loader's CookieSource.Read: the same number
// the programs see, on every kernel), and tagging its enrollments with owner
// (the mode: run, docker, kube).
func New(kernel Kernel, cookies netnsx.CookieReader, owner string, log logrus.FieldLogger, opts ...Option) *Daemon {
	d := &Daemon{
		kernel:  kernel,
		cookies: cookies,
		owner:   owner,
		log:     log,
		live:    map[string]*live{},
		failing: map[string]string{},
		errors:  map[string]uint64{},
		held:    map[string]bool{},
	}
	for _, o := range opts {
		o(d)
	}
	return d
}

// Reconcile makes the kernel match desired. A target that fails does not
// stop the others; all failures are returned joined.
func (d *Daemon) Reconcile(desired []Target) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.desired = append(d.desired[:0], desired...)
	return d.reconcile()
}

// Resync re-resolves the desired targets: a netns that was replaced under
// the same path is followed, one that vanished has its rules removed.
func (d *Daemon) Resync() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.reconcile()
}

func (d *Daemon) reconcile() error {
	var errs []error
	want := map[string]bool{}
	for _, t := range d.desired {
		want[t.Name] = true
		err := d.apply(t)
		log := d.log.WithFields(logrus.Fields{"netns": t.Name})
		if d.waitOwners && errors.Is(err, loader.ErrBusy) {
			if !d.held[t.Name] {
				d.held[t.Name] = true
				log.WithError(err).Info("served by another live nsredirect; adopting it when that one lets go")
			}
			continue
		}
		delete(d.held, t.Name)
		if err != nil {
			errs = append(errs, err)
			if d.failing[t.Name] != err.Error() {
				d.failing[t.Name] = err.Error()
				d.errors[t.Name]++
				log.WithError(err).Error("cannot enroll netns")
			}
			continue
		}
		if _, was := d.failing[t.Name]; was {
			delete(d.failing, t.Name)
			log.Info("netns enrolled again")
		}
	}
	for name, l := range d.live {
		if !want[name] {
			if err := d.drop(l); err != nil {
				errs = append(errs, err)
			}
		}
	}
	for name := range d.failing {
		if !want[name] {
			delete(d.failing, name)
		}
	}
	for name := range d.held {
		if !want[name] {
			delete(d.held, name)
		}
	}
	return errors.Join(errs...)
}

func (d *Daemon) apply(t Target) error {
	cur := d.live[t.Name]
	if t.Err != nil {
		if cur != nil {
			_ = d.drop(cur)
		}
		return t.Err
	}
	specs := rule.FormatList(t.Rules)
	if cur != nil && cur.specs == specs {
		// The common case, every resync: same namespace file, nothing to
		// do. Entering the netns costs a thread, so only do it on change.
		if id, err := t.Netns.Stat(); err == nil && id == cur.id {
			return nil
		}
	}
	cookie, id, err := t.Netns.ResolveWith(d.cookies)
	if err != nil {
		if cur != nil {
			// The netns is gone: its rules have nothing left to redirect.
			_ = d.drop(cur)
		}
		return err
	}
	if cur != nil && cur.cookie == cookie && cur.specs == specs {
		cur.id = id
		return nil
	}
	log := d.log.WithFields(logrus.Fields{"netns": t.Name, "cookie": cookie, "rule": specs})
	if err := d.kernel.Enroll(loader.Enrollment{
		Cookie: cookie, NetnsIno: id.Ino, Name: t.Name, Owner: d.owner, Rules: t.Rules,
	}); err != nil {
		return fmt.Errorf("netns %s: %w", t.Name, err)
	}
	if cur != nil && cur.cookie != cookie {
		log.WithField("old_cookie", cur.cookie).Info("netns was replaced; following it")
		_ = d.drop(cur)
	}
	d.live[t.Name] = &live{target: t, cookie: cookie, id: id, specs: specs}
	log.Info("redirect live")
	return nil
}

func (d *Daemon) drop(l *live) error {
	if err := d.kernel.Unenroll(l.cookie); err != nil {
		return fmt.Errorf("remove rules of netns %s: %w", l.target.Name, err)
	}
	if d.live[l.target.Name] == l {
		delete(d.live, l.target.Name)
	}
	d.log.WithFields(logrus.Fields{"netns": l.target.Name, "cookie": l.cookie}).Info("rules removed")
	return nil
}

// Shutdown removes the rules of every netns served, or, with handover,
// leaves them in the kernel for a successor to adopt.
func (d *Daemon) Shutdown(handover bool) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	var errs []error
	for _, l := range d.live {
		if handover {
			d.kernel.Release(l.cookie)
			delete(d.live, l.target.Name)
			continue
		}
		if err := d.drop(l); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// Ready reports whether every desired target is enrolled (or, with
// WaitForOwners, served by another live nsredirect). A target its source
// could not describe (a bad label) is that workload's problem, shown in logs
// and metrics; it does not make the daemon unready for the others.
func (d *Daemon) Ready() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	var missing []string
	for _, t := range d.desired {
		if t.Err == nil && d.live[t.Name] == nil && !d.held[t.Name] {
			missing = append(missing, t.Name)
		}
	}
	if len(missing) > 0 {
		sort.Strings(missing)
		return fmt.Errorf("not enrolled: %s", strings.Join(missing, ", "))
	}
	return nil
}

// Serving returns the names of the netns currently enrolled.
func (d *Daemon) Serving() []string {
	d.mu.Lock()
	defer d.mu.Unlock()
	var names []string
	for n := range d.live {
		names = append(names, n)
	}
	sort.Strings(names)
	return names
}

// Snapshot reads the counters of every rule served, for metrics.
func (d *Daemon) Snapshot() metrics.Snapshot {
	d.mu.Lock()
	defer d.mu.Unlock()
	var s metrics.Snapshot
	for _, l := range d.live {
		counts := d.kernel.Redirects(l.cookie, len(l.target.Rules))
		for i, r := range l.target.Rules {
			s.Rules = append(s.Rules, metrics.RuleStat{Netns: l.target.Name, Rule: r.String(), Redirects: counts[i]})
		}
	}
	s.EnrollErrors = make(map[string]uint64, len(d.errors))
	for n, c := range d.errors {
		s.EnrollErrors[n] = c
	}
	return s
}

// RefuseSharedNetns sets Err on all but the first of targets that are one
// netns (containers or pods sharing a network namespace): a netns has one
// set of rules, and two owners would remove each other's. why says what to
// tell the user about name, which shares with first.
func RefuseSharedNetns(ts []Target, why func(name, first string) error) {
	first := map[netnsx.LiveID]string{} // not ID: see netnsx.ID.Live
	for i := range ts {
		if ts[i].Err != nil {
			continue
		}
		id, err := ts[i].Netns.Stat()
		if err != nil {
			continue // gone already; reconcile will find out
		}
		if other, ok := first[id.Live()]; ok {
			ts[i].Err = why(ts[i].Name, other)
			continue
		}
		first[id.Live()] = ts[i].Name
	}
}
