package daemon

import (
	"context"
	"errors"
	"fmt"
	"net"
	"sort"
	"sync"
	"time"

	"github.com/sirupsen/logrus"

	"github.com/nsredirect/nsredirect/internal/loader"
	"github.com/nsredirect/nsredirect/internal/metrics"
	"github.com/nsredirect/nsredirect/internal/netnsx"
)

// Source is a discovery mode: run's fixed targets, Docker, Kubernetes. It
// only says what should be redirected, when that may have changed, and how
// its targets are served (its Policy, the handover on shutdown included);
// Run does everything else.
type Source interface {
	// Desired describes every target that should have rules now. An error
	// means the source could not be asked (Docker is down): nothing
	// changes, and Run asks again on the next wake-up or resync.
	Desired(ctx context.Context) ([]Target, error)
	// Watch calls wake whenever Desired may have changed, until ctx ends.
	// An error ends the daemon.
	Watch(ctx context.Context, wake func()) error
	// Policy is how Run serves the source's targets; read once, at start.
	Policy() Policy
}

// Policy is what a source declares about how its targets are served, as a
// value Run reads: the loop asks no source what type it is.
type Policy struct {
	// Fixed: the targets are given by flags (run). A failure to enroll
	// them at start ends the daemon; there is no last look at the targets
	// at shutdown; and, as the source does not know every target its mode
	// serves on the host, an ownerless record of the mode is removed only
	// once its netns is proven gone.
	Fixed bool
	// WaitForOwners: see Options.WaitForOwners (a DaemonSet rollout).
	WaitForOwners bool
	// AllowHostNetns lets a target be the host's netns (run
	// --allow-host-netns); without it such a target is refused.
	AllowHostNetns bool
	// RedescribeEachResync: the source's descriptions go stale on their
	// own (a pod's processes come and go). It is asked on every resync that
	// looks at every target (each one while the daemon is not settled,
	// every fullEvery-th otherwise), not only on wake-ups and when a target
	// stops resolving.
	RedescribeEachResync bool
	// Reconciled, if set, is told the outcome of each reconcile (kube posts
	// Events on its pods).
	Reconciled func(ctx context.Context, desired []Target, serving []string, failures map[string]error)
	// Handover decides, at shutdown, whether the rules of the targets still
	// served stay in the kernel for a successor to adopt (true) or are
	// removed (false, or no Handover).
	Handover func(ctx context.Context, serving []string) bool
}

// Attached is the loader as Run drives it.
type Attached interface {
	Kernel
	Intact() error
	Heal(cgroup string) ([]string, error)
	Fill() ([]metrics.MapFill, error)
	PeerStorageFailures() (uint64, error)
	Records() ([]loader.Record, error)
	RemoveWhere(match func(loader.Record) bool) ([]loader.Record, error)
	RemoveAllIfUnused() (bool, error)
	// StartupRepairs names the links Attach found detached or defunct and
	// replaced, counted like the loop's repairs.
	StartupRepairs() []string
	Close() error
}

// Config is what Run needs besides its source.
type Config struct {
	Kernel Attached
	// Cookies reads a netns cookie from inside it.
	Cookies netnsx.CookieReader
	// Owner is the mode (run, docker, kube); Holder names this daemon so a
	// person can find it.
	Owner, Holder string
	// Cgroup is where the programs are attached (for Heal).
	Cgroup string
	// Proc is where the host's processes are seen (default /proc).
	Proc string
	// HostNetns is the host netns's identity, found before start
	// (netnsx.FindHost); nil: the daemon looks under Proc itself.
	HostNetns *netnsx.LiveID
	// Resync is how often targets are re-resolved and links checked
	// (default 1 s).
	Resync time.Duration
	// Metrics, if set, serves /metrics, /healthz and /readyz.
	Metrics net.Listener
	Version string
	// StartTimeout bounds the first Desired (default 30 s).
	StartTimeout time.Duration
	Log          logrus.FieldLogger
}

