// Package daemon decides what the kernel should redirect, and is the one
// loop every long-running mode runs (Run): a discovery mode is a Source
// that only describes the desired targets (flags, Docker, Kubernetes),
// wakes the loop and decides on handover; Reconcile resolves each target's
// netns and enrolls, updates or removes rules through the loader. It is the
// one path into the kernel.
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
	Name string
	// Kind says what Name names, for messages: "container", "pod", "netns".
	Kind string
	// ID identifies the target stably whatever its name: a container ID, a
	// pod UID, the path `run` was given. Recorded with the enrollment.
	ID    string
	Netns netnsx.Target
	Rules []rule.Rule
	// Err, when set, says why the source could not describe the target (a
	// Docker label that does not parse): it is never enrolled, and the
	// error is logged and counted like a failed enrollment. An Err that
	// wraps ErrPending is not a failure: see ErrPending.
	Err error
}

// ErrPending marks a target whose netns cannot be found right now for a
// normal reason (a pod whose sandbox is being re-created): it is logged at
// info once, not counted as an error, and rules already live for it stay
// until its netns is proven gone.
var ErrPending = errors.New("netns not found yet")

// ErrLookup marks a target whose netns the source could not look up (an
// unreadable proc root): logged and counted like any failure, but rules
// already live for it stay until its netns is proven gone.
var ErrLookup = errors.New("netns lookup failed")

// ErrHostNetns is a target whose netns is the host's: redirecting there
// would steer the loopback connects of every host process. Every mode
// refuses it, by netns identity, whatever the source's configuration says.
var ErrHostNetns = errors.New("its network namespace is the host network namespace")

func (t Target) label() string {
	if t.Kind == "" {
		return "netns " + t.Name
	}
	return t.Kind + " " + t.Name
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
	// exit watches the process of a /proc/PID/ns/net target (nil: none);
	// watched is the id it was made for. byMounts: the path is a bind
	// mount (/run/netns/NAME), which the daemon's MountWatch covers. A
	// target with neither is looked at by the probe (Moved).
	exit     *netnsx.ExitWatch
	watched  netnsx.ID
	byMounts bool
}

// watch makes sure l is watched when it can be: its process for exit, or,
// for a bind mount, the mount table; a target that cannot be watched is
// left to the probe (Moved).
func (d *Daemon) watch(l *live) {
	l.byMounts = l.target.Netns.BindMount(l.id)
	if l.byMounts {
		l.exit.Close()
		l.exit = nil
		if d.mounts == nil || d.mounts.Done() {
			w, err := netnsx.WatchMounts(d.notifyChanged)
			if err != nil {
				d.log.WithError(err).Debug("cannot watch the mount table; probing the bind-mount targets")
				l.byMounts = false
				return
			}
			d.mounts = w
		}
		return
	}
	if l.exit != nil && !l.exit.Done() && l.watched == l.id {
		return
	}
	l.exit.Close()
	l.exit = nil
	w, err := l.target.Netns.WatchExit(l.id, d.notifyChanged)
	if err != nil {
		d.log.WithFields(logrus.Fields{"netns": l.target.Name}).WithError(err).Debug("cannot watch the process for exit; probing it")
		return
	}
	l.exit, l.watched = w, l.id
}

// watched reports whether something other than the probe tells when l
// may lead elsewhere (see watch).
func (d *Daemon) watched(l *live) bool {
	if l.byMounts {
		return !d.mounts.Done()
	}
	return !l.exit.Done()
}

func (d *Daemon) notifyChanged() {
	select {
	case d.changed <- struct{}{}:
	default: // a look is already due
	}
}

// Changed receives when a watched target may lead elsewhere now: the
// process of a /proc/PID/ns/net target exited, or the mount table changed
// under a bind-mount target. Its source should describe the targets again
// (Moved does not look at watched targets).
func (d *Daemon) Changed() <-chan struct{} { return d.changed }

