package cli

import (
	"context"
	"errors"
	"flag"
	"net"
	"os"
	"time"

	"github.com/sirupsen/logrus"

	"github.com/nsredirect/nsredirect/internal/daemon"
	"github.com/nsredirect/nsredirect/internal/loader"
	"github.com/nsredirect/nsredirect/internal/metrics"
	"github.com/nsredirect/nsredirect/internal/netnsx"
	"github.com/nsredirect/nsredirect/internal/rule"
)

// resyncEvery is how often a daemon re-resolves its targets, to follow a
// netns replaced under the same path and drop one that vanished.
const resyncEvery = time.Second

// kernelFlags are the flags of every command that attaches.
type kernelFlags struct {
	cgroup, pinDir, metricsAddr string
	// forceProbe is NSREDIRECT_NETNS_COOKIE=bpf-probe: learn netns cookies
	// through the BPF probe even where SO_NETNS_COOKIE exists. A test knob,
	// not a flag: both ways give the same cookie, so a user never needs it.
	forceProbe bool
	// cookies reads netns cookies; set by preflight, closed by serve.
	cookies *loader.CookieSource
}

// cookieKnob is the environment variable that forces the BPF probe.
const cookieKnob = "NSREDIRECT_NETNS_COOKIE"

func parseCookieKnob(getenv Env) (bool, error) {
	switch v := getenv(cookieKnob); v {
	case "", loader.CookieSockopt:
		return false, nil
	case loader.CookieBPFProbe:
		return true, nil
	default:
		return false, usagef("%s=%q: use %s (the default where the kernel has it) or %s", cookieKnob, v, loader.CookieSockopt, loader.CookieBPFProbe)
	}
}

// parse registers the flags every long-running mode shares (kernel,
// metrics, logging) beside the mode's own, parses args and builds the logger.
func (k *kernelFlags) parse(fs *flag.FlagSet, args []string, io IO) (*logrus.Logger, error) {
	var lf logFlags
	k.register(fs)
	lf.register(fs)
	if err := parse(fs, args, io.Getenv); err != nil {
		return nil, err
	}
	force, err := parseCookieKnob(io.Getenv)
	if err != nil {
		return nil, err
	}
	k.forceProbe = force
	return lf.logger(io.Stderr)
}

func (k *kernelFlags) register(fs *flag.FlagSet) {
	fs.StringVar(&k.cgroup, "cgroup", "", "cgroup2 mount to attach at (default: the first cgroup2 mount in /proc/self/mountinfo)")
	fs.StringVar(&k.pinDir, "pin-dir", loader.DefaultPinDir, "bpffs directory for pinned programs, maps and links")
	fs.StringVar(&k.metricsAddr, "metrics-addr", "", "HOST:PORT for /metrics, /healthz and /readyz (empty: off)")
}

// preflight checks everything that can be checked before touching the
// kernel, so bad input leaves nothing attached, and picks how netns cookies
// are read (the caller closes k.cookies).
func (k *kernelFlags) preflight(log logrus.FieldLogger) error {
	if err := loader.CheckPrivileges(); err != nil {
		return err
	}
	cg, err := loader.Cgroup2Root(k.cgroup, "/proc/self/mountinfo", log)
	if err != nil {
		return err
	}
	k.cgroup = cg
	if err := loader.CheckKernel(); err != nil {
		return err
	}
	cookies, err := loader.NewCookieSource(k.cgroup, k.forceProbe)
	if err != nil {
		return err
	}
	k.cookies = cookies
	return nil
}

// listenMetrics opens the metrics socket if asked; nil listener otherwise.
func (k *kernelFlags) listenMetrics() (net.Listener, error) {
	if k.metricsAddr == "" {
		return nil, nil
	}
	ln, err := metrics.Listen(k.metricsAddr)
	if err != nil {
		return nil, UsageError{err}
	}
	return ln, nil
}

func (k *kernelFlags) attach(log logrus.FieldLogger) (*loader.Loader, error) {
	if err := loader.EnsureBPFFS(k.pinDir); err != nil {
		return nil, err
	}
	return loader.Attach(k.pinDir, k.cgroup, log)
}