// Run is the life of every long-running mode: enroll what src describes,
// remove what predecessors left for targets that are gone, serve metrics,
// follow src's wake-ups and resync (re-resolve, heal detached links) until
// ctx ends, then hand over or remove the rules as src decides and, as the
// last instance out, unpin everything. cfg.Kernel is closed on return.
func Run(ctx context.Context, src Source, cfg Config) error {
	if cfg.Resync == 0 {
		cfg.Resync = time.Second
	}
	if cfg.StartTimeout == 0 {
		cfg.StartTimeout = 30 * time.Second
	}
	if cfg.Proc == "" {
		cfg.Proc = procRoot
	}
	log := cfg.Log
	kernel := cfg.Kernel
	policy := src.Policy()
	d := New(kernel, cfg.Cookies, Options{
		Owner: cfg.Owner, Holder: cfg.Holder, Proc: cfg.Proc, HostNetns: cfg.HostNetns, Log: log,
		WaitForOwners: policy.WaitForOwners, AllowHostNetns: policy.AllowHostNetns,
	})
	r := &runner{src: src, policy: policy, cfg: cfg, d: d, repairs: map[string]uint64{}}
	stop := func(handingOver bool) error {
		err := d.Shutdown(handingOver)
		if !handingOver {
			if _, e := kernel.RemoveAllIfUnused(); e != nil {
				err = errors.Join(err, e)
			}
		}
		return errors.Join(err, kernel.Close())
	}
	// A link detached while no daemon ran: Attach has replaced it already
	// (the loader's StartupRepairs); count it like a repair of the loop's.
	r.repaired(kernel.StartupRepairs())
	r.heal()

	sctx, cancel := context.WithTimeout(ctx, cfg.StartTimeout)
	desired, err := src.Desired(sctx)
	cancel()
	if err != nil {
		return errors.Join(err, stop(false))
	}
	err = r.reconcile(ctx, desired)
	if err != nil && policy.Fixed {
		return errors.Join(err, stop(false))
	}
	if err := r.removeOrphans(desired); err != nil {
		return errors.Join(err, stop(false))
	}

	ctx, cancelRun := context.WithCancel(ctx)
	defer cancelRun()
	errc := make(chan error, 2)
	if cfg.Metrics != nil {
		reg := metrics.Registry(r.snapshot, cfg.Version)
		go func() { errc <- metrics.Serve(ctx, cfg.Metrics, reg, kernel.Intact, d.Ready) }()
		log.WithField("addr", cfg.Metrics.Addr().String()).Info("serving /metrics, /healthz, /readyz")
	}
	wake := make(chan struct{}, 1)
	go func() {
		errc <- src.Watch(ctx, func() {
			select {
			case wake <- struct{}{}:
			default: // a describe is already due; it will see this change too
			}
		})
	}()
	log.WithFields(logrus.Fields{"cgroup": cfg.Cgroup, "netns": d.Serving(), "holder": cfg.Holder}).Info("nsredirect running")

	// One timer for everything periodic: an idle daemon wakes once per
	// resync, and does as little as it can then.
	tick := time.NewTicker(cfg.Resync)
	defer tick.Stop()
	var runErr error
	ticks := 0
	for running := true; running; {
		select {
		case <-ctx.Done():
			running = false
		case err := <-errc:
			if err != nil {
				runErr = err
				running = false
			}
		case <-wake:
			r.describe(ctx)
		case <-d.Changed():
			r.describe(ctx)
		case <-tick.C:
			if err := kernel.Intact(); err != nil {
				runErr = err
				running = false
				break
			}
			r.heal()
			// Every target is looked at again (and a source that RedescribeEachResync asked)
			// on every fullEvery-th resync, and on each one while some
			// target is not settled. In between, the probe (one stat per
			// live target that nothing else watches), the source's events
			// and its own relists are what notice a change: an idle node
			// costs little.
			if ticks++; ticks%fullEvery != 0 && d.Settled() {
				// The probe runs once per resync: the targets it looks at
				// (the pods of a DaemonSet reading the host's /proc) must
				// be followed within a second of a re-created sandbox or an
				// exit that no API event tells, and once a second is the
				// slowest rate that keeps that.
				if d.Moved() {
					r.describe(ctx)
				}
				break
			}
			if policy.RedescribeEachResync {
				r.describe(ctx)
				break
			}
			_ = d.Resync() // failures are logged once by the daemon
			if d.TakeStale() {
				// A target did not resolve: its source says where it is
				// now (a container restarted with no usable event).
				r.describe(ctx)
			}
		}
	}
	cancelRun()
	if !policy.Fixed {
		// One last look: what stopped meanwhile is removed, not handed over.
		hctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 3*time.Second)
		if desired, err := src.Desired(hctx); err != nil {
			log.WithError(err).Warn("cannot describe the targets at shutdown; deciding on the ones last seen")
		} else {
			_ = r.reconcile(hctx, desired)
		}
		cancel()
	}
	hctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 3*time.Second)
	handingOver := len(d.Serving()) > 0 && policy.Handover != nil && policy.Handover(hctx, d.Serving())
	cancel()
	log.WithFields(logrus.Fields{"handover": handingOver, "netns": d.Serving()}).Info("stopping")
	return errors.Join(runErr, stop(handingOver))
}

// fullEvery: every this many resyncs, every target is looked at again even
// while the daemon is settled (Daemon.Settled): the probe's look at a
// /proc/PID/ns/net target sees its process, not a setns of that process.
const fullEvery = 10