// procRoot is where the daemon sees the host's processes by default.
const procRoot = "/proc"

// Daemon tracks the targets one process serves.
type Daemon struct {
	kernel Kernel
	owner  string
	log    logrus.FieldLogger

	// cookies reads a netns cookie from inside it: netnsx.SockoptCookie,
	// or the loader's BPF probe on kernels before 5.14.
	cookies netnsx.CookieReader

	// waitOwners: see Options.WaitForOwners.
	waitOwners bool
	// proc is where the host's processes are seen (/proc, or kube's
	// --proc): <proc>/1/ns/net is the host's netns, and <proc>/*/ns/net
	// the namespaces known to be alive.
	proc string
	// allowHost: see Options.AllowHostNetns.
	allowHost bool
	// holder names this daemon in each enrollment: see Options.Holder.
	holder string
	// host is the identity of the host's netns once found (hostKnown);
	// see Options.HostNetns.
	host      netnsx.LiveID
	hostKnown bool
	hostOpts  netnsx.HostOptions

	mu      sync.Mutex
	desired []Target
	live    map[string]*live
	failing map[string]error // name -> last error, so each is logged once
	changed chan struct{}    // see Changed
	// mounts watches the mount table while a bind-mount target is live
	// (see watch); closed by Shutdown.
	mounts  *netnsx.MountWatch
	errors  map[string]uint64
	held    map[string]bool // desired targets another live nsredirect serves
	pending map[string]bool // targets whose ErrPending was logged
	// stale is set when a target did not resolve, or its path now leads
	// to another process: its source should describe it again (a
	// container restarted with a new pid, and no event said so).
	stale bool
}

// Options are what a Daemon is told besides its kernel and cookie reader.
type Options struct {
	// Owner tags its enrollments with the mode (run, docker, kube).
	Owner string
	// Holder names the daemon in each enrollment so a person can find it:
	// "pod kube-system/nsredirect-x7k2p", "pid 1234 on host web1".
	Holder string
	// Proc is where the host's processes are seen (default /proc): kube's
	// --proc. The host's netns is <proc>/1/ns/net.
	Proc string
	// HostNetns is the identity of the host's netns, found by the caller
	// (netnsx.FindHost). Nil: the daemon looks itself, under Proc, at the
	// first target, and refuses every target while it cannot tell.
	HostNetns *netnsx.LiveID
	// WaitForOwners makes a target that another live nsredirect serves (the
	// loader's ErrBusy) a wait, not a failure: it is not counted as an
	// error, it counts as served for Ready, and it is adopted on the first
	// reconcile after the owner lets go. A DaemonSet rollout starts the new
	// daemon while the old one still serves every pod; the new one must
	// become ready then.
	WaitForOwners bool
	// AllowHostNetns lets a target be the host's netns (`run
	// --allow-host-netns`); without it such a target is refused.
	AllowHostNetns bool
	Log            logrus.FieldLogger
}

// hostNetns returns the host netns's identity, looked up until found.
func (d *Daemon) hostNetns() (netnsx.LiveID, error) {
	if d.hostKnown {
		return d.host, nil
	}
	id, err := netnsx.FindHost(d.proc, d.hostOpts)
	if err != nil {
		return netnsx.LiveID{}, err
	}
	d.host, d.hostKnown = id, true
	return id, nil
}