func runCmd(ctx context.Context, io IO, args []string) error {
	fs := flagSet("run", io)
	var netnsArg string
	var redirects listFlag
	var kf kernelFlags
	fs.StringVar(&netnsArg, "netns", "", "target netns: self, a path (/run/netns/NAME, /proc/PID/ns/net) or pid:N")
	fs.Var(&redirects, "redirect", "SPEC [FROM_ADDR:]FROM_PORT=[TO_ADDR:]TO_PORT; repeat for more")
	log, err := kf.parse(fs, args, io)
	if err != nil {
		return err
	}
	if netnsArg == "" {
		return usagef("--netns is required: self, /run/netns/NAME, /proc/PID/ns/net or pid:N (or NSREDIRECT_NETNS)")
	}
	target, err := netnsx.ParseTarget(netnsArg)
	if err != nil {
		return err
	}
	if len(redirects) == 0 {
		return usagef("--redirect is required, e.g. --redirect 80=3210 (or NSREDIRECT_REDIRECT=80=3210)")
	}
	rules, err := rule.ParseAll(redirects)
	if err != nil {
		return err
	}
	if err := kf.preflight(log); err != nil {
		return err
	}
	defer kf.cookies.Close()
	// The target must exist before anything is attached.
	if _, _, err := target.ResolveWith(kf.cookies.Read); err != nil {
		return err
	}
	name := target.Spec
	if name == "self" {
		host, _ := os.Hostname()
		name = "self@" + host
	}
	desired := []daemon.Target{{Name: name, Netns: target, Rules: rules}}
	return serve(ctx, &kf, "run", log, func(d *daemon.Daemon, _ *loader.Loader) error { return d.Reconcile(desired) }, nil, nil)
}

// serveExtra is what a mode may add to serve's life.
type serveExtra struct {
	// resync, if set, runs on the resync tick instead of d.Resync: a mode
	// whose targets' netns paths change (a pod's sandbox pid) recomputes
	// them rather than re-resolving stale ones.
	resync     func(*daemon.Daemon)
	daemonOpts []daemon.Option
}

// serve is the life of every long-running mode: attach, enroll what start
// says (start gets the loader too, for a discovery mode's RemoveOrphans after
// its first listing), serve metrics, resync until ctx ends, then remove this instance's
// rules (or hand them over when handover says so) and, as the last instance
// out, everything. loop, if given, runs alongside (a discovery mode's watch)
// and ends the daemon with its error.
func serve(ctx context.Context, kf *kernelFlags, owner string, log *logrus.Logger,
	start func(*daemon.Daemon, *loader.Loader) error, loop func(context.Context, *daemon.Daemon) error, handover func() bool, extra ...serveExtra) error {
	var x serveExtra
	if len(extra) > 0 {
		x = extra[0]
	}
	ln, err := kf.listenMetrics()
	if err != nil {
		return err
	}
	if ln != nil {
		defer ln.Close()
	}
	kernel, err := kf.attach(log)
	if err != nil {
		return err
	}
	// Said only once attached: a refusal before that stays one line.
	if kf.cookies.Name == loader.CookieBPFProbe {
		log.WithField("netns_cookie", kf.cookies.Name).Info("netns cookies are learnt through a BPF probe: getsockopt(SO_NETNS_COOKIE) needs Linux >= 5.14 (or NSREDIRECT_NETNS_COOKIE=bpf-probe)")
	}
	d := daemon.New(kernel, kf.cookies.Read, owner, log, x.daemonOpts...)
	stop := func(handingOver bool) error {
		err := d.Shutdown(handingOver)
		if !handingOver {
			if _, e := kernel.RemoveAllIfUnused(); e != nil {
				err = errors.Join(err, e)
			}
		}
		return errors.Join(err, kernel.Close())
	}
	if err := start(d, kernel); err != nil {
		return errors.Join(err, stop(false))
	}

	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	errc := make(chan error, 2)
	if ln != nil {
		reg := metrics.Registry(d.Snapshot, Version)
		go func() { errc <- metrics.Serve(ctx, ln, reg, kernel.Intact, d.Ready) }()
		log.WithField("addr", ln.Addr().String()).Info("serving /metrics, /healthz, /readyz")
	}
	if loop != nil {
		go func() { errc <- loop(ctx, d) }()
	}
	log.WithFields(logrus.Fields{"pin_dir": kf.pinDir, "cgroup": kf.cgroup, "netns": d.Serving(), "netns_cookie": kf.cookies.Name}).Info("nsredirect running")

	tick := time.NewTicker(resyncEvery)
	defer tick.Stop()
	var runErr error
	for running := true; running; {
		select {
		case <-ctx.Done():
			running = false
		case err := <-errc:
			if err != nil {
				runErr = err
				running = false
			}
		case <-tick.C:
			if err := kernel.Intact(); err != nil {
				runErr = err
				running = false
				break
			}
			if x.resync != nil {
				x.resync(d)
			} else {
				_ = d.Resync() // failures are logged once by the daemon
			}
		}
	}
	cancel()
	handingOver := handover != nil && handover()
	log.WithField("handover", handingOver).Info("stopping")
	return errors.Join(runErr, stop(handingOver))
}