type runner struct {
	src    Source
	policy Policy
	cfg    Config
	d      *Daemon

	mu          sync.Mutex
	repairs     map[string]uint64 // hook -> links re-created
	describeErr string            // last Desired failure, logged once
}

func (r *runner) describe(ctx context.Context) {
	dctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	desired, err := r.src.Desired(dctx)
	if err != nil {
		if ctx.Err() == nil && err.Error() != r.describeErr {
			r.describeErr = err.Error()
			r.cfg.Log.WithError(err).Warn("cannot describe the targets; keeping the rules as they are")
		}
		return
	}
	r.describeErr = ""
	_ = r.reconcile(ctx, desired)
}

func (r *runner) reconcile(ctx context.Context, desired []Target) error {
	err := r.d.Reconcile(desired)
	if r.policy.Reconciled != nil {
		r.policy.Reconciled(ctx, desired, r.d.Serving(), r.d.Failures())
	}
	return err
}

// heal re-creates a link of ours that was detached (bpftool link detach)
// or went defunct, and puts our program back on one that runs another's.
func (r *runner) heal() {
	repaired, err := r.cfg.Kernel.Heal(r.cfg.Cgroup)
	r.repaired(repaired)
	if err != nil {
		r.cfg.Log.WithError(err).Error("cannot check or repair the attached links")
	}
}

// repaired logs and counts links of ours that were found detached or
// defunct and re-created, or running a program not ours and given ours back.
func (r *runner) repaired(hooks []string) {
	for _, h := range hooks {
		// Logged before it is counted: whoever sees the count (a scrape)
		// finds the log line written.
		r.cfg.Log.WithFields(logrus.Fields{"hook": h, "cgroup": r.cfg.Cgroup}).Warn("our link was detached or defunct (re-created and re-pinned it) or ran a program not ours (put ours back)")
		r.mu.Lock()
		r.repairs[h]++
		r.mu.Unlock()
	}
}

// removeOrphans removes the ownerless records of this mode that nothing
// claims, after the first reconcile (what a predecessor handed over is ours
// by then, or held by a live owner and never touched). A source that lists
// every target of its mode (docker, kube) claims by stable ID (by name for a
// record without one); a fixed one (run)
// cannot tell, so its records go only once their netns is proven gone.
func (r *runner) removeOrphans(desired []Target) error {
	// Claimed by stable ID where the record has one (a container
	// recreated under the same name has a new ID: its old record is an
	// orphan even while the new one fails to enroll), by name otherwise
	// (records of layout 1 have no ID).
	wantName, wantID := map[string]bool{}, map[string]bool{}
	idOf := map[string]string{}
	for _, t := range desired {
		wantName[t.Name] = true
		if t.ID != "" {
			wantID[t.ID] = true
			idOf[t.Name] = t.ID
		}
	}
	for _, n := range r.d.Serving() {
		// served: ours now, not an orphan
		delete(wantName, n)
		delete(wantID, idOf[n])
	}
	claimed := func(rec loader.Record) bool {
		if r.policy.Fixed {
			return rec.NetnsIno == 0 || netnsx.InoAlive(r.cfg.Proc, rec.NetnsIno)
		}
		if rec.ID != "" {
			return wantID[rec.ID]
		}
		return wantName[rec.Name]
	}
	// Enrollments of live owners and of other modes are never touched.
	removed, err := r.cfg.Kernel.RemoveWhere(func(rec loader.Record) bool {
		return rec.Owner == r.cfg.Owner && !rec.OwnerAlive && !claimed(rec)
	})
	for _, rec := range removed {
		r.cfg.Log.WithFields(logrus.Fields{"netns": rec.Name, "cookie": rec.Cookie, "id": rec.ID}).Info("removed rules handed over for a target that is gone")
	}
	return err
}

// snapshot is what a scrape reports: the daemon's rules and errors, and
// the kernel's state.
func (r *runner) snapshot() metrics.Snapshot {
	s := r.d.Snapshot()
	r.mu.Lock()
	s.LinkRepairs = make(map[string]uint64, len(r.repairs))
	for h, n := range r.repairs {
		s.LinkRepairs[h] = n
	}
	r.mu.Unlock()
	if fill, err := r.cfg.Kernel.Fill(); err == nil {
		s.Maps = fill
		sort.Slice(s.Maps, func(i, j int) bool { return s.Maps[i].Map < s.Maps[j].Map })
	}
	if n, err := r.cfg.Kernel.PeerStorageFailures(); err == nil {
		s.PeerStorageFailures = n
	}
	return s
}

// HostHolder is the Holder of a daemon outside any pod: "pid N on host H".
func HostHolder(pid int, hostname string) string {
	return fmt.Sprintf("pid %d on host %s", pid, hostname)
}