// New returns a daemon that enrolls through kernel, reading each target's
// netns cookie with cookies (the loader's CookieSource.Read: the same number
// the programs see, on every kernel).
func New(kernel Kernel, cookies netnsx.CookieReader, o Options) *Daemon {
	d := &Daemon{
		kernel:     kernel,
		cookies:    cookies,
		owner:      o.Owner,
		holder:     o.Holder,
		log:        o.Log,
		waitOwners: o.WaitForOwners,
		allowHost:  o.AllowHostNetns,
		live:       map[string]*live{},
		failing:    map[string]error{},
		errors:     map[string]uint64{},
		held:       map[string]bool{},
		pending:    map[string]bool{},
		proc:       procRoot,
		changed:    make(chan struct{}, 1),
	}
	if o.Proc != "" {
		d.proc = o.Proc
	}
	if o.HostNetns != nil {
		d.host, d.hostKnown = *o.HostNetns, true
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
		if errors.Is(err, ErrPending) {
			if !d.pending[t.Name] {
				d.pending[t.Name] = true
				log.WithError(err).Info("netns not there yet; waiting for it")
			}
			continue
		}
		delete(d.pending, t.Name)
		if err != nil {
			errs = append(errs, err)
			if prev, ok := d.failing[t.Name]; !ok || prev.Error() != err.Error() {
				d.failing[t.Name] = err
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
	for name := range d.pending {
		if !want[name] {
			delete(d.pending, name)
		}
	}
	return errors.Join(errs...)
}

func (d *Daemon) apply(t Target) error {
	cur := d.live[t.Name]
	if t.Err != nil {
		switch {
		case cur == nil:
		case errors.Is(t.Err, ErrPending), errors.Is(t.Err, ErrLookup):
			d.dropUnlessAlive(cur, t.Err) // not found now is not gone
		default:
			_ = d.drop(cur) // the target itself is wrong now (a bad annotation)
		}
		return t.Err
	}
	specs := rule.FormatList(t.Rules)
	if cur != nil && cur.specs == specs {
		// The common case, every resync: same namespace file, nothing to
		// do. Entering the netns costs a thread, so only do it on change.
		id, err := t.Netns.Stat()
		if err == nil && id == cur.id {
			return nil
		}
		if err != nil {
			d.stale = true // the source should say where the target is now
		} else if t.Netns.Path == cur.target.Netns.Path && id.Start != 0 && cur.id.Start != 0 && id.Start != cur.id.Start {
			// The process the path went through is gone and its pid
			// reused by another: never follow that one.
			d.stale = true
			d.dropUnlessAlive(cur, nil)
			return fmt.Errorf("%s: the process of %s is gone (its pid now belongs to another process)", t.label(), t.Netns.Path)
		}
	}
	cookie, id, err := t.Netns.ResolveWith(d.cookies)
	if err != nil {
		d.stale = true
		if cur != nil {
			d.dropUnlessAlive(cur, err)
		}
		return err
	}
	if !d.allowHost {
		host, err := d.hostNetns()
		if err != nil {
			// Fail closed: a target not proven to be another netns than
			// the host's could steer every host process's loopback.
			if cur != nil {
				_ = d.drop(cur)
			}
			return fmt.Errorf("%s: refused: %w", t.label(), err)
		}
		if id.IsHost(host) {
			if cur != nil {
				_ = d.drop(cur)
			}
			return fmt.Errorf("%s: %w; refusing to redirect the host's own loopback: give it a network namespace of its own, or remove its label/annotation", t.label(), ErrHostNetns)
		}
	}
	if cur != nil && cur.cookie == cookie && cur.specs == specs {
		// The same netns, maybe through another path now (a container
		// sharing another's netns restarted with a new pid): look at it
		// through that path from now on.
		cur.id, cur.target = id, t
		d.watch(cur)
		return nil
	}
	log := d.log.WithFields(logrus.Fields{"netns": t.Name, "cookie": cookie, "rule": specs})
	if t.ID != "" {
		log = log.WithField("id", t.ID)
	}
	if err := d.kernel.Enroll(loader.Enrollment{
		Cookie: cookie, NetnsIno: id.Ino, Name: t.Name, Owner: d.owner, ID: t.ID, Holder: d.holder, Rules: rule.Entries(t.Rules),
	}); err != nil {
		return fmt.Errorf("netns %s: %w", t.Name, err)
	}
	if cur != nil && cur.cookie != cookie {
		log.WithField("old_cookie", cur.cookie).Info("netns was replaced; following it")
		_ = d.drop(cur)
	}
	if old := d.live[t.Name]; old != nil {
		old.exit.Close() // replaced below (new rules for the same netns)
	}
	l := &live{target: t, cookie: cookie, id: id, specs: specs}
	d.live[t.Name] = l
	d.watch(l)
	log.WithField("holder", d.holder).Info("redirect live")
	return nil
}

// dropUnlessAlive removes l's rules when its netns is proven gone: no
// process under the proc root, nor l's own path, still reaches that netns.
// A lookup that failed (a process of a pod exited, the source could not
// say where the target is right now) keeps them: the namespace may live on.
func (d *Daemon) dropUnlessAlive(l *live, why error) {
	if netnsx.Alive(d.proc, l.id.Live(), l.target.Netns.Path) {
		d.log.WithFields(logrus.Fields{"netns": l.target.Name, "cookie": l.cookie}).WithError(why).Debug("lookup failed but the netns lives; rules kept")
		return
	}
	_ = d.drop(l)
}

// Moved reports whether the path of a live target that nothing watches
// (see Changed) may no longer lead to the namespace it was enrolled
// through: one stat each (netnsx.Changed), no file read, no namespace
// entered. It runs on every resync: the targets of a DaemonSet reading the
// host's /proc, whose pids are not its own to watch.
func (d *Daemon) Moved() bool {
	d.mu.Lock()
	defer d.mu.Unlock()
	for _, l := range d.live {
		if !d.watched(l) && l.target.Netns.Changed(l.id) {
			return true
		}
	}
	return false
}

// Settled reports whether the last reconcile left nothing to wait for:
// every desired target is enrolled, or failed for a reason of its own that
// only a change of the target itself (a new label, annotation or container:
// an event) can mend (a bad rule, the host netns, a netns shared). While
// settled, a resync need not look at every target again: Moved watches
// the live ones. A target not there yet, held by another daemon, or failing
// for any other reason (a resolve or map error) unsettles it.
func (d *Daemon) Settled() bool {
	d.mu.Lock()
	defer d.mu.Unlock()
	if len(d.pending) > 0 || len(d.held) > 0 || d.stale {
		return false
	}
	for _, t := range d.desired {
		err, failing := d.failing[t.Name]
		if !failing || errors.Is(err, ErrHostNetns) {
			continue
		}
		// The source's own description of the target (t.Err) is settled,
		// unless it only says the lookup failed.
		if t.Err == nil || errors.Is(t.Err, ErrLookup) {
			return false
		}
	}
	return true
}

// TakeStale reports, and clears, whether a target did not resolve or its
// path now leads elsewhere since the last call: its source should be asked
// to describe the targets again.
func (d *Daemon) TakeStale() bool {
	d.mu.Lock()
	defer d.mu.Unlock()
	s := d.stale
	d.stale = false
	return s
}

// Failures returns the last error of each desired target that failed.
func (d *Daemon) Failures() map[string]error {
	d.mu.Lock()
	defer d.mu.Unlock()
	out := map[string]error{}
	for n, err := range d.failing {
		out[n] = err
	}
	return out
}

func (d *Daemon) drop(l *live) error {
	if err := d.kernel.Unenroll(l.cookie); err != nil {
		return fmt.Errorf("remove rules of netns %s: %w", l.target.Name, err)
	}
	if d.live[l.target.Name] == l {
		delete(d.live, l.target.Name)
	}
	l.exit.Close()
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
			l.exit.Close()
			continue
		}
		if err := d.drop(l); err != nil {
			errs = append(errs, err)
		}
	}
	d.mounts.Close()
	d.mounts = nil
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
		id, err := ts[i].Netns.LiveID()
		if err != nil {
			continue // gone already; reconcile will find out
		}
		if other, ok := first[id]; ok {
			ts[i].Err = why(ts[i].Name, other)
			continue
		}
		first[id] = ts[i].Name
	}
}
