package cli

import (
	"context"
	"errors"
	"flag"
	"fmt"
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
	// cookies reads netns cookies; set by preflight, closed by the command.
	cookies *loader.CookieSource
	// hostByProcesses is NSREDIRECT_HOST_NETNS=processes: find the host's
	// netns only through the host's processes, as on kernels whose init_net
	// has no fixed inode. A test knob: it can only refuse more.
	hostByProcesses bool
	log             logFlags
}

// hostNetnsKnob is the environment variable of kernelFlags.hostByProcesses.
const hostNetnsKnob = "NSREDIRECT_HOST_NETNS"

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

// parse parses args into fs, where register put the flags every
// long-running mode shares beside the mode's own, and builds the logger.
func (k *kernelFlags) parse(fs *flag.FlagSet, args []string, io IO) (*logrus.Logger, error) {
	if err := parse(fs, args, io.Getenv); err != nil {
		return nil, err
	}
	force, err := parseCookieKnob(io.Getenv)
	if err != nil {
		return nil, err
	}
	k.forceProbe = force
	switch v := io.Getenv(hostNetnsKnob); v {
	case "":
	case "processes":
		k.hostByProcesses = true
	default:
		return nil, usagef("%s=%q: the only value is processes (a test knob)", hostNetnsKnob, v)
	}
	log, err := k.log.logger(io.Stderr)
	if err != nil {
		return nil, err
	}
	log.AddHook(adviceHook{fs.Name()})
	return log, nil
}

// hostNetns finds the identity of the host's netns under proc before
// anything is attached. A daemon that cannot tell it could take the host's
// netns for a target's: it refuses to start (exit 2), saying why and fix,
// what to change.
func (k *kernelFlags) hostNetns(proc, fix string) (netnsx.LiveID, error) {
	id, err := netnsx.FindHost(proc, netnsx.HostOptions{IgnoreFixedInode: k.hostByProcesses})
	if err != nil {
		return id, UsageError{fmt.Errorf("%w, so no target can be proven not to be it: %s", err, fix)}
	}
	return id, nil
}

// register puts the flags every long-running mode shares (kernel, metrics,
// logging) on fs.
func (k *kernelFlags) register(fs *flag.FlagSet) {
	fs.StringVar(&k.cgroup, "cgroup", "", "cgroup2 mount to attach at (default: the first cgroup2 mount in /proc/self/mountinfo)")
	fs.StringVar(&k.pinDir, "pin-dir", loader.DefaultPinDir, "bpffs directory for pinned programs, maps and links")
	fs.StringVar(&k.metricsAddr, "metrics-addr", "", "HOST:PORT for /metrics, /healthz and /readyz (empty: off)")
	k.log.register(fs)
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

// runFlags are the flags of `run`.
type runFlags struct {
	netns, redirects        listFlag
	allowHost, removeOnExit bool
	kf                      kernelFlags
}

func (f *runFlags) register(fs *flag.FlagSet) {
	fs.Var(&f.netns, "netns", "target netns: self, a path (/run/netns/NAME, /proc/PID/ns/net) or pid:N; repeat for more (each gets every --redirect)")
	fs.Var(&f.redirects, "redirect", "SPEC [FROM_ADDR:]FROM_PORT=[TO_ADDR:]TO_PORT[/udp]; repeat for more")
	fs.BoolVar(&f.allowHost, "allow-host-netns", false, "allow a target that is the host's netns (redirects the loopback of every host process)")
	fs.BoolVar(&f.removeOnExit, "remove-on-exit", false, "remove the rules when stopped (default: they stay while the netns lives, for the next daemon to adopt)")
	f.kf.register(fs)
}

func runCmd(ctx context.Context, io IO, args []string) error {
	fs := flagSet("run", io)
	var f runFlags
	f.register(fs)
	kf := &f.kf
	log, err := kf.parse(fs, args, io)
	if err != nil {
		return err
	}
	if len(f.netns) == 0 {
		return usagef("--netns is required: self, /run/netns/NAME, /proc/PID/ns/net or pid:N (or NSREDIRECT_NETNS)")
	}
	targets := make([]netnsx.Target, len(f.netns))
	for i, a := range f.netns {
		if targets[i], err = netnsx.ParseTarget(a); err != nil {
			return err
		}
	}
	if len(f.redirects) == 0 {
		return usagef("--redirect is required, e.g. --redirect 80=3210 (or NSREDIRECT_REDIRECT=80=3210)")
	}
	rules, err := rule.ParseAll(f.redirects)
	if err != nil {
		return err
	}
	if err := kf.preflight(log); err != nil {
		return err
	}
	defer kf.cookies.Close()
	host, hostErr := kf.hostNetns("/proc", "grant CAP_SYS_PTRACE (systemd: CapabilityBoundingSet; docker: cap_add: [SYS_PTRACE] and pid: host), or pass --allow-host-netns if no --netns can be the host's")
	if hostErr != nil && !f.allowHost {
		return hostErr
	}
	if hostErr != nil {
		log.WithError(hostErr).Warn("--allow-host-netns: the host network namespace cannot be told apart; enrolling every --netns as given")
	}
	src := daemon.Fixed{RemoveOnExit: f.removeOnExit, AllowHostNetns: f.allowHost}
	for _, target := range targets {
		name := target.Spec
		if name == "self" {
			host, _ := os.Hostname()
			name = "self@" + host
		}
		src.Targets = append(src.Targets, daemon.Target{Name: name, Kind: "netns", ID: target.Path, Netns: target, Rules: rules})
	}
	cfg := daemon.Config{Owner: "run"}
	if hostErr == nil {
		cfg.HostNetns = &host
	}
	hosts, err := src.Check(kf.cookies.Read, cfg.HostNetns)
	switch {
	case errors.Is(err, daemon.ErrSameNetns):
		return usagef("--netns %v; give each namespace once", err)
	case errors.Is(err, daemon.ErrHostNetns):
		return usagef("--netns %v: its rules would redirect the loopback connects of every process on the host; give a container's or a named netns, or pass --allow-host-netns if that is what you mean", err)
	case err != nil:
		return err
	}
	for _, t := range hosts {
		log.WithField("netns", t.Netns.String()).Warn("--allow-host-netns: redirecting in the host network namespace, for every process on the host")
	}
	return serve(ctx, kf, log, src, cfg)
}

// serve attaches and runs the daemon loop with src: the wiring every
// long-running mode shares.
func serve(ctx context.Context, kf *kernelFlags, log *logrus.Logger, src daemon.Source, cfg daemon.Config) error {
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
	if cfg.Holder == "" {
		host, _ := os.Hostname()
		cfg.Holder = daemon.HostHolder(os.Getpid(), host)
	}
	cfg.Kernel, cfg.Cookies, cfg.Cgroup = kernel, kf.cookies.Read, kf.cgroup
	cfg.Metrics, cfg.Version, cfg.Resync = ln, version(), resyncEvery
	cfg.Log = log.WithFields(logrus.Fields{"pin_dir": kf.pinDir, "netns_cookie": kf.cookies.Name})
	return daemon.Run(ctx, src, cfg)
}
